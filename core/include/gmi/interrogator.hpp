#pragma once
/// Interrogators give a query image a pseudo-prompt embedding t^. The embedding-based ones
/// work from the image embedding (and so run after embed): `neighbour` and `ridge` learn the
/// image -> prompt map from the hub itself; `prompt-bank` ranks a bank of prompts in a
/// cross-modal (CLIP) space. `captioner` works from the decoded image: a captioning network
/// writes a caption, which the text encoder then embeds (so it runs before embed).
/// Thread-safety: const methods are reentrant.
#include <memory>
#include <string>
#include <vector>

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
/// Holds a reference to `index`: keep it alive.
std::unique_ptr<Interrogator> make_ridge_interrogator(const SpecIndex& index, double alpha = 1e-2);

/// "neighbour" | "ridge"; throws InputError otherwise.
std::unique_ptr<Interrogator> make_interrogator(const std::string& name, const SpecIndex& index);

/// What an interrogator works from, which fixes where it sits on a query's route.
enum class InterrogatorInput {
  kImageEmbedding,  ///< neighbour, ridge, prompt-bank: after embed
  kImage,           ///< captioner: before embed (embed then embeds its captions)
};
/// The names gmi knows: neighbour, ridge, prompt-bank, captioner.
const std::vector<std::string>& interrogator_names();
/// InputError naming the known ones for any other name.
InterrogatorInput interrogator_input(const std::string& name);
/// True for the interrogators learnt from the hub (neighbour, ridge).
bool hub_learned_interrogator(const std::string& name);

/// Prompt-bank interrogation in a shared image-text space. `bank` holds one (L2-normalised)
/// text embedding per bank prompt, in the space of the image embeddings `xs`. For each row x:
/// s_j = cos(x, b_j); over the top_k prompts by s_j (all when top_k >= bank rows), weights
/// w_j = softmax(s_j / tau); t^ = sum_j w_j b_j / ||sum_j w_j b_j||. A zero mix stays zero.
/// InputError when the dims differ, top_k < 1 or tau <= 0.
RowMatrix prompt_bank_pseudo_prompts(const RowMatrix& xs, const RowMatrix& bank, int top_k, double tau);
/// The same as an Interrogator holding its bank (embedded once, by the caller).
std::unique_ptr<Interrogator> make_prompt_bank_interrogator(RowMatrix bank, int top_k, double tau);
/// The prompts of a bank file: one per line, blank lines and lines starting with '#' skipped,
/// surrounding whitespace trimmed. Throws InputError (empty bank) or IoError (unreadable).
std::vector<std::string> read_prompt_bank(const std::string& path);

}  // namespace gmi
