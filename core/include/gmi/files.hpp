#pragma once
/// Durable local files: the directory spec store, segment snapshots and their manifests.
#include <cstddef>
#include <functional>
#include <string>

namespace gmi {

/// Appends bytes to the file being written.
using FileWrite = std::function<void(const void* data, std::size_t size)>;

/// Replaces `target` so that readers see the old file or the whole new one, and the new one
/// survives a crash once this returns: `fill` writes the contents through its argument into a
/// temporary file beside the target (".<name>.tmp-<pid>-<random>"), which is fsynced, renamed
/// over the target, and the directory fsynced. The temporary file is removed when anything
/// fails. Throws IoError naming the file.
void write_file_atomically(const std::string& target, const std::function<void(const FileWrite& write)>& fill);
void write_file_atomically(const std::string& target, const void* data, std::size_t size);

/// fsync of a directory (after a rename or an unlink in it); a filesystem that cannot sync
/// directories is not an error. Throws IoError.
void fsync_dir(const std::string& dir);

}  // namespace gmi
