#pragma once
/// Batching policy in work units (tasks, or images for embed): how many pending tasks the
/// next batch takes, and how a batch's images are cut into encoder passes. Pure functions,
/// so the policy is tested without sockets.
#include <cstddef>
#include <vector>

namespace gmi::workers {

/// How many tasks from the front of `charges` (each task's units, in arrival order) one
/// batch of at most `max_units` takes: as many as fit, and always at least one (a task larger
/// than a whole batch runs alone; the stage cuts it into passes).
std::size_t tasks_for_batch(const std::vector<int>& charges, int max_units);

/// Images [first, first + count) of task `task`.
struct ImageRange {
  std::size_t task = 0;
  std::size_t first = 0;
  std::size_t count = 0;
  bool operator==(const ImageRange&) const = default;
};

/// Cuts the images of a batch (counts[i] images for task i, in order) into passes of at most
/// `max_images` images each: the images of different tasks share a pass, and a large task
/// spans several. Only one pass's pixels need to be unpacked at a time.
std::vector<std::vector<ImageRange>> image_passes(const std::vector<std::size_t>& counts,
                                                  std::size_t max_images);

}  // namespace gmi::workers
