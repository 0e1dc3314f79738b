#pragma once
/// Interrogators turn a query image's embedding into a pseudo-prompt embedding t^.
/// With no cross-modal encoder, they learn the image -> prompt map from the hub itself.
/// Thread-safety: const methods are reentrant.
#include <memory>
#include <string>

#include "gmi/scoring.hpp"

namespace gmi {

class Interrogator {
 public:
  virtual ~Interrogator() = default;
  virtual std::string name() const = 0;
  /// Pseudo-prompt embeddings for each row of xs (B x d) -> B x dt.
  virtual RowMatrix pseudo_prompts(const RowMatrix& xs) const = 0;
};

/// t^ = sum_j a_j zt_j / ||zt_j|| over the k reduced points (all models) nearest to x,
/// a_j proportional to k_x(zx_j, x). Holds a reference to `index`: keep it alive.
std::unique_ptr<Interrogator> make_neighbour_interrogator(const SpecIndex& index, int k = 16);

/// Ridge regression from zx to zt over all reduced points (beta-weighted).
std::unique_ptr<Interrogator> make_ridge_interrogator(const SpecIndex& index, double alpha = 1e-2);

/// "neighbour" | "ridge"; throws InputError otherwise.
std::unique_ptr<Interrogator> make_interrogator(const std::string& name, const SpecIndex& index);

}  // namespace gmi
