#pragma once
// What scoring.cpp and two_stage.cpp share: a query's terms, a prepared batch, a bounded top-k
// and a parallel loop that rethrows.
#include <algorithm>
#include <cmath>
#include <exception>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/parallel.hpp"
#include "gmi/scoring.hpp"

namespace gmi {

struct SpecIndex::QueryTerms {
  float x_sqnorm = 0;
  double inv_x_norm = 0;  // 0 for a zero query
  float inv_t_norm = 0;
  bool weighted = false;  // a usable pseudo-prompt: otherwise the weighted scorer uses beta
};

struct SpecIndex::Prepared {
  RowMatrix mapped;  // the queries in the metric's space (an index with a metric)
  const RowMatrix* qx = nullptr;
  RowMatrix no_prompts;
  const RowMatrix* prompts = nullptr;
  std::vector<QueryTerms> terms;
  double work = 0;  // multiply-adds of the per-model pass
};

namespace scoring_detail {

// Throws InputError for options no scorer accepts.
inline void check_options(const ScoreOptions& options) {
  if (options.scorer == Scorer::kWeighted && (!(options.tau > 0) || std::isnan(options.tau)))
    throw InputError("score: options.tau must be positive (got " + std::to_string(options.tau) +
                     ")");
}

// parallel_for for a fn that may throw: every call runs, then the first exception (by index)
// is rethrown on the caller's thread.
template <class Fn>
void parallel_for_rethrow(std::size_t n, int threads, const Fn& fn) {
  std::vector<std::exception_ptr> errors(n);
  parallel_for(n, threads, [&](std::size_t i) {
    try {
      fn(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  });
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// The best k of the scores offered, in top_k's order (NaN last, then by score, then by
// model id): a heap whose front is the worst kept, so most offers cost one comparison.
class BoundedTopK {
 public:
  BoundedTopK(std::size_t k, bool ascending, const std::vector<std::string>& ids)
      : k_(k), better_{ascending, &ids} {
    heap_.reserve(k);
  }

  void offer(double score, std::size_t model) {
    const Entry e{score, model};
    if (heap_.size() < k_) {
      heap_.push_back(e);
      std::push_heap(heap_.begin(), heap_.end(), better_);
    } else if (k_ > 0 && better_(e, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), better_);
      heap_.back() = e;
      std::push_heap(heap_.begin(), heap_.end(), better_);
    }
  }

  void merge(const BoundedTopK& other) {
    for (const auto& e : other.heap_) offer(e.score, e.model);
  }

  std::vector<RankedModel> ranked() const {
    std::vector<Entry> sorted = heap_;
    std::sort(sorted.begin(), sorted.end(), better_);
    std::vector<RankedModel> out;
    out.reserve(sorted.size());
    for (const auto& e : sorted) out.push_back({(*better_.ids)[e.model], e.score});
    return out;
  }

 private:
  struct Entry {
    double score;
    std::size_t model;
  };
  struct Better {
    bool ascending;
    const std::vector<std::string>* ids;
    bool operator()(const Entry& a, const Entry& b) const {
      const bool na = std::isnan(a.score), nb = std::isnan(b.score);
      if (na != nb) return nb;
      if (!na && a.score != b.score) return ascending ? a.score < b.score : a.score > b.score;
      return (*ids)[a.model] < (*ids)[b.model];
    }
  };

  std::size_t k_;
  Better better_;
  std::vector<Entry> heap_;
};

}  // namespace scoring_detail
}  // namespace gmi
