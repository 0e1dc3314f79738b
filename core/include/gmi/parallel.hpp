#pragma once
/// A minimal fork-join loop for CPU-bound batch work (decode + embed of many images).
#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

namespace gmi {

/// Threads to use when the caller says 0: the hardware's, at least 1.
inline int default_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

/// Calls fn(i) for i in [0, n) on `threads` threads. fn must not throw; catch inside.
template <class Fn>
void parallel_for(std::size_t n, int threads, Fn&& fn) {
  threads = std::max(1, std::min<int>(threads <= 0 ? default_threads() : threads, static_cast<int>(n)));
  if (threads <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (std::size_t i; (i = next.fetch_add(1)) < n;) fn(i);
    });
  for (auto& th : pool) th.join();
}

}  // namespace gmi
