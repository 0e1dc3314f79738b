// Exact scoring of every packed spec against a query. See shared METHOD.md, "Identification".
#include "gmi/scoring.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>
#include <unordered_set>
#include <utility>

#include "gmi/error.hpp"
#include "gmi/half.hpp"
#include "gmi/parallel.hpp"
#include "gmi/rkme.hpp"
#include "scoring_internal.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace gmi {
namespace {

using Eigen::Index;
using scoring_detail::BoundedTopK;
using scoring_detail::check_options;
using scoring_detail::parallel_for_rethrow;

// Reduced points per block of the per-model pass: the block's dot products stay in L1/L2.
constexpr std::size_t kBlockPoints = 4096;
// Queries per GEMM of a batch: each zx block is read once per this many queries.
constexpr Index kQueryChunk = 128;
// Floats of reduced points widened at a time from binary16 (128 KiB: stays in L2).
constexpr Index kHalfFloats = 32768;
// Multiply-adds below which a call stays on the calling thread.
constexpr double kMinWorkPerThread = 4e6;
// While packing, freed spec memory is handed back to the system every this many bytes.
constexpr std::size_t kReleaseEvery = std::size_t{256} << 20;

// glibc keeps freed blocks in its heap (small chunks left in its caches pin everything below
// them), so a vector of specs being consumed would not shrink; malloc_trim returns the free
// pages wherever they sit.
void release_freed_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

std::string identity_text(const EncoderIdentity& e) {
  return e.name + "/" + e.version + "/" + std::to_string(e.dim);
}

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

// Runs fn(m_begin, m_end) over [0, M) split into contiguous ranges of about equal point counts,
// one per thread, when the work is large enough to pay for the threads.
template <class Fn>
void for_model_ranges(const std::vector<std::size_t>& offsets, double work, const Fn& fn) {
  const std::size_t models = offsets.size() - 1;
  const auto hw = static_cast<std::size_t>(default_threads());
  const std::size_t threads =
      std::min({hw, models, static_cast<std::size_t>(std::max(1.0, work / kMinWorkPerThread))});
  if (threads <= 1) {
    fn(std::size_t{0}, models);
    return;
  }
  std::vector<std::size_t> bounds(threads + 1, models);
  bounds[0] = 0;
  for (std::size_t k = 1; k < threads; ++k) {
    const std::size_t target = offsets.back() * k / threads;
    bounds[k] = std::max<std::size_t>(
        bounds[k - 1],
        static_cast<std::size_t>(std::lower_bound(offsets.begin(), offsets.end() - 1, target) -
                                 offsets.begin()));
  }
  parallel_for_rethrow(threads, static_cast<int>(threads), [&](std::size_t k) { fn(bounds[k], bounds[k + 1]); });
}


}  // namespace

const char* to_string(Scorer s) {
  switch (s) {
    case Scorer::kWeighted:
      return "weighted";
    case Scorer::kRkme:
      return "rkme";
    case Scorer::kMean:
      return "mean";
    case Scorer::kNearest:
      return "nearest";
    case Scorer::kPopularity:
      return "popularity";
  }
  return "unknown";
}

Scorer parse_scorer(std::string_view name) {
  for (Scorer s :
       {Scorer::kWeighted, Scorer::kRkme, Scorer::kMean, Scorer::kNearest, Scorer::kPopularity})
    if (name == to_string(s)) return s;
  throw InputError("unknown scorer '" + std::string(name) +
                   "' (expected weighted, rkme, mean, nearest or popularity)");
}

const char* to_string(SpecStorage s) { return s == SpecStorage::kF16 ? "f16" : "f32"; }

SpecStorage parse_storage(std::string_view name) {
  if (name == "f32") return SpecStorage::kF32;
  if (name == "f16") return SpecStorage::kF16;
  throw InputError("unknown spec storage '" + std::string(name) + "' (expected f32 or f16)");
}

const char* to_string(SearchMode s) {
  switch (s) {
    case SearchMode::kExact: return "exact";
    case SearchMode::kTwoStage: return "two-stage";
    case SearchMode::kAuto: break;
  }
  return "auto";
}

SearchMode parse_search(std::string_view name) {
  if (name == "auto") return SearchMode::kAuto;
  if (name == "exact") return SearchMode::kExact;
  if (name == "two-stage") return SearchMode::kTwoStage;
  throw InputError("unknown search '" + std::string(name) + "' (expected auto, exact or two-stage)");
}

bool has_exact_stage(Scorer s) { return s == Scorer::kWeighted || s == Scorer::kRkme || s == Scorer::kNearest; }

const RowMatrix& SpecIndex::all_zx() const {
  if (storage_ != SpecStorage::kF32)
    throw InputError("this spec index stores its points as " + std::string(to_string(storage_)) +
                     "; the packed float32 points exist only with f32 storage");
  return zx_;
}

const RowMatrix& SpecIndex::all_zt() const {
  if (storage_ != SpecStorage::kF32)
    throw InputError("this spec index stores its points as " + std::string(to_string(storage_)) +
                     "; the packed float32 points exist only with f32 storage");
  return zt_;
}

std::size_t SpecIndex::memory_bytes() const {
  const std::size_t points_bytes =
      storage_ == SpecStorage::kF16 ? (zx16_.size() + zt16_.size()) * sizeof(std::uint16_t)
                                    : static_cast<std::size_t>(zx_.size() + zt_.size()) * sizeof(float);
  const std::size_t per_point = static_cast<std::size_t>(zx_sqnorm_.size() + zt_inv_norm_.size() +
                                                         beta_.size() + log_beta_.size()) * sizeof(float);
  const std::size_t per_model =
      grams_.size() * sizeof(float) + gram_offsets_.size() * sizeof(std::size_t) +
      static_cast<std::size_t>(beta_k_beta_.size() + downloads_.size()) * sizeof(double) +
      static_cast<std::size_t>(gamma_.size() + mean_unit_.size()) * sizeof(float) +
      offsets_.size() * sizeof(std::size_t);
  return points_bytes + per_point + per_model;
}

std::size_t SpecIndex::mapped_bytes() const {
  return (zx16_.mapped() ? zx16_.size() : 0) * sizeof(std::uint16_t) +
         (zt16_.mapped() ? zt16_.size() : 0) * sizeof(std::uint16_t);
}

bool ascending(Scorer s) { return s == Scorer::kWeighted || s == Scorer::kRkme; }

Spec to_metric_space(Spec s, const Metric& metric) {
  check_metric_encoder(metric, s.image_encoder);
  if (s.zx.cols() != metric.dim_in())
    throw SpecFormatError("spec '" + s.model_id + "': zx has " + std::to_string(s.zx.cols()) +
                          " columns, the metric maps " + std::to_string(metric.dim_in()));
  s.zx = metric.map(s.zx);
  s.gamma = metric.gamma;
  s.gram_x = gaussian_gram(s.zx, s.gamma);
  if (s.mean_x.size()) s.mean_x = metric.p * s.mean_x;
  return s;
}

namespace {

// What SpecIndex needs of one spec given in a space of d_in image columns.
void check_packable_shape(const Spec& s, Eigen::Index d_in, Eigen::Index dt) {
  const Index r = s.beta.size();
  auto bad = [&](const std::string& what) {
    return SpecFormatError("spec " + in_quotes(s.model_id) + ": " + what);
  };
  if (r < 1) throw bad("no reduced points");
  if (s.zx.rows() != r || s.zx.cols() != d_in)
    throw bad("zx is " + std::to_string(s.zx.rows()) + "x" + std::to_string(s.zx.cols()) +
              ", expected " + std::to_string(r) + "x" + std::to_string(d_in));
  if (s.zt.rows() != r || s.zt.cols() != dt)
    throw bad("zt is " + std::to_string(s.zt.rows()) + "x" + std::to_string(s.zt.cols()) +
              ", expected " + std::to_string(r) + "x" + std::to_string(dt));
  if (s.gram_x.rows() != r || s.gram_x.cols() != r) throw bad("gram_x is not r x r");
  if (s.mean_x.size() != d_in && s.mean_x.size() != 0) throw bad("mean_x is not of size d");
  if (!all_finite(s.beta) || (s.beta.array() < 0).any())
    throw bad("beta must be finite and non-negative");
  if (!(s.gamma > 0) || !std::isfinite(s.gamma)) throw bad("gamma must be positive");
  if (!std::isfinite(s.downloads)) throw bad("downloads must be finite");
  if (!all_finite(s.zx) || !all_finite(s.zt) || !all_finite(s.gram_x) || !all_finite(s.mean_x))
    throw SpecFormatError("spec " + in_quotes(s.model_id) + ": non-finite values");
}

}  // namespace

void check_packable(const Spec& spec, const Metric* metric, SpecSpace space) {
  if (space == SpecSpace::kMapped && !metric) throw InputError("SpecIndex: specs said to be mapped, but no metric given");
  if (metric) check_metric_encoder(*metric, spec.image_encoder);
  const Eigen::Index d_in = space == SpecSpace::kMapped ? metric->dim_out() : spec.image_encoder.dim;
  check_packable_shape(spec, d_in, spec.text_encoder.dim);
}

SpecIndex::SpecIndex(std::vector<Spec> specs, std::shared_ptr<const Metric> metric, SpecSpace space,
                     SpecStorage storage)
    : metric_(std::move(metric)), storage_(storage) {
  if (space == SpecSpace::kMapped && !metric_)
    throw InputError("SpecIndex: specs said to be mapped, but no metric given");
  const std::size_t models = specs.size();
  offsets_.assign(1, 0);
  if (models == 0) return;
  image_encoder_ = specs.front().image_encoder;
  text_encoder_ = specs.front().text_encoder;
  const Index d = image_encoder_.dim, dt = text_encoder_.dim;
  if (metric_) check_metric_encoder(*metric_, image_encoder_);
  const Index dm = metric_ ? metric_->dim_out() : d;  // the space the index scores in
  const Index d_in = space == SpecSpace::kMapped ? dm : d;  // columns of the given zx

  // Pass 1: everything checkable without copying, before the big allocations.
  offsets_.resize(models + 1);
  gram_offsets_.resize(models);
  std::size_t gram_total = 0;
  {
    std::unordered_set<std::string_view> ids;
    ids.reserve(models);
    for (std::size_t m = 0; m < models; ++m) {
      const Spec& s = specs[m];
      if (!(s.image_encoder == image_encoder_))
        throw EncoderMismatchError(
            "spec " + in_quotes(s.model_id) + " was made with image encoder " +
            identity_text(s.image_encoder) + ", the index holds " + identity_text(image_encoder_) +
            " (from spec " + in_quotes(specs.front().model_id) + ")");
      if (!(s.text_encoder == text_encoder_))
        throw EncoderMismatchError("spec " + in_quotes(s.model_id) +
                                   " was made with text encoder " + identity_text(s.text_encoder) +
                                   ", the index holds " + identity_text(text_encoder_) +
                                   " (from spec " + in_quotes(specs.front().model_id) + ")");
      if (!ids.insert(s.model_id).second)
        throw InputError("SpecIndex: model id " + in_quotes(s.model_id) + " appears twice");
      check_packable_shape(s, d_in, dt);
      const Index r = s.beta.size();
      offsets_[m + 1] = offsets_[m] + static_cast<std::size_t>(r);
      gram_offsets_[m] = gram_total;
      gram_total += static_cast<std::size_t>(r * r);
    }
  }

  // Pass 2: pack. Specs are consumed from the back and destroyed as soon as they are copied,
  // and their memory is handed back as we go, so the packed matrices (allocated but not yet
  // touched) grow while the specs shrink: the peak stays near one copy, not two.
  const auto points = static_cast<Index>(offsets_.back());
  const bool half = storage_ == SpecStorage::kF16;
  dx_ = dm;
  dt_ = dt;
  if (half) {
    zx16_.resize(static_cast<std::size_t>(points * dm));
    zt16_.resize(static_cast<std::size_t>(points * dt));
  } else {
    zx_.resize(points, dm);
    zt_.resize(points, dt);
  }
  zx_sqnorm_.resize(points);
  zt_inv_norm_.resize(points);
  beta_.resize(points);
  log_beta_.resize(points);
  grams_.resize(gram_total);
  beta_k_beta_.resize(static_cast<Index>(models));
  gamma_.resize(static_cast<Index>(models));
  mean_unit_.resize(static_cast<Index>(models), dm);
  downloads_.resize(static_cast<Index>(models));
  model_ids_.resize(models);
  std::size_t freed = 0;
  for (std::size_t m = models; m-- > 0;) {
    Spec& s = specs.back();
    const auto p = static_cast<Index>(offsets_[m]);
    const Index r = s.beta.size();
    const auto mi = static_cast<Index>(m);
    if (metric_ && space == SpecSpace::kRaw) s = to_metric_space(std::move(s), *metric_);
    if (half) {
      // The norms are those of the rounded points, so that each kernel is of one point.
      floats_to_halves(s.zx.data(), zx16_.mutable_data() + static_cast<std::size_t>(p * dm), static_cast<std::size_t>(r * dm));
      floats_to_halves(s.zt.data(), zt16_.mutable_data() + static_cast<std::size_t>(p * dt), static_cast<std::size_t>(r * dt));
      halves_to_floats(zx16_.data() + static_cast<std::size_t>(p * dm), s.zx.data(), static_cast<std::size_t>(r * dm));
      halves_to_floats(zt16_.data() + static_cast<std::size_t>(p * dt), s.zt.data(), static_cast<std::size_t>(r * dt));
    } else {
      zx_.middleRows(p, r) = s.zx;
      zt_.middleRows(p, r) = s.zt;
    }
    zx_sqnorm_.segment(p, r) = s.zx.cast<double>().rowwise().squaredNorm().cast<float>();
    const Eigen::VectorXd zt_norm = s.zt.cast<double>().rowwise().norm();
    for (Index j = 0; j < r; ++j)
      zt_inv_norm_(p + j) = zt_norm(j) > 0 ? static_cast<float>(1.0 / zt_norm(j)) : 0.0f;
    beta_.segment(p, r) = s.beta;
    log_beta_.segment(p, r) = s.beta.array().log();  // log(0) = -inf: that point never weighs
    gamma_(mi) = static_cast<float>(s.gamma);
    std::copy(s.gram_x.data(), s.gram_x.data() + r * r, grams_.begin() + gram_offsets_[m]);
    const Eigen::VectorXd b = s.beta.cast<double>();
    beta_k_beta_(mi) = b.dot(s.gram_x.cast<double>() * b);
    const double mean_norm = s.mean_x.size() ? s.mean_x.cast<double>().norm() : 0.0;
    if (mean_norm > 0)
      mean_unit_.row(mi) = (s.mean_x.cast<double>() / mean_norm).cast<float>().transpose();
    else
      mean_unit_.row(mi).setZero();
    downloads_(mi) = s.downloads;
    model_ids_[m] = std::move(s.model_id);
    freed += static_cast<std::size_t>(s.zx.size() + s.zt.size() + s.gram_x.size()) * sizeof(float);
    specs.pop_back();
    if (freed >= kReleaseEvery) {
      release_freed_memory();
      freed = 0;
    }
  }
}

SpecIndex SpecIndex::merge(const std::vector<Part>& parts) {
  SpecIndex out;
  const SpecIndex* first = nullptr;
  std::size_t models = 0, points = 0, gram_total = 0;
  for (const Part& part : parts) {
    if (!part.index) throw InputError("SpecIndex::merge: a part has no index");
    const SpecIndex& ix = *part.index;
    if (part.exclude && part.exclude->size() != ix.size())
      throw InputError("SpecIndex::merge: an exclusion mask has " + std::to_string(part.exclude->size()) +
                       " flags for " + std::to_string(ix.size()) + " models");
    if (ix.size() == 0) continue;
    if (!first) {
      first = &ix;
    } else if (!(ix.image_encoder_ == first->image_encoder_) || !(ix.text_encoder_ == first->text_encoder_) ||
               ix.metric_ != first->metric_ || ix.storage_ != first->storage_) {
      throw InputError("SpecIndex::merge: the parts differ in encoders, metric or storage");
    }
    for (std::size_t m = 0; m < ix.size(); ++m) {
      if (part.exclude && (*part.exclude)[m]) continue;
      ++models;
      const std::size_t r = ix.offsets_[m + 1] - ix.offsets_[m];
      points += r;
      gram_total += r * r;
    }
  }
  out.offsets_.assign(1, 0);
  if (!first) return out;
  out.image_encoder_ = first->image_encoder_;
  out.text_encoder_ = first->text_encoder_;
  out.metric_ = first->metric_;
  out.storage_ = first->storage_;
  out.dx_ = first->dx_;
  out.dt_ = first->dt_;
  const Index dx = out.dx_, dt = out.dt_;
  const bool half = out.storage_ == SpecStorage::kF16;
  const auto P = static_cast<Index>(points);
  const auto M = static_cast<Index>(models);
  if (half) {
    out.zx16_.resize(points * static_cast<std::size_t>(dx));
    out.zt16_.resize(points * static_cast<std::size_t>(dt));
  } else {
    out.zx_.resize(P, dx);
    out.zt_.resize(P, dt);
  }
  out.zx_sqnorm_.resize(P);
  out.zt_inv_norm_.resize(P);
  out.beta_.resize(P);
  out.log_beta_.resize(P);
  out.grams_.resize(gram_total);
  out.gram_offsets_.resize(models);
  out.offsets_.resize(models + 1);
  out.beta_k_beta_.resize(M);
  out.gamma_.resize(M);
  out.mean_unit_.resize(M, dx);
  out.downloads_.resize(M);
  out.model_ids_.reserve(models);
  std::unordered_set<std::string_view> ids;
  ids.reserve(models);
  std::size_t m_out = 0, p_out = 0, g_out = 0;
  for (const Part& part : parts) {
    const SpecIndex& ix = *part.index;
    for (std::size_t m = 0; m < ix.size(); ++m) {
      if (part.exclude && (*part.exclude)[m]) continue;
      if (!ids.insert(ix.model_ids_[m]).second)
        throw InputError("SpecIndex::merge: model id " + in_quotes(ix.model_ids_[m]) + " is kept twice");
      const std::size_t p0 = ix.offsets_[m], r = ix.offsets_[m + 1] - p0;
      const auto pi = static_cast<Index>(p0), po = static_cast<Index>(p_out), ri = static_cast<Index>(r);
      if (half) {
        std::copy_n(ix.zx16_.data() + p0 * static_cast<std::size_t>(dx), r * static_cast<std::size_t>(dx),
                    out.zx16_.mutable_data() + p_out * static_cast<std::size_t>(dx));
        std::copy_n(ix.zt16_.data() + p0 * static_cast<std::size_t>(dt), r * static_cast<std::size_t>(dt),
                    out.zt16_.mutable_data() + p_out * static_cast<std::size_t>(dt));
      } else {
        out.zx_.middleRows(po, ri) = ix.zx_.middleRows(pi, ri);
        out.zt_.middleRows(po, ri) = ix.zt_.middleRows(pi, ri);
      }
      out.zx_sqnorm_.segment(po, ri) = ix.zx_sqnorm_.segment(pi, ri);
      out.zt_inv_norm_.segment(po, ri) = ix.zt_inv_norm_.segment(pi, ri);
      out.beta_.segment(po, ri) = ix.beta_.segment(pi, ri);
      out.log_beta_.segment(po, ri) = ix.log_beta_.segment(pi, ri);
      std::copy_n(ix.grams_.data() + ix.gram_offsets_[m], r * r, out.grams_.data() + g_out);
      out.gram_offsets_[m_out] = g_out;
      const auto mi = static_cast<Index>(m), mo = static_cast<Index>(m_out);
      out.beta_k_beta_(mo) = ix.beta_k_beta_(mi);
      out.gamma_(mo) = ix.gamma_(mi);
      out.mean_unit_.row(mo) = ix.mean_unit_.row(mi);
      out.downloads_(mo) = ix.downloads_(mi);
      out.model_ids_.push_back(ix.model_ids_[m]);
      p_out += r;
      g_out += r * r;
      out.offsets_[++m_out] = p_out;
    }
  }
  return out;
}

void SpecIndex::check_compatible(const EncoderIdentity& image, const EncoderIdentity& text) const {
  if (size() == 0) return;  // nothing to mismatch
  if (!(image == image_encoder_))
    throw EncoderMismatchError("query embedded by image encoder " + identity_text(image) +
                               ", the index's specs were made with " +
                               identity_text(image_encoder_));
  if (!(text == text_encoder_))
    throw EncoderMismatchError("query embedded by text encoder " + identity_text(text) +
                               ", the index's specs were made with " +
                               identity_text(text_encoder_));
}

RowMatrix SpecIndex::map_queries(const RowMatrix& xs) const {
  if (xs.cols() != image_encoder_.dim && size() > 0)
    throw InputError("score: query image embedding has dimension " + std::to_string(xs.cols()) +
                     ", the index has " + std::to_string(image_encoder_.dim));
  return metric_ ? metric_->map(xs) : xs;
}

void SpecIndex::check_query(const float* x, Index x_size, const float* t, Index t_size,
                            bool weighted, QueryTerms& terms) const {
  const Index d = dx_, dt = dt_;
  if (x_size != d)
    throw InputError("score: query image embedding has dimension " + std::to_string(x_size) +
                     ", the index has " + std::to_string(d));
  const Eigen::Map<const Eigen::VectorXf> xv(x, x_size);
  if (!xv.allFinite()) throw InputError("score: query image embedding is not finite");
  const double x2 = xv.cast<double>().squaredNorm();
  terms.x_sqnorm = static_cast<float>(x2);
  terms.inv_x_norm = x2 > 0 ? 1.0 / std::sqrt(x2) : 0.0;
  terms.weighted = false;
  terms.inv_t_norm = 0;
  if (!weighted || t_size == 0) return;
  if (t_size != dt)
    throw InputError("score: pseudo-prompt embedding has dimension " + std::to_string(t_size) +
                     ", the index has " + std::to_string(dt));
  const Eigen::Map<const Eigen::VectorXf> tv(t, t_size);
  if (!tv.allFinite()) throw InputError("score: pseudo-prompt embedding is not finite");
  const double tn = tv.cast<double>().norm();
  if (tn > 0) {  // an all-zero pseudo-prompt says nothing: fall back to w = beta
    terms.weighted = true;
    terms.inv_t_norm = static_cast<float>(1.0 / tn);
  }
}

void SpecIndex::finish_models(std::size_t m_begin, std::size_t m_end, int count, const float* s,
                              const float* tdot, std::size_t ld, const QueryTerms* terms,
                              const ScoreOptions& options, double* out,
                              std::size_t out_stride, std::size_t out_first) const {
  const auto pa = static_cast<Index>(offsets_[m_begin]);
  const auto len = static_cast<Index>(offsets_[m_end]) - pa;
  Eigen::ArrayXf k_buffer(len), e_buffer(len);  // a model's r values, at the front
  std::vector<double> w;
  const float inv_tau = static_cast<float>(1.0 / options.tau);
  for (int q = 0; q < count; ++q) {
    const QueryTerms& qt = terms[q];
    const float* sq = s + static_cast<std::size_t>(q) * ld;
    const float* tq = tdot ? tdot + static_cast<std::size_t>(q) * ld : nullptr;
    const bool weights = options.scorer == Scorer::kWeighted && qt.weighted;
    double* row_out = out + static_cast<std::size_t>(q) * out_stride;
    // Elementwise work is done model by model (not over the whole block) so that a model's
    // score does not depend on where it sits in the index: SIMD lanes line up the same way.
    for (std::size_t m = m_begin; m < m_end; ++m) {
      const auto o = static_cast<Index>(offsets_[m]) - pa;
      const auto r = static_cast<Index>(offsets_[m + 1] - offsets_[m]);
      const auto mi = static_cast<Index>(m);
      auto k = k_buffer.head(r);
      auto e = e_buffer.head(r);
      // k_x(z_j, x) = exp(-gamma ||z_j - x||^2), ||z - x||^2 = ||z||^2 + ||x||^2 - 2 z.x.
      k = (-gamma_(mi) * (zx_sqnorm_.segment(pa + o, r).array() + qt.x_sqnorm -
                          2.0f * Eigen::Map<const Eigen::ArrayXf>(sq + o, r))
                             .max(0.0f))
              .exp();
      if (weights) {
        // log omega_j = log beta_j + (cos(z_j^t, t) - 1) / tau
        e = log_beta_.segment(pa + o, r).array() +
            (Eigen::Map<const Eigen::ArrayXf>(tq + o, r) * zt_inv_norm_.segment(pa + o, r).array() *
                 qt.inv_t_norm -
             1.0f) *
                inv_tau;
      }
      const float* kj = k.data();
      const float* bj = beta_.data() + pa + o;
      double score;
      if (options.scorer == Scorer::kNearest) {
        score = k.maxCoeff();
      } else if (!weights) {
        double lin = 0;
        for (Index j = 0; j < r; ++j) lin += static_cast<double>(bj[j]) * kj[j];
        score = 1.0 - 2.0 * lin + beta_k_beta_(mi);
      } else {
        // w = omega / sum omega, in log space against the model's largest exponent.
        const float emax = e.maxCoeff();
        if (!(emax > -std::numeric_limits<float>::infinity())) {
          score = 1.0;  // every beta_j is 0: the model's embedding is empty
        } else {
          w.resize(static_cast<std::size_t>(r));
          double total = 0;
          for (Index j = 0; j < r; ++j)
            total += (w[static_cast<std::size_t>(j)] = std::exp(static_cast<double>(e(j) - emax)));
          const double inv_total = 1.0 / total;
          double lin = 0, quad = 0;
          const float* gram = grams_.data() + gram_offsets_[m];
          for (Index j = 0; j < r; ++j) {
            const double wj = w[static_cast<std::size_t>(j)] * inv_total;
            const float* gj = gram + j * r;
            double a0 = 0, a1 = 0;
            Index l = 0;
            for (; l + 1 < r; l += 2) {
              a0 += static_cast<double>(gj[l]) * w[static_cast<std::size_t>(l)];
              a1 += static_cast<double>(gj[l + 1]) * w[static_cast<std::size_t>(l + 1)];
            }
            if (l < r) a0 += static_cast<double>(gj[l]) * w[static_cast<std::size_t>(l)];
            quad += wj * (a0 + a1) * inv_total;
            lin += wj * kj[j];
          }
          score = 1.0 - 2.0 * lin + quad;
        }
      }
      // An MMD^2 is >= 0; rounding may leave a hair below.
      if (options.scorer != Scorer::kNearest) score = std::max(score, 0.0);
      row_out[m - out_first] = score;
    }
  }
}

void SpecIndex::products(bool prompts, Index pa, Index len, const RowMatrix& qs, Index q0, Index count,
                         float* out, std::vector<float>& scratch) const {
  const Index cols = prompts ? dt_ : dx_;
  Eigen::Map<RowMatrix> result(out, count, len);
  // Columns [a, a + n) of the result, from those n points as float32 rows.
  const auto multiply = [&](const float* points, Index a, Index n) {
    const Eigen::Map<const RowMatrix> block(points, n, cols);
    if (count == 1) {  // one query: a matrix-vector product
      Eigen::Map<Eigen::VectorXf>(out + a, n).noalias() = block * qs.row(q0).transpose();
    } else {  // a chunk of queries: one GEMM reads the block once for all of them
      result.middleCols(a, n).noalias() = qs.middleRows(q0, count) * block.transpose();
    }
  };
  if (storage_ == SpecStorage::kF32) {
    multiply((prompts ? zt_ : zx_).row(pa).data(), 0, len);
    return;
  }
  // binary16: widened kHalfFloats numbers at a time into a buffer that stays in cache.
  const HalfArray& packed = prompts ? zt16_ : zx16_;
  const Index step = std::max<Index>(1, kHalfFloats / std::max<Index>(cols, 1));
  scratch.resize(static_cast<std::size_t>(std::min(step, len) * cols));
  for (Index a = 0; a < len; a += step) {
    const Index n = std::min(step, len - a);
    halves_to_floats(packed.data() + static_cast<std::size_t>((pa + a) * cols), scratch.data(),
                     static_cast<std::size_t>(n * cols));
    multiply(scratch.data(), a, n);
  }
}

void SpecIndex::load_points(bool prompts, Index p, Index n, float* out) const {
  const Index cols = prompts ? dt_ : dx_;
  const auto count = static_cast<std::size_t>(n * cols);
  if (storage_ == SpecStorage::kF32) {
    const float* from = (prompts ? zt_ : zx_).data() + p * cols;
    std::copy(from, from + count, out);
  } else {
    halves_to_floats((prompts ? zt16_ : zx16_).data() + static_cast<std::size_t>(p * cols), out, count);
  }
}

void SpecIndex::score_range(std::size_t m_begin, std::size_t m_end, const RowMatrix& xs,
                            const RowMatrix& ts, const QueryTerms* terms,
                            const ScoreOptions& options, double* out, std::size_t out_stride,
                            const BlockSink* sink) const {
  const Index queries = xs.rows();
  bool need_t = false;
  if (options.scorer == Scorer::kWeighted)
    for (Index q = 0; q < queries; ++q) need_t = need_t || terms[q].weighted;
  RowMatrix s, tdot;
  std::vector<float> scratch;
  std::vector<double> block_scores;
  std::size_t mb;
  for (std::size_t ma = m_begin; ma < m_end; ma = mb) {
    mb = ma + 1;
    while (mb < m_end && offsets_[mb + 1] - offsets_[ma] <= kBlockPoints) ++mb;
    const auto pa = static_cast<Index>(offsets_[ma]);
    const auto len = static_cast<Index>(offsets_[mb]) - pa;
    for (Index q0 = 0; q0 < queries; q0 += kQueryChunk) {
      const Index qc = std::min(kQueryChunk, queries - q0);
      s.resize(qc, len);
      products(false, pa, len, xs, q0, qc, s.data(), scratch);
      const float* s_ptr = s.data();
      const float* t_ptr = nullptr;
      if (need_t && (qc > 1 || terms[q0].weighted)) {
        tdot.resize(qc, len);
        products(true, pa, len, ts, q0, qc, tdot.data(), scratch);
        t_ptr = tdot.data();
      }
      if (sink != nullptr) {
        block_scores.resize(static_cast<std::size_t>(qc) * (mb - ma));
        finish_models(ma, mb, static_cast<int>(qc), s_ptr, t_ptr, static_cast<std::size_t>(len),
                      terms + q0, options, block_scores.data(), mb - ma, ma);
        (*sink)(ma, mb, q0, qc, block_scores.data());
      } else {
        finish_models(ma, mb, static_cast<int>(qc), s_ptr, t_ptr, static_cast<std::size_t>(len),
                      terms + q0, options, out + static_cast<std::size_t>(q0) * out_stride,
                      out_stride, 0);
      }
    }
  }
}

namespace {

// One vector as a 1 x n batch (an empty one as 0 x 0: no pseudo-prompt).
RowMatrix one_row(const Eigen::VectorXf& v) {
  return v.size() ? RowMatrix(Eigen::Map<const RowMatrix>(v.data(), 1, v.size())) : RowMatrix(0, 0);
}

}  // namespace

Eigen::VectorXd SpecIndex::score_all(const Eigen::VectorXf& x, const Eigen::VectorXf& t,
                                     const ScoreOptions& options) const {
  return score_all_batch(Eigen::Map<const RowMatrix>(x.data(), 1, x.size()), one_row(t), options).row(0).transpose();
}

void SpecIndex::prepare(const RowMatrix& xs, const RowMatrix& ts, const ScoreOptions& options,
                        Prepared& p) const {
  const Index queries = xs.rows();
  const bool weighted = options.scorer == Scorer::kWeighted;
  const bool have_t = weighted && ts.size() > 0;
  if (have_t && ts.rows() != queries)
    throw InputError("score: " + std::to_string(queries) + " query images but " +
                     std::to_string(ts.rows()) + " pseudo-prompts");
  // With a metric, queries are mapped first (a non-finite query stays non-finite).
  if (metric_) p.mapped = map_queries(xs);
  p.qx = metric_ ? &p.mapped : &xs;
  p.terms.assign(static_cast<std::size_t>(queries), QueryTerms{});
  for (Index q = 0; q < queries; ++q)
    check_query(p.qx->row(q).data(), p.qx->cols(), have_t ? ts.row(q).data() : nullptr,
                have_t ? ts.cols() : 0, weighted, p.terms[static_cast<std::size_t>(q)]);
  p.prompts = have_t ? &ts : &p.no_prompts;
  p.work = static_cast<double>(points()) * static_cast<double>(queries) *
           static_cast<double>(dx_ + (have_t ? dt_ : 0));
}

RowMatrixD SpecIndex::score_all_batch(const RowMatrix& xs, const RowMatrix& ts,
                                      const ScoreOptions& options) const {
  check_options(options);
  const Index queries = xs.rows();
  const auto models = static_cast<Index>(size());
  RowMatrixD out(queries, models);
  if (models == 0 || queries == 0) return out;
  Prepared p;
  prepare(xs, ts, options, p);
  switch (options.scorer) {
    case Scorer::kPopularity:
      out.rowwise() = downloads_.transpose();
      return out;
    case Scorer::kMean: {
      out = (*p.qx * mean_unit_.transpose()).cast<double>();
      for (Index q = 0; q < queries; ++q)
        out.row(q) *= p.terms[static_cast<std::size_t>(q)].inv_x_norm;
      return out;
    }
    default:
      break;
  }
  for_model_ranges(offsets_, p.work, [&](std::size_t m_begin, std::size_t m_end) {
    score_range(m_begin, m_end, *p.qx, *p.prompts, p.terms.data(), options, out.data(),
                static_cast<std::size_t>(models));
  });
  return out;
}

std::vector<RankedModel> SpecIndex::rank(const Eigen::VectorXf& x, const Eigen::VectorXf& t,
                                         const ScoreOptions& options) const {
  return rank_batch(Eigen::Map<const RowMatrix>(x.data(), 1, x.size()), one_row(t), options).front();
}

std::vector<std::vector<RankedModel>> SpecIndex::rank_batch(const RowMatrix& xs,
                                                            const RowMatrix& ts,
                                                            const ScoreOptions& options,
                                                            const std::vector<bool>* exclude) const {
  if (exclude && exclude->size() != size())
    throw InputError("rank: the exclusion mask has " + std::to_string(exclude->size()) + " flags for " +
                     std::to_string(size()) + " models");
  check_options(options);
  const Index queries = xs.rows();
  const bool asc = ascending(options.scorer);
  const bool per_model_pass = options.scorer != Scorer::kMean && options.scorer != Scorer::kPopularity;
  if (options.top_k <= 0 || !per_model_pass || size() == 0 || queries == 0) {
    // Every model wanted, or a scorer without a per-model pass (one small product): whole.
    const RowMatrixD scores = score_all_batch(xs, ts, options);
    std::vector<std::vector<RankedModel>> out;
    out.reserve(static_cast<std::size_t>(queries));
    for (Index q = 0; q < queries; ++q)
      out.push_back(top_k(scores.row(q).transpose(), model_ids_, asc, options.top_k, exclude));
    return out;
  }
  Prepared p;
  prepare(xs, ts, options, p);
  const std::size_t k = std::min(size(), static_cast<std::size_t>(options.top_k));
  std::vector<BoundedTopK> best(static_cast<std::size_t>(queries), BoundedTopK(k, asc, model_ids_));
  std::mutex merge_mutex;
  for_model_ranges(offsets_, p.work, [&](std::size_t m_begin, std::size_t m_end) {
    std::vector<BoundedTopK> local(static_cast<std::size_t>(queries), BoundedTopK(k, asc, model_ids_));
    const BlockSink sink = [&](std::size_t ma, std::size_t mb, Index q0, Index count, const double* scores) {
      const std::size_t width = mb - ma;
      for (Index q = 0; q < count; ++q) {
        BoundedTopK& top = local[static_cast<std::size_t>(q0 + q)];
        const double* row = scores + static_cast<std::size_t>(q) * width;
        for (std::size_t m = ma; m < mb; ++m)
          if (!exclude || !(*exclude)[m]) top.offer(row[m - ma], m);
      }
    };
    score_range(m_begin, m_end, *p.qx, *p.prompts, p.terms.data(), options, nullptr, 0, &sink);
    std::lock_guard lock(merge_mutex);
    for (std::size_t q = 0; q < local.size(); ++q) best[q].merge(local[q]);
  });
  std::vector<std::vector<RankedModel>> out;
  out.reserve(best.size());
  for (const auto& b : best) out.push_back(b.ranked());
  return out;
}

bool ranks_ahead(const RankedModel& a, const RankedModel& b, bool ascending) {
  const bool na = std::isnan(a.score), nb = std::isnan(b.score);
  if (na != nb) return nb;
  if (!na && a.score != b.score) return ascending ? a.score < b.score : a.score > b.score;
  return a.model < b.model;
}

std::vector<RankedModel> top_k(const Eigen::VectorXd& scores, const std::vector<std::string>& ids,
                               bool ascending, int k, const std::vector<bool>* exclude) {
  if (static_cast<std::size_t>(scores.size()) != ids.size())
    throw InputError("top_k: " + std::to_string(scores.size()) + " scores for " +
                     std::to_string(ids.size()) + " model ids");
  if (exclude && exclude->size() != ids.size())
    throw InputError("top_k: " + std::to_string(exclude->size()) + " exclusion flags for " +
                     std::to_string(ids.size()) + " model ids");
  std::vector<std::size_t> order;
  order.reserve(ids.size());
  for (std::size_t m = 0; m < ids.size(); ++m)
    if (!exclude || !(*exclude)[m]) order.push_back(m);
  const std::size_t n = order.size();
  const std::size_t keep = k <= 0 ? n : std::min(n, static_cast<std::size_t>(k));
  // NaN never ranks ahead of a number.
  auto better = [&](std::size_t a, std::size_t b) {
    const double sa = scores(static_cast<Index>(a)), sb = scores(static_cast<Index>(b));
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return nb;
    if (!na && sa != sb) return ascending ? sa < sb : sa > sb;
    return ids[a] < ids[b];
  };
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    better);
  std::vector<RankedModel> out;
  out.reserve(keep);
  for (std::size_t i = 0; i < keep; ++i)
    out.push_back({ids[order[i]], scores(static_cast<Index>(order[i]))});
  return out;
}

}  // namespace gmi
