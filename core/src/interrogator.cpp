#include "gmi/interrogator.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>

#include "gmi/error.hpp"

namespace gmi {
namespace {

/// Rows of zt scaled to unit length (zero rows stay zero).
RowMatrix unit_rows(const RowMatrix& m) {
  RowMatrix out = m;
  for (Eigen::Index i = 0; i < out.rows(); ++i) {
    float n = out.row(i).norm();
    if (n > 0) out.row(i) /= n;
  }
  return out;
}

void normalise_rows(RowMatrix& m) {
  for (Eigen::Index i = 0; i < m.rows(); ++i) {
    float n = m.row(i).norm();
    if (n > 0) m.row(i) /= n;
  }
}

/// Kernel-weighted average of the prompt parts of the k reduced points nearest to x,
/// across every model of the hub. The bandwidth adapts to the neighbourhood (the mean
/// squared distance of the k neighbours), so no hub-wide gamma is needed here.
class NeighbourInterrogator final : public Interrogator {
 public:
  NeighbourInterrogator(const SpecIndex& index, int k) : index_(index), k_(std::max(1, k)) {
    zt_unit_ = unit_rows(index.all_zt());
    zx_sqnorm_ = index.all_zx().rowwise().squaredNorm();
  }
  std::string name() const override { return "neighbour"; }

  RowMatrix pseudo_prompts(const RowMatrix& raw) const override {
    const RowMatrix xs = index_.map_queries(raw);  // the index's space (a metric's, if any)
    const RowMatrix& zx = index_.all_zx();
    RowMatrix out = RowMatrix::Zero(xs.rows(), zt_unit_.cols());
    const Eigen::Index p = zx.rows();
    if (p == 0) return out;
    Eigen::MatrixXf s = zx * xs.transpose();  // P x B
    const int k = static_cast<int>(std::min<Eigen::Index>(k_, p));
    std::vector<std::pair<float, Eigen::Index>> d(static_cast<size_t>(p));
    for (Eigen::Index q = 0; q < xs.rows(); ++q) {
      const float xn = xs.row(q).squaredNorm();
      for (Eigen::Index j = 0; j < p; ++j) d[j] = {std::max(0.f, zx_sqnorm_[j] + xn - 2 * s(j, q)), j};
      std::partial_sort(d.begin(), d.begin() + k, d.end());
      double mean_d = 0;
      for (int i = 0; i < k; ++i) mean_d += d[i].first;
      mean_d = std::max(mean_d / k, 1e-12);
      for (int i = 0; i < k; ++i) {
        double a = std::exp(-(d[i].first - d[0].first) / mean_d) * index_.all_beta()[d[i].second];
        out.row(q) += static_cast<float>(a) * zt_unit_.row(d[i].second);
      }
    }
    normalise_rows(out);
    return out;
  }

 private:
  const SpecIndex& index_;
  int k_;
  RowMatrix zt_unit_;
  Eigen::VectorXf zx_sqnorm_;
};

/// Ridge regression zx -> zt/|zt| over the hub's reduced points, weighted by beta.
/// Fitted on at most kMaxPoints points (a seeded sample) so large hubs stay cheap.
class RidgeInterrogator final : public Interrogator {
 public:
  static constexpr Eigen::Index kMaxPoints = 20000;
  RidgeInterrogator(const SpecIndex& index, double alpha) : index_(index) {
    const RowMatrix& zx = index.all_zx();
    RowMatrix zt = unit_rows(index.all_zt());
    std::vector<Eigen::Index> rows(static_cast<size_t>(zx.rows()));
    std::iota(rows.begin(), rows.end(), 0);
    if (zx.rows() > kMaxPoints) {
      std::mt19937_64 rng(7);
      std::shuffle(rows.begin(), rows.end(), rng);
      rows.resize(kMaxPoints);
    }
    const Eigen::Index d = zx.cols(), dt = zt.cols();
    Eigen::MatrixXd a = Eigen::MatrixXd::Zero(d + 1, d + 1);  // + bias
    Eigen::MatrixXd b = Eigen::MatrixXd::Zero(d + 1, dt);
    Eigen::VectorXd u(d + 1);
    for (Eigen::Index r : rows) {
      u.head(d) = zx.row(r).transpose().cast<double>();
      u[d] = 1.0;
      double w = index.all_beta()[r];
      a.selfadjointView<Eigen::Lower>().rankUpdate(u, w);
      b.noalias() += w * u * zt.row(r).cast<double>();
    }
    a = a.selfadjointView<Eigen::Lower>();
    double scale = a.diagonal().head(d).mean();
    a.diagonal().head(d).array() += alpha * std::max(scale, 1e-12);
    w_ = a.ldlt().solve(b).cast<float>();
  }
  std::string name() const override { return "ridge"; }

  RowMatrix pseudo_prompts(const RowMatrix& raw) const override {
    if (w_.rows() == 0) return RowMatrix::Zero(raw.rows(), 0);
    const RowMatrix xs = index_.map_queries(raw);
    RowMatrix out = xs * w_.topRows(xs.cols());
    out.rowwise() += w_.row(w_.rows() - 1);
    normalise_rows(out);
    return out;
  }

 private:
  const SpecIndex& index_;
  RowMatrix w_;  // (d + 1) x dt
};

}  // namespace

namespace {

/// The bank's prompts ranked by cosine to the image; a softmax mix of the best.
class PromptBankInterrogator final : public Interrogator {
 public:
  PromptBankInterrogator(RowMatrix bank, int top_k, double tau) : bank_(std::move(bank)), top_k_(top_k), tau_(tau) {
    prompt_bank_pseudo_prompts(RowMatrix::Zero(0, bank_.cols()), bank_, top_k_, tau_);  // checks the options
  }
  std::string name() const override { return "prompt-bank"; }
  RowMatrix pseudo_prompts(const RowMatrix& xs) const override {
    return prompt_bank_pseudo_prompts(xs, bank_, top_k_, tau_);
  }

 private:
  RowMatrix bank_;
  int top_k_;
  double tau_;
};

}  // namespace

RowMatrix prompt_bank_pseudo_prompts(const RowMatrix& xs, const RowMatrix& bank, int top_k, double tau) {
  if (top_k < 1) throw InputError("interrogate.top_k must be >= 1, got " + std::to_string(top_k));
  if (!(tau > 0) || !std::isfinite(tau)) throw InputError("interrogate.bank_tau must be > 0");
  if (bank.rows() == 0) throw InputError("the prompt bank is empty");
  if (xs.cols() != bank.cols()) {
    throw InputError("the prompt bank's embeddings have " + std::to_string(bank.cols()) +
                     " dims but the image embeddings " + std::to_string(xs.cols()) +
                     "; prompt-bank needs image and text encoders that share one space");
  }
  RowMatrix out = RowMatrix::Zero(xs.rows(), bank.cols());
  if (xs.rows() == 0) return out;
  const Eigen::VectorXf bank_norm = bank.rowwise().norm();
  const Eigen::MatrixXf dots = bank * xs.transpose();  // P x B
  const Eigen::Index p = bank.rows();
  const int k = static_cast<int>(std::min<Eigen::Index>(top_k, p));
  std::vector<std::pair<double, Eigen::Index>> s(static_cast<std::size_t>(p));
  for (Eigen::Index q = 0; q < xs.rows(); ++q) {
    const double xn = xs.row(q).norm();
    for (Eigen::Index j = 0; j < p; ++j) {
      const double denom = xn * bank_norm[j];
      s[static_cast<std::size_t>(j)] = {denom > 0 ? dots(j, q) / denom : 0.0, j};
    }
    // Highest cosine first; ties by bank order, so the result does not depend on the sort.
    std::partial_sort(s.begin(), s.begin() + k, s.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    const double top = s[0].first;
    double z = 0;
    for (int i = 0; i < k; ++i) z += std::exp((s[static_cast<std::size_t>(i)].first - top) / tau);
    Eigen::RowVectorXd mix = Eigen::RowVectorXd::Zero(bank.cols());
    for (int i = 0; i < k; ++i) {
      const auto& [sim, j] = s[static_cast<std::size_t>(i)];
      mix += (std::exp((sim - top) / tau) / z) * bank.row(j).cast<double>();
    }
    const double n = mix.norm();
    if (n > 0) out.row(q) = (mix / n).cast<float>();
  }
  return out;
}

std::unique_ptr<Interrogator> make_prompt_bank_interrogator(RowMatrix bank, int top_k, double tau) {
  return std::make_unique<PromptBankInterrogator>(std::move(bank), top_k, tau);
}

std::vector<std::string> read_prompt_bank(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError("cannot read the prompt bank " + path + ": " + std::strerror(errno));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    const auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos || line[b] == '#') continue;
    const auto e = line.find_last_not_of(" \t\r");
    out.push_back(line.substr(b, e - b + 1));
  }
  if (out.empty()) throw InputError("the prompt bank " + path + " holds no prompts (one per line)");
  return out;
}

const std::vector<std::string>& interrogator_names() {
  static const std::vector<std::string> names{"neighbour", "ridge", "prompt-bank", "captioner"};
  return names;
}

InterrogatorInput interrogator_input(const std::string& name) {
  if (name == "captioner") return InterrogatorInput::kImage;
  if (name == "neighbour" || name == "neighbor" || name == "ridge" || name == "prompt-bank") {
    return InterrogatorInput::kImageEmbedding;
  }
  throw InputError("unknown interrogator '" + name + "' (available: neighbour, ridge, prompt-bank, captioner)");
}

bool hub_learned_interrogator(const std::string& name) {
  return name == "neighbour" || name == "neighbor" || name == "ridge";
}

std::unique_ptr<Interrogator> make_neighbour_interrogator(const SpecIndex& index, int k) {
  return std::make_unique<NeighbourInterrogator>(index, k);
}

std::unique_ptr<Interrogator> make_ridge_interrogator(const SpecIndex& index, double alpha) {
  return std::make_unique<RidgeInterrogator>(index, alpha);
}

std::unique_ptr<Interrogator> make_interrogator(const std::string& name, const SpecIndex& index) {
  if (name == "neighbour" || name == "neighbor") return make_neighbour_interrogator(index);
  if (name == "ridge") return make_ridge_interrogator(index);
  throw InputError("unknown interrogator '" + name + "' (available: neighbour, ridge)");
}

}  // namespace gmi
