#pragma once
/// Manifests: one JSON object per line, {"image": "<path relative to the manifest>",
/// "prompt": "<text>", ...}. Also used for query batches (where "prompt" is optional and
/// every other field is kept).
/// Thread-safety: free functions, reentrant.
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace gmi {

struct ManifestEntry {
  int line = 0;                      ///< 1-based line number in the file
  std::filesystem::path image;       ///< resolved against the manifest's directory
  std::string prompt;
  nlohmann::json fields;             ///< the whole line, as read
};

/// A problem with one line; the line is skipped, the rest still read.
struct ManifestIssue {
  int line = 0;
  std::string message;
};

struct Manifest {
  std::vector<ManifestEntry> entries;
  std::vector<ManifestIssue> issues;
  std::vector<int> blank_lines;  ///< 1-based numbers of blank lines (skipped, not issues)
};

/// Reads a manifest. Blank lines are skipped (and listed in blank_lines). Lines that are not JSON objects, lack a
/// string "image" (or, when `require_prompt`, a string "prompt"), or hold absolute /
/// escaping paths when `confine` is set, become issues. Throws IoError if the file cannot
/// be opened.
Manifest read_manifest(const std::filesystem::path& path, bool require_prompt, bool confine = false);

}  // namespace gmi
