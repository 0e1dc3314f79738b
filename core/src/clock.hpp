#pragma once
// Wall-clock time as the specs and metrics record it.
#include <ctime>
#include <string>

namespace gmi::detail {

/// Now, as ISO-8601 UTC to the second ("2026-12-01T10:00:00Z").
inline std::string utc_now_iso8601() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace gmi::detail
