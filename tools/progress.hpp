#pragma once
/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
/// Thread-safe: tick() may be called from worker threads.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>

namespace gmi::cli {

class ProgressBar {
 public:
  ProgressBar(std::string label, std::size_t total, bool enabled = ::isatty(2) != 0)
      : label_(std::move(label)), total_(total), enabled_(enabled && total > 0),
        start_(std::chrono::steady_clock::now()) {}
  ~ProgressBar() { finish(); }

  void tick(std::size_t n = 1) {
    std::lock_guard<std::mutex> lock(mu_);
    done_ += n;
    auto now = std::chrono::steady_clock::now();
    if (enabled_ && (done_ == total_ || now - last_ > std::chrono::milliseconds(100))) {
      last_ = now;
      draw(now);
    }
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mu_);
    if (enabled_ && !finished_) {
      draw(std::chrono::steady_clock::now());
      std::fputc('\n', stderr);
    }
    finished_ = true;
  }

 private:
  void draw(std::chrono::steady_clock::time_point now) {
    constexpr int kWidth = 30;
    double f = total_ ? static_cast<double>(done_) / total_ : 1.0;
    int filled = static_cast<int>(f * kWidth);
    double secs = std::chrono::duration<double>(now - start_).count();
    double eta = f > 0 ? secs * (1 - f) / f : 0;
    std::fprintf(stderr, "\r%-14s [%s%s] %zu/%zu %5.1fs eta %4.0fs", label_.c_str(),
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(), done_,
                 total_, secs, eta);
    std::fflush(stderr);
  }

  std::mutex mu_;
  std::string label_;
  std::size_t total_, done_ = 0;
  bool enabled_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_{};
};

}  // namespace gmi::cli
