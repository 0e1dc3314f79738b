#pragma once
// A synthetic hub that overlaps the way real hubs do, for the scoring benchmarks: models made
// by mixing and perturbing the reduced points of a few base models (the specs of an evaluation
// hub, or seeded stand-ins), grouped into families of near-duplicates, with a few base styles
// copied many times (Zipf popularity). Every model is a function of (seed, model index) alone,
// so a hub of 10^6 specs can be streamed again, in any order, to compute an exact reference.
//
// How model m is made (all magnitudes relative to the base: `spacing` is the median distance
// between two base models' means, `spread` the RMS distance of a base point to its model's
// mean):
//   family f(m): families are runs of a seeded permutation of the models, with geometric sizes
//     of mean family_size; family f copies base style b_f (Zipf(zipf) over the base models, so
//     popular styles recur across many families), draws a fraction alpha_f ~ U[0, mix) of its
//     points from a second style b2_f (uniform), and shifts everything by o_f, a random
//     direction of length family_offset * spacing;
//   member m: its own shift o_m of length member_offset * spacing (the near-duplicates);
//   spec: r points, each a base point of b_f (or of b2_f, with probability alpha_f) drawn by
//     the base's beta, plus o_f + o_m plus a jitter of fit_jitter * spread, L2-normalised; the
//     point's prompt embedding that base point's plus a jitter of length fit_jitter (prompt
//     embeddings are unit vectors), L2-normalised; beta the base point's weight times
//     U[0.8, 1.2], renormalised; gamma the base's;
//   query of m (a fresh sample, never a spec point): a base point drawn the same way, plus
//     o_f + o_m, plus content * (a random base point minus its own model's mean: the content
//     variation real models share), L2-normalised.
// A base of another dimension than the hub's is mapped by a seeded Gaussian projection.
#include <cstdint>
#include <string>
#include <vector>

#include "gmi/linalg.hpp"
#include "gmi/spec.hpp"

namespace gmi::bench {

struct OverlapOptions {
  std::uint64_t seed = 7;
  int r = 32, d = 512, dt = 256;
  double zipf = 1.1;            // popularity exponent of the base styles
  double family_size = 8;       // mean models per family (geometric)
  double family_offset = 0.35;  // family shift, x spacing
  double member_offset = 0.05;  // member shift, x spacing
  double mix = 0.5;             // a family's fraction from a second style ~ U[0, mix)
  double fit_jitter = 0.15;     // spec point jitter, x spread
  double content = 1.0;         // query content noise, x one real within-model deviation
  int base_models = 48;         // seeded base (no store): styles
};

// The models the hub is made from: their reduced points, prompts and weights.
struct HubBase {
  std::vector<RowMatrix> zx, zt;
  std::vector<Eigen::VectorXf> beta;
  double gamma = 1.0;
  std::string source;  // "seeded" or the directory read
};

// Every *.gmispec file in `dir` (a directory spec store); throws gmi::InputError when there
// are fewer than 2 or they do not parse.
HubBase load_base(const std::string& dir);
// Seeded stand-ins: `models` styles, each r points = its own direction plus a combination of
// 16 content directions shared by all styles.
HubBase seeded_base(int models, int r, int d, int dt, std::uint64_t seed);

class OverlapHub {
 public:
  OverlapHub(HubBase base, const OverlapOptions& options, long models);
  long size() const { return static_cast<long>(family_.size()); }
  // Model m's spec (model id "model-<m>"); the same for the same (seed, m) whatever was asked before.
  Spec spec(long m) const;
  // A fresh sample of model m's outputs: x (d) and its prompt embedding t (dt), both unit.
  // `draw` numbers the sample (the same (m, draw) gives the same sample).
  void query(long m, std::uint64_t draw, float* x, float* t) const;
  long family(long m) const { return family_[static_cast<std::size_t>(m)]; }
  long families() const { return families_; }
  double spacing() const { return spacing_; }
  double spread() const { return spread_; }
  const HubBase& base() const { return base_; }

 private:
  struct Model {
    int style, second;
    float alpha;
    Eigen::VectorXf shift;  // o_f + o_m
  };
  Model model(long m) const;
  // One base point (style, row) drawn for model `mm` by `u` in [0, 1)^2.
  std::pair<int, Eigen::Index> draw_point(const Model& mm, double u1, double u2) const;

  HubBase base_;
  OverlapOptions options_;
  std::vector<std::int32_t> family_;
  long families_ = 0;
  std::vector<double> zipf_cdf_;                 // over base styles
  std::vector<std::vector<double>> beta_cdf_;    // per base style
  std::vector<Eigen::VectorXf> base_mean_;       // per base style (d)
  double spacing_ = 0, spread_ = 0;
};

}  // namespace gmi::bench
