// Structured logs on stderr (see log.hpp): one line per call, written with one write(2) so
// that lines from several threads or processes sharing stderr never interleave.
#include "gmi/log.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <set>

#include "gmi/error.hpp"

namespace gmi::log {
namespace {

enum class Format { kJson, kText };

struct Settings {
  std::string process = "gmi";
  Format format = Format::kText;
};

// The level is read on every call (enabled()), so it is an atomic; the rest changes only at
// start-up and is copied under the mutex.
std::atomic<int> g_level{static_cast<int>(Level::kInfo)};
std::mutex g_mutex;
Settings& settings() {
  // Leaked on purpose: threads may still log while static destructors run at exit.
  static Settings* s = new Settings();
  return *s;
}

const char* level_name(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarn:
      return "warn";
    case Level::kError:
      return "error";
  }
  return "info";
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string timestamp() {
  using namespace std::chrono;
  auto now = system_clock::now();
  std::time_t secs = system_clock::to_time_t(now);
  auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  if (ms < 0) ms += 1000;  // before 1970: to_time_t rounds towards zero
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];  // sized for any int fields, so the compiler can prove no truncation
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return buf;
}

// Invalid UTF-8 (a file name, a peer's bytes) becomes U+FFFD instead of throwing: a log call
// must never be the thing that fails.
std::string dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

bool is_reserved(const std::string& key) {
  return key == "ts" || key == "level" || key == "proc" || key == "msg";
}

// Text format: control characters escaped so that one call stays one line.
void append_escaped(std::string& out, const std::string& s) {
  for (unsigned char c : s) {
    switch (c) {
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
}

bool needs_quotes(const std::string& s) {
  if (s.empty()) return true;
  return std::any_of(s.begin(), s.end(), [](unsigned char c) {
    return c <= 0x20 || c == 0x7f || c == '"' || c == '=';
  });
}

std::string text_value(const nlohmann::json& v) {
  if (!v.is_string()) return dump(v);
  const auto& s = v.get_ref<const std::string&>();
  if (needs_quotes(s)) return dump(v);  // JSON quoting escapes quotes and control characters
  std::string out;
  append_escaped(out, s);
  return out;
}

std::string format_json(const std::string& ts, Level level, const std::string& proc,
                        const std::string& message, const nlohmann::json& fields) {
  std::string line = "{\"ts\":\"" + ts + "\",\"level\":\"" + level_name(level) +
                     "\",\"proc\":" + dump(proc) + ",\"msg\":" + dump(message);
  auto add = [&](std::string key, const nlohmann::json& value, std::set<std::string>& used) {
    // A field must not shadow ts/level/proc/msg: log processors key on those.
    while (is_reserved(key) || used.count(key) != 0) key = "field_" + key;
    used.insert(key);
    line += ',';
    line += dump(key);
    line += ':';
    line += dump(value);
  };
  std::set<std::string> used;
  if (fields.is_object()) {
    for (const auto& [k, v] : fields.items()) add(k, v, used);
  } else if (!fields.is_null()) {
    add("fields", fields, used);
  }
  line += "}\n";
  return line;
}

std::string format_text(const std::string& ts, Level level, const std::string& proc,
                        const std::string& message, const nlohmann::json& fields) {
  std::string line = ts + " " + level_name(level) + " ";
  append_escaped(line, proc);
  line += ": ";
  append_escaped(line, message);
  if (fields.is_object()) {
    for (const auto& [k, v] : fields.items()) {
      line += " ";
      append_escaped(line, k);
      line += '=';
      line += text_value(v);
    }
  } else if (!fields.is_null()) {
    line += " fields=";
    line += text_value(fields);
  }
  line += "\n";
  return line;
}

void write_all(const std::string& line) {
  const char* p = line.data();
  std::size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // stderr closed or full: nowhere left to report it
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

}  // namespace

void configure(const std::string& process_name, const std::string& level,
               const std::string& format) {
  std::string l = lower(level);
  Level parsed;
  if (l == "debug") {
    parsed = Level::kDebug;
  } else if (l == "info") {
    parsed = Level::kInfo;
  } else if (l == "warn" || l == "warning") {
    parsed = Level::kWarn;
  } else if (l == "error") {
    parsed = Level::kError;
  } else {
    throw InputError("unknown log level \"" + level + "\" (expected debug, info, warn or error)");
  }
  std::string f = lower(format);
  Format parsed_format;
  if (f == "json") {
    parsed_format = Format::kJson;
  } else if (f == "text") {
    parsed_format = Format::kText;
  } else {
    throw InputError("unknown log format \"" + format + "\" (expected json or text)");
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  settings().process = process_name;
  settings().format = parsed_format;
  g_level.store(static_cast<int>(parsed), std::memory_order_relaxed);
}

bool enabled(Level level) {
  return static_cast<int>(level) >= g_level.load(std::memory_order_relaxed);
}

void write(Level level, const std::string& message, const nlohmann::json& fields) {
  if (!enabled(level)) return;
  try {
    Settings s;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      s = settings();
    }
    std::string ts = timestamp();
    write_all(s.format == Format::kJson ? format_json(ts, level, s.process, message, fields)
                                        : format_text(ts, level, s.process, message, fields));
  } catch (...) {
    // Out of memory or similar: dropping one log line beats failing the caller, which is
    // often already handling an error.
  }
}

}  // namespace gmi::log
