#pragma once
/// Structured logs: one JSON object per line on stderr
///   {"ts":"2026-11-26T09:40:01.123Z","level":"info","proc":"broker","msg":"job finished",
///    "job_id":"...","stage":"score"}
/// or, with format "text", "2026-11-26T09:40:01.123Z info broker: job finished job_id=... ".
/// Thread-safety: safe from any thread (one write(2) per line).
#include <string>

#include <nlohmann/json.hpp>

namespace gmi::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

/// Process-wide settings. level: "debug"|"info"|"warn"|"error"; format: "json"|"text".
/// InputError on an unknown level or format.
void configure(const std::string& process_name, const std::string& level,
               const std::string& format);

bool enabled(Level level);
void write(Level level, const std::string& message, const nlohmann::json& fields = {});

inline void debug(const std::string& m, const nlohmann::json& f = {}) { write(Level::kDebug, m, f); }
inline void info(const std::string& m, const nlohmann::json& f = {}) { write(Level::kInfo, m, f); }
inline void warn(const std::string& m, const nlohmann::json& f = {}) { write(Level::kWarn, m, f); }
inline void error(const std::string& m, const nlohmann::json& f = {}) { write(Level::kError, m, f); }

}  // namespace gmi::log
