#include "gmi/files.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <random>
#include <system_error>

#include "gmi/error.hpp"
#include "unique_fd.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void throw_io(const std::string& what, const std::string& path, int err) {
  throw IoError(what + " " + path + ": " + std::generic_category().message(err));
}

void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, std::min<std::size_t>(size, std::size_t{1} << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("cannot write", path, errno);
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

}  // namespace

void fsync_dir(const std::string& dir) {
  detail::UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) throw_io("cannot open directory", dir, errno);
  // Some filesystems cannot sync a directory; the rename itself has still happened.
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != ENOTSUP) throw_io("cannot sync directory", dir, errno);
}

void write_file_atomically(const std::string& target, const std::function<void(const FileWrite& write)>& fill) {
  const fs::path path(target);
  const std::string dir = path.has_parent_path() ? path.parent_path().string() : std::string(".");
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string tmp;
  int raw_fd = -1;
  for (int attempt = 0; attempt < 100 && raw_fd < 0; ++attempt) {
    // A leading '.' and no suffix of its own: a listing never mistakes it for the real file.
    tmp = (fs::path(dir) / ("." + path.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                            std::to_string(rng())))
              .string();
    raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (raw_fd < 0 && errno != EEXIST) throw_io("cannot create", tmp, errno);
  }
  if (raw_fd < 0) throw_io("cannot create a temporary file for", target, EEXIST);
  detail::UniqueFd fd(raw_fd);
  try {
    fill([&](const void* data, std::size_t size) { write_all(fd.get(), data, size, tmp); });
    if (::fsync(fd.get()) != 0) throw_io("cannot sync", tmp, errno);
    if (fd.close() != 0) throw_io("cannot write", tmp, errno);
    if (::rename(tmp.c_str(), target.c_str()) != 0) throw_io("cannot replace", target, errno);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(dir);
}

void write_file_atomically(const std::string& target, const void* data, std::size_t size) {
  write_file_atomically(target, [&](const FileWrite& write) { write(data, size); });
}

}  // namespace gmi
