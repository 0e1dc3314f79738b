#include "gmi/workers/batching.hpp"

#include <algorithm>

namespace gmi::workers {

std::size_t tasks_for_batch(const std::vector<int>& charges, int max_units) {
  std::size_t n = 0;
  long long units = 0;
  for (int c : charges) {
    const long long cost = std::max(c, 1);
    if (n > 0 && units + cost > max_units) break;
    units += cost;
    ++n;
    if (units >= max_units) break;
  }
  return n;
}

std::vector<std::vector<ImageRange>> image_passes(const std::vector<std::size_t>& counts,
                                                  std::size_t max_images) {
  max_images = std::max<std::size_t>(max_images, 1);
  std::vector<std::vector<ImageRange>> passes;
  std::vector<ImageRange> current;
  std::size_t room = max_images;
  for (std::size_t t = 0; t < counts.size(); ++t) {
    std::size_t first = 0;
    while (first < counts[t]) {
      const std::size_t take = std::min(room, counts[t] - first);
      current.push_back(ImageRange{t, first, take});
      first += take;
      room -= take;
      if (room == 0) {
        passes.push_back(std::move(current));
        current.clear();
        room = max_images;
      }
    }
  }
  if (!current.empty()) passes.push_back(std::move(current));
  return passes;
}

}  // namespace gmi::workers
