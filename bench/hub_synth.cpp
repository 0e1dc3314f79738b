// The overlapping synthetic hub of hub_synth.hpp.
#include "hub_synth.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>

#include "bench_util.hpp"
#include "gmi/error.hpp"
#include "gmi/rkme.hpp"

namespace gmi::bench {
namespace {

// Seeds of independent streams: (seed, what, index) -> a generator of its own.
FastRng stream(std::uint64_t seed, std::uint64_t what, std::uint64_t index) {
  FastRng mix{seed ^ (what * 0x9e3779b97f4a7c15ull)};
  mix.state ^= mix.next() + index * 0xd1b54a32d192ed03ull;
  mix.next();
  return mix;
}

double unit_interval(FastRng& rng) { return static_cast<double>(rng.next() >> 11) * 0x1.0p-53; }

double gaussian(FastRng& rng) {
  const double u1 = std::max(unit_interval(rng), 1e-300), u2 = unit_interval(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// A random direction of the given length (uniform coordinates, normalised: near enough to
// isotropic in hundreds of dimensions, and cheap).
Eigen::VectorXf random_shift(Eigen::Index dim, double length, FastRng& rng) {
  Eigen::VectorXf v(dim);
  for (auto& e : v) e = rng.uniform();
  const float norm = v.norm();
  return norm > 0 ? Eigen::VectorXf(v * static_cast<float>(length / norm)) : v;
}

std::size_t draw_cdf(const std::vector<double>& cdf, double u) {
  const auto it = std::upper_bound(cdf.begin(), cdf.end(), u * cdf.back());
  return std::min(static_cast<std::size_t>(std::distance(cdf.begin(), it)), cdf.size() - 1);
}

// rows x (from columns) -> rows x (to columns) by a seeded Gaussian map, rows renormalised.
RowMatrix project(const RowMatrix& a, const RowMatrix& map) {
  RowMatrix out = a * map.transpose();
  out.rowwise().normalize();
  return out;
}

RowMatrix gaussian_map(Eigen::Index to, Eigen::Index from, std::uint64_t seed) {
  FastRng rng{seed};
  RowMatrix m(to, from);
  const double scale = 1.0 / std::sqrt(static_cast<double>(to));
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(gaussian(rng) * scale);
  return m;
}

Eigen::VectorXf weighted_mean(const RowMatrix& z, const Eigen::VectorXf& beta) {
  return (z.transpose() * beta) / std::max(beta.sum(), 1e-12f);
}

}  // namespace

HubBase load_base(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw InputError("hub base: '" + dir + "' is not a directory");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".gmispec") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  HubBase base;
  base.source = dir;
  std::vector<double> gammas;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    Spec s = parse_spec(bytes);
    if (s.r() < 2) continue;
    if (!base.zx.empty() && (s.zx.cols() != base.zx.front().cols() || s.zt.cols() != base.zt.front().cols()))
      throw InputError("hub base: " + f.string() + " has other dimensions than the specs before it");
    gammas.push_back(s.gamma);
    base.zx.push_back(std::move(s.zx));
    base.zt.push_back(std::move(s.zt));
    base.beta.push_back(std::move(s.beta));
  }
  if (base.zx.size() < 2)
    throw InputError("hub base: '" + dir + "' holds " + std::to_string(base.zx.size()) +
                     " usable .gmispec files (need at least 2)");
  std::nth_element(gammas.begin(), gammas.begin() + static_cast<std::ptrdiff_t>(gammas.size() / 2), gammas.end());
  base.gamma = gammas[gammas.size() / 2];
  return base;
}

HubBase seeded_base(int models, int r, int d, int dt, std::uint64_t seed) {
  if (models < 2 || r < 2) throw InputError("seeded hub base: need at least 2 models of 2 points");
  constexpr int kContent = 16;
  FastRng rng = stream(seed, 1, 0);
  const auto directions = [&](int count, int dim) {
    RowMatrix c(count, dim);
    for (Eigen::Index i = 0; i < c.size(); ++i) c.data()[i] = static_cast<float>(gaussian(rng));
    c.rowwise().normalize();
    return c;
  };
  const RowMatrix content_x = directions(kContent, d), content_t = directions(kContent, dt);
  HubBase base;
  base.source = "seeded";
  base.gamma = 1.0;
  for (int b = 0; b < models; ++b) {
    const Eigen::VectorXf style_x = directions(1, d).row(0).transpose();
    const Eigen::VectorXf style_t = directions(1, dt).row(0).transpose();
    RowMatrix zx(r, d), zt(r, dt);
    Eigen::VectorXf beta(r);
    for (int j = 0; j < r; ++j) {
      Eigen::VectorXf c(kContent);
      for (auto& e : c) e = static_cast<float>(0.35 * gaussian(rng));
      zx.row(j) = (style_x + content_x.transpose() * c).transpose().normalized();
      zt.row(j) = (style_t + content_t.transpose() * c).transpose().normalized();
      beta(j) = static_cast<float>(0.5 + unit_interval(rng));
    }
    base.zx.push_back(std::move(zx));
    base.zt.push_back(std::move(zt));
    base.beta.push_back(beta / beta.sum());
  }
  return base;
}

OverlapHub::OverlapHub(HubBase base, const OverlapOptions& options, long models)
    : base_(std::move(base)), options_(options) {
  if (models < 1) throw InputError("overlap hub: need at least one model");
  if (base_.zx.size() < 2) throw InputError("overlap hub: need a base of at least 2 models");
  if (!(options.family_size >= 1)) throw InputError("overlap hub: family_size must be >= 1");
  if (!(options.mix >= 0 && options.mix <= 1)) throw InputError("overlap hub: mix must be in [0, 1]");
  // The base in the hub's dimensions.
  const Eigen::Index from_x = base_.zx.front().cols(), from_t = base_.zt.front().cols();
  const RowMatrix map_x = from_x != options.d ? gaussian_map(options.d, from_x, options.seed ^ 0x51) : RowMatrix();
  const RowMatrix map_t = from_t != options.dt ? gaussian_map(options.dt, from_t, options.seed ^ 0x52) : RowMatrix();
  for (std::size_t b = 0; b < base_.zx.size(); ++b) {
    if (map_x.size() > 0) base_.zx[b] = project(base_.zx[b], map_x);
    if (map_t.size() > 0) base_.zt[b] = project(base_.zt[b], map_t);
  }
  // Scales, popularity and per-style draws.
  const std::size_t styles = base_.zx.size();
  double spread2 = 0;
  std::size_t points = 0;
  for (std::size_t b = 0; b < styles; ++b) {
    base_mean_.push_back(weighted_mean(base_.zx[b], base_.beta[b]));
    spread2 += (base_.zx[b].rowwise() - base_mean_.back().transpose()).rowwise().squaredNorm().sum();
    points += static_cast<std::size_t>(base_.zx[b].rows());
    std::vector<double> cdf;
    double acc = 0;
    for (Eigen::Index j = 0; j < base_.beta[b].size(); ++j) cdf.push_back(acc += std::max(0.0f, base_.beta[b](j)));
    if (!(acc > 0)) throw InputError("overlap hub: a base model has no positive weight");
    beta_cdf_.push_back(std::move(cdf));
    zipf_cdf_.push_back((zipf_cdf_.empty() ? 0.0 : zipf_cdf_.back()) +
                        std::pow(static_cast<double>(zipf_cdf_.size() + 1), -options.zipf));
  }
  spread_ = std::sqrt(spread2 / static_cast<double>(points));
  std::vector<double> distances;
  for (std::size_t a = 0; a < styles; ++a)
    for (std::size_t b = a + 1; b < styles; ++b) distances.push_back((base_mean_[a] - base_mean_[b]).norm());
  std::nth_element(distances.begin(), distances.begin() + static_cast<std::ptrdiff_t>(distances.size() / 2),
                   distances.end());
  spacing_ = distances[distances.size() / 2];
  // Families: runs of a seeded permutation, geometric sizes.
  std::vector<std::int32_t> order(static_cast<std::size_t>(models));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle_rng(options.seed);
  std::shuffle(order.begin(), order.end(), shuffle_rng);
  family_.assign(static_cast<std::size_t>(models), 0);
  FastRng sizes = stream(options.seed, 2, 0);
  const double keep = 1.0 - 1.0 / options.family_size;  // P(a family grows by one more)
  for (std::size_t i = 0; i < order.size();) {
    std::size_t size = 1;
    while (keep > 0 && unit_interval(sizes) < keep) ++size;
    for (std::size_t k = 0; k < size && i < order.size(); ++k, ++i)
      family_[static_cast<std::size_t>(order[i])] = static_cast<std::int32_t>(families_);
    ++families_;
  }
}

OverlapHub::Model OverlapHub::model(long m) const {
  const long f = family(m);
  FastRng fr = stream(options_.seed, 3, static_cast<std::uint64_t>(f));
  Model mm;
  mm.style = static_cast<int>(draw_cdf(zipf_cdf_, unit_interval(fr)));
  mm.second = static_cast<int>(fr.next() % zipf_cdf_.size());
  mm.alpha = static_cast<float>(options_.mix * unit_interval(fr));
  mm.shift = random_shift(options_.d, options_.family_offset * spacing_, fr);
  FastRng mr = stream(options_.seed, 4, static_cast<std::uint64_t>(m));
  mm.shift += random_shift(options_.d, options_.member_offset * spacing_, mr);
  return mm;
}

std::pair<int, Eigen::Index> OverlapHub::draw_point(const Model& mm, double u1, double u2) const {
  const int style = u1 < mm.alpha ? mm.second : mm.style;
  return {style, static_cast<Eigen::Index>(draw_cdf(beta_cdf_[static_cast<std::size_t>(style)], u2))};
}

Spec OverlapHub::spec(long m) const {
  const Model mm = model(m);
  FastRng rng = stream(options_.seed, 5, static_cast<std::uint64_t>(m));
  const int r = options_.r;
  Spec s;
  s.model_id = "model-" + std::to_string(m);
  s.image_encoder = {"bench-image", "1", options_.d, base_.gamma};
  s.text_encoder = {"bench-text", "1", options_.dt, 1.0};
  s.n = 1000;
  s.gamma = base_.gamma;
  s.zx.resize(r, options_.d);
  s.zt.resize(r, options_.dt);
  s.beta.resize(r);
  const double jitter = options_.fit_jitter * spread_;
  for (int j = 0; j < r; ++j) {
    const auto [style, row] = draw_point(mm, unit_interval(rng), unit_interval(rng));
    const auto b = static_cast<std::size_t>(style);
    s.zx.row(j) = (base_.zx[b].row(row).transpose() + mm.shift + random_shift(options_.d, jitter, rng))
                      .transpose()
                      .normalized();
    s.zt.row(j) = (base_.zt[b].row(row).transpose() + random_shift(options_.dt, options_.fit_jitter, rng))
                      .transpose()
                      .normalized();
    s.beta(j) = base_.beta[b](row) * static_cast<float>(0.8 + 0.4 * unit_interval(rng));
  }
  s.beta /= s.beta.sum();
  s.gram_x = gaussian_gram(s.zx, s.gamma);
  s.mean_x = (1.0f - mm.alpha) * base_mean_[static_cast<std::size_t>(mm.style)] +
             mm.alpha * base_mean_[static_cast<std::size_t>(mm.second)] + mm.shift;
  s.downloads = static_cast<double>(rng.next() % 100000);
  return s;
}

void OverlapHub::query(long m, std::uint64_t draw, float* x, float* t) const {
  const Model mm = model(m);
  FastRng rng = stream(options_.seed ^ 0xabcdefull, 6 + draw, static_cast<std::uint64_t>(m));
  const auto [style, row] = draw_point(mm, unit_interval(rng), unit_interval(rng));
  const auto b = static_cast<std::size_t>(style);
  // The content variation: a random base point's deviation from its own model's mean.
  const auto other = static_cast<std::size_t>(rng.next() % base_.zx.size());
  const auto other_row = static_cast<Eigen::Index>(rng.next() % static_cast<std::uint64_t>(base_.zx[other].rows()));
  const Eigen::VectorXf content = base_.zx[other].row(other_row).transpose() - base_mean_[other];
  Eigen::Map<Eigen::VectorXf> xv(x, options_.d);
  xv = (base_.zx[b].row(row).transpose() + mm.shift + static_cast<float>(options_.content) * content).normalized();
  const Eigen::VectorXf t_content = base_.zt[other].row(other_row).transpose() -
                                    weighted_mean(base_.zt[other], base_.beta[other]);
  Eigen::Map<Eigen::VectorXf> tv(t, options_.dt);
  tv = (base_.zt[b].row(row).transpose() + 0.5f * static_cast<float>(options_.content) * t_content).normalized();
}

}  // namespace gmi::bench
