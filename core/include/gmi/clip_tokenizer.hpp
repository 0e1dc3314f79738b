#pragma once
/// CLIP's byte-level BPE tokenizer (the "simple tokenizer" of CLIP and open_clip), for CLIP
/// text encoders and for turning captioner output back into text.
///
/// Text is cleaned as CLIP cleans it, minus ftfy (NFC normalisation stands in for it):
/// NFC, HTML-unescaped twice (Python's html.unescape), stripped, whitespace runs collapsed to
/// one space, lower-cased (full Unicode mapping, as Python's str.lower()); then split by
/// CLIP's pre-tokenisation pattern, and each piece's UTF-8 bytes merged by the BPE ranks.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace gmi {

/// A CLIP tokenizer: the vocabulary and merge ranks of one merges file.
/// Thread-safe after construction: every method is const and uses no cache or other
/// mutable state, so one instance may be shared by any number of threads.
class ClipTokenizer {
 public:
  /// CLIP reads at most this many merges (49,152 - 256 - 2), giving 49,408 ids.
  static constexpr int kMaxMerges = 48894;
  /// CLIP's text context length.
  static constexpr int kContextLength = 77;

  /// Reads a merges file in the format of CLIP's `bpe_simple_vocab_16e6.txt.gz`, gzipped or
  /// plain: a header line (ignored), then one merge "a b" per line; only the first
  /// kMaxMerges are used. Throws InputError naming the file (and line) when the file is
  /// missing, empty, neither gzip nor UTF-8 text, or has a line without exactly two symbols.
  static ClipTokenizer from_file(const std::string& path);

  /// The same from the (decompressed) file contents; `name` is used in error messages.
  static ClipTokenizer from_merges_text(std::string_view text, const std::string& name);

  /// The ids of `text`, without start and end. Invalid UTF-8 in `text` reads as U+FFFD.
  std::vector<int> encode(std::string_view text) const;

  /// [start] + encode(text) + [end]; when `context` > 0 and that is longer, the first
  /// `context` ids with the last replaced by end (open_clip's rule). Never padded.
  std::vector<int> encode_with_specials(std::string_view text, int context = kContextLength) const;

  /// The text of `ids`: start and end dropped, "</w>" read as a space, trailing spaces
  /// removed, invalid UTF-8 replaced by U+FFFD. Throws InputError for an id out of range.
  std::string decode(const std::vector<int>& ids) const;

  int vocab_size() const { return static_cast<int>(vocab_.size()); }
  int start_id() const { return vocab_size() - 2; }
  int end_id() const { return vocab_size() - 1; }
  /// The vocabulary entry of `id` (byte characters, as in the merges file). Throws for a bad id.
  const std::string& token(int id) const;

 private:
  ClipTokenizer() = default;
  std::vector<int> bpe(std::vector<int> word) const;

  struct Merge {
    int rank;
    int result;  // the id of the concatenation
  };
  std::vector<std::string> vocab_;                // id -> token (UTF-8)
  std::unordered_map<std::uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
  int byte_id_[256] = {};                          // the id of each byte as a word's inner symbol
  int byte_end_id_[256] = {};                      // ... and as its last one (with "</w>")
};

/// `ids` padded with 0 up to `context` (what a CLIP text encoder's input tensor holds);
/// longer input is returned unchanged.
std::vector<int> pad_to(std::vector<int> ids, int context);

/// The text CLIP tokenizes: `text` after the cleaning steps above. For tests and diagnostics.
std::string clip_clean_text(std::string_view text);

/// The pieces CLIP's pre-tokenisation pattern finds in already cleaned text.
std::vector<std::string> clip_pre_tokenize(std::string_view cleaned);

}  // namespace gmi
