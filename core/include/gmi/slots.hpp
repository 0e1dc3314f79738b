#pragma once
/// Named payload slots (protocol v2, schemas/README.md "Slots"): what a task carries into a
/// stage and a result carries out, by name instead of by frame position. A slot's header
/// entry is {"name", "kind", "frames", ...the kind's fields}; its frames follow the header in
/// slot order. Kinds:
///   image_bytes  one frame per encoded image (JPEG/PNG bytes as the client sent them)
///   pixels       one frame per decoded RGB8 image; "images": [{"index", "width", "height"}]
///   rows         one frame of float32 rows; "rows", "cols", optional "encoder" {name, version,
///   dim} text         one frame per UTF-8 string
/// The broker carries the slots a job accumulates along its route, so a stage reads what it
/// needs by name and does not care which stage wrote it.
/// Thread-safety: values; no shared state.
#include <cstddef>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/error.hpp"

namespace gmi::wire {

/// The slot names the stages use.
namespace slot {
inline constexpr const char* kImages = "images";                     ///< image_bytes: the input
inline constexpr const char* kPixels = "pixels";                     ///< pixels: decode's output
inline constexpr const char* kImageEmbeddings = "image_embeddings";  ///< rows: embed's output
inline constexpr const char* kPromptEmbeddings =
    "prompt_embeddings";                                         ///< rows: an upload's prompts
inline constexpr const char* kCaptions = "captions";             ///< text: a captioner's output
inline constexpr const char* kPseudoPrompts = "pseudo_prompts";  ///< rows: t^ per query image
}  // namespace slot

enum class SlotKind { kImageBytes, kPixels, kRows, kText };
std::string_view to_string(SlotKind kind);

/// A slot that is malformed, missing, or of another kind than a reader needs. Not retryable;
/// the message names the slot.
class SlotError : public InputError {
 public:
  using InputError::InputError;
};

/// One named payload.
struct Slot {
  std::string name;
  SlotKind kind = SlotKind::kText;
  nlohmann::json info =
      nlohmann::json::object();  ///< the kind's fields (images / rows, cols, encoder)
  std::vector<std::string> frames;
};

/// The slots of one task or result, in order, names unique.
class Slots {
 public:
  /// nullptr when there is no slot `name`.
  const Slot* find(const std::string& name) const;
  Slot* find(const std::string& name);
  /// The slot `name` of `kind`; SlotError naming it when it is missing or of another kind.
  const Slot& get(const std::string& name, SlotKind kind) const;
  /// Adds `s`, replacing a slot of the same name.
  void put(Slot s);
  void erase(const std::string& name);
  /// Every slot of `other` put here (same names replaced).
  void merge(Slots other);
  const std::vector<Slot>& all() const { return slots_; }
  bool empty() const { return slots_.empty(); }
  std::size_t frame_count() const;
  std::size_t byte_count() const;

  /// The header entries ({"name", "kind", "frames", ...}), in order.
  nlohmann::json describe() const;
  /// describe() and views of the frames of the slots named in `names` (all when null):
  /// what a message needs to send them, without copying them first. The views live as long
  /// as these slots are not changed.
  nlohmann::json describe_views(const std::vector<std::string>* names, std::vector<std::string_view>& out) const;
  /// The same slots restricted to `names` (all when `names` is null).
  Slots only(const std::vector<std::string>* names) const;
  /// Appends every frame (copies) in slot order.
  void append_frames(std::vector<std::string>& out) const;
  /// Appends every frame (moves) in slot order; the slots keep their entries, not their frames.
  void move_frames(std::vector<std::string>& out);

  /// Reads the slots that `list` describes from frames[first, first + frames_in(list)).
  /// SlotError naming the slot: an unknown kind, a duplicate name, a kind's field missing or
  /// wrong, frames that do not fit what the entry says. The frames are moved out.
  static Slots read(const nlohmann::json& list, std::vector<std::string>& frames,
                    std::size_t first);
  /// Sum of the entries' "frames" (the header validator checked their types).
  static std::size_t frames_in(const nlohmann::json& list);

 private:
  std::vector<Slot> slots_;
};

/// A slot of `kind`: parses "image_bytes" | "pixels" | "rows" | "text".
std::optional<SlotKind> parse_slot_kind(std::string_view text);

/// What one task costs a worker's credit (protocol "credit_slot"): the number of frames of
/// its slot `credit_slot` (at least 1), or 1 when `credit_slot` is empty (credit counts
/// tasks) or the task has no such slot.
int task_cost(const Slots& slots, const std::string& credit_slot);
/// The credit a task of `cost` is charged when the worker has `credit` left: the cost when it
/// fits; all that is left when the task is larger than the worker's whole batch and the
/// worker holds nothing else (`idle`), so that a big task runs alone; 0 when it cannot go now.
int credit_charge(int cost, int credit, bool idle);

}  // namespace gmi::wire
