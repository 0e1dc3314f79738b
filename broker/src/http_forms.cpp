// HTTP form parsing for the gateway: multipart/form-data (RFC 7578, RFC 2046), query strings.
#include "http_forms.hpp"

#include <algorithm>
#include <string>

namespace gmi::http {
namespace {

// Part headers are a few short lines; a bound keeps a body of one endless header line from
// being scanned as headers.
constexpr std::size_t kMaxPartHeaderBytes = std::size_t{16} * 1024;
// RFC 2046 section 5.1.1: a boundary is 1 to 70 characters.
constexpr std::size_t kMaxBoundaryLength = 70;

char to_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowercase(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = to_lower(c);
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (to_lower(a[i]) != to_lower(b[i])) return false;
  return true;
}

bool is_ows(char c) { return c == ' ' || c == '\t'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_ows(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ows(s.back())) s.remove_suffix(1);
  return s;
}

/// A header value of the form `type; name=value; name="quoted \" value"`: the type, and the
/// parameters with their names lowercased, in order.
struct HeaderValue {
  std::string_view type;
  std::vector<std::pair<std::string, std::string>> parameters;

  const std::string* parameter(std::string_view name) const {
    for (const auto& [n, v] : parameters)
      if (n == name) return &v;
    return nullptr;
  }
};

// `what` names the header in messages ("the Content-Type", "part 2's Content-Disposition").
HeaderValue parse_header_value(std::string_view value, const std::string& what) {
  HeaderValue out;
  std::size_t i = value.find(';');
  out.type = trim(value.substr(0, i));
  while (i < value.size()) {
    ++i;  // past ';'
    while (i < value.size() && is_ows(value[i])) ++i;
    if (i == value.size()) break;   // a trailing ';'
    if (value[i] == ';') continue;  // an empty parameter (";;")
    const std::size_t eq = value.find_first_of("=;", i);
    if (eq == std::string_view::npos || value[eq] != '=')
      throw FormError(what + " has a parameter without a value: \"" +
                      std::string(trim(value.substr(i, eq - i))) + "\"");
    std::string name = lowercase(trim(value.substr(i, eq - i)));
    if (name.empty()) throw FormError(what + " has a parameter without a name");
    i = eq + 1;
    while (i < value.size() && is_ows(value[i])) ++i;
    std::string parsed;
    if (i < value.size() && value[i] == '"') {
      // RFC 9110 quoted-string, except that a backslash escapes only '"' and '\\': browsers
      // do not escape backslashes in file names (they send a quote as %22), so that
      // "C:\\dir\\a.jpg" arrives as written.
      ++i;
      bool closed = false;
      while (i < value.size()) {
        const char c = value[i++];
        if (c == '"') {
          closed = true;
          break;
        }
        if (c == '\\' && i < value.size() && (value[i] == '"' || value[i] == '\\')) {
          parsed += value[i++];
        } else {
          parsed += c;
        }
      }
      if (!closed) throw FormError(what + " has an unterminated quoted value for \"" + name + "\"");
      while (i < value.size() && is_ows(value[i])) ++i;
      if (i < value.size() && value[i] != ';')
        throw FormError(what + " has text after the quoted value of \"" + name + "\"");
    } else {
      const std::size_t end = value.find(';', i);
      parsed = std::string(trim(value.substr(i, end - i)));
      i = end;
    }
    out.parameters.emplace_back(std::move(name), std::move(parsed));
  }
  return out;
}

std::string_view media_type(std::string_view content_type) {
  return trim(content_type.substr(0, content_type.find(';')));
}

/// What follows "--boundary" at some position of the body.
enum class After {
  kPart,          ///< padding and a line end: a part's headers follow
  kClose,         ///< "--": the close delimiter
  kNotDelimiter,  ///< other text: the boundary string is part of some content
  kTruncated,     ///< the body ends before it can tell
};

// `pos` is just past "--boundary"; on kPart it becomes the start of the part's headers.
After classify_after_boundary(std::string_view body, std::size_t& pos) {
  if (pos == body.size()) return After::kTruncated;
  if (body[pos] == '-') {
    if (pos + 1 == body.size()) return After::kTruncated;
    return body[pos + 1] == '-' ? After::kClose : After::kNotDelimiter;
  }
  std::size_t i = pos;
  while (i < body.size() && is_ows(body[i])) ++i;  // RFC 2046 transport padding
  if (i == body.size()) return After::kTruncated;
  if (body[i] == '\r') {
    if (i + 1 == body.size()) return After::kTruncated;
    if (body[i + 1] != '\n') return After::kNotDelimiter;
    ++i;
  }
  if (body[i] != '\n') return After::kNotDelimiter;
  pos = i + 1;
  return After::kPart;
}

/// A delimiter found: where the content before it ends, and what it is.
struct Delimiter {
  std::size_t content_end;  ///< the position of its leading CRLF (or of "--" at offset 0)
  std::size_t next;         ///< past the delimiter line (the next part's headers) on kPart
  After kind;               ///< kPart or kClose
};

// The next "\r\n--boundary" at or after `from` that really is a delimiter; nullopt when the
// body ends first. A string_view find per candidate, each resuming past the last one, keeps
// the scan linear in the body.
std::optional<Delimiter> next_delimiter(std::string_view body, std::string_view crlf_delimiter,
                                        std::size_t from) {
  while (true) {
    const std::size_t at = body.find(crlf_delimiter, from);
    if (at == std::string_view::npos) return std::nullopt;
    std::size_t pos = at + crlf_delimiter.size();
    const After kind = classify_after_boundary(body, pos);
    if (kind == After::kTruncated) return std::nullopt;
    if (kind != After::kNotDelimiter) return Delimiter{at, pos, kind};
    from = at + 1;
  }
}

// Reads one part's headers from `pos` (just past its delimiter line) into `part`; `pos`
// becomes the start of its content.
void parse_part_headers(std::string_view body, std::size_t& pos, std::size_t number,
                        FormPart& part) {
  const std::string label = "part " + std::to_string(number);
  const std::size_t start = pos;
  bool has_disposition = false;
  while (true) {
    // Look for the line end only within what is left of the header allowance.
    const std::size_t used = pos - start;
    const std::size_t window = std::min(body.size() - pos, kMaxPartHeaderBytes - used);
    const std::size_t nl = body.substr(pos, window).find('\n');
    if (nl == std::string_view::npos) {
      if (window == body.size() - pos)
        throw FormError("the body ends inside the headers of " + label);
      throw FormError(label + " has headers over 16 KiB");
    }
    std::string_view line = body.substr(pos, nl);
    pos += nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) break;  // the blank line before the content
    // Obsolete line folding (RFC 9112 section 5.2): read as a header of its own, a folded
    // Content-Disposition would lose its filename without a word.
    if (is_ows(line.front())) throw FormError(label + " has a folded header line");

    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) throw FormError(label + " has a header line without ':'");
    const std::string_view name = trim(line.substr(0, colon));
    const std::string_view value = trim(line.substr(colon + 1));
    if (iequals(name, "Content-Disposition")) {
      // Two of them would leave the part's name to whichever one a reader picks.
      if (has_disposition) throw FormError(label + " has two Content-Disposition headers");
      has_disposition = true;
      const HeaderValue disposition = parse_header_value(value, label + "'s Content-Disposition");
      if (!iequals(disposition.type, "form-data"))
        throw FormError(label + "'s Content-Disposition is \"" + std::string(disposition.type) +
                        "\", not form-data");
      if (const std::string* n = disposition.parameter("name")) part.name = *n;
      if (const std::string* f = disposition.parameter("filename")) part.filename = *f;
      if (part.name.empty()) throw FormError(label + " has no Content-Disposition name");
    } else if (iequals(name, "Content-Type")) {
      part.content_type = std::string(value);
    }
  }
  if (!has_disposition) throw FormError(label + " has no Content-Disposition: form-data");
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::optional<std::string> multipart_boundary(std::string_view content_type) {
  if (!iequals(media_type(content_type), "multipart/form-data")) return std::nullopt;
  const HeaderValue value = parse_header_value(content_type, "the Content-Type");
  const std::string* boundary = value.parameter("boundary");
  if (!boundary) throw FormError("the multipart/form-data Content-Type has no boundary");
  if (boundary->empty()) throw FormError("the multipart/form-data boundary is empty");
  if (boundary->size() > kMaxBoundaryLength)
    throw FormError("the multipart/form-data boundary is over 70 characters");
  return *boundary;
}

bool is_multipart(std::string_view content_type) {
  constexpr std::string_view kPrefix = "multipart/";
  const std::string_view type = media_type(content_type);
  return type.size() >= kPrefix.size() && iequals(type.substr(0, kPrefix.size()), kPrefix);
}

std::vector<FormPart> parse_multipart(std::string_view body, std::string_view boundary,
                                      std::size_t max_parts) {
  const std::string crlf_delimiter = "\r\n--" + std::string(boundary);
  const std::string_view dash_boundary = std::string_view(crlf_delimiter).substr(2);

  // The first delimiter opens the body, or ends a preamble (then with its CRLF before it).
  std::optional<Delimiter> delimiter;
  if (body.substr(0, dash_boundary.size()) == dash_boundary) {
    std::size_t pos = dash_boundary.size();
    const After kind = classify_after_boundary(body, pos);
    if (kind == After::kTruncated) throw FormError("the body ends before the closing boundary");
    if (kind != After::kNotDelimiter) delimiter = Delimiter{0, pos, kind};
  }
  if (!delimiter) delimiter = next_delimiter(body, crlf_delimiter, 0);
  if (!delimiter) throw FormError("the body has no opening multipart boundary");

  std::vector<FormPart> parts;
  while (delimiter->kind == After::kPart) {
    if (parts.size() == max_parts)
      throw FormError("the multipart body has more than " + std::to_string(max_parts) + " parts");
    FormPart& part = parts.emplace_back();
    std::size_t pos = delimiter->next;
    parse_part_headers(body, pos, parts.size(), part);
    // Empty content puts the next delimiter's CRLF right at `pos`, so search from there.
    delimiter = next_delimiter(body, crlf_delimiter, pos);
    if (!delimiter) throw FormError("the body ends before the closing boundary");
    part.content = body.substr(pos, delimiter->content_end - pos);
  }
  return parts;  // anything after the close delimiter is epilogue, ignored
}

std::string percent_decode(std::string_view text, bool plus_is_space) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '%') {
      const int hi = i + 1 < text.size() ? hex_value(text[i + 1]) : -1;
      const int lo = i + 2 < text.size() ? hex_value(text[i + 2]) : -1;
      if (hi < 0 || lo < 0)
        throw FormError("bad percent-escape \"" + std::string(text.substr(i, 3)) +
                        "\": a '%' must be followed by two hex digits");
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else if (c == '+' && plus_is_space) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> parse_query(std::string_view query) {
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t start = 0;
  while (start <= query.size()) {
    const std::size_t end = std::min(query.find('&', start), query.size());
    const std::string_view piece = query.substr(start, end - start);
    if (!piece.empty()) {
      const std::size_t eq = piece.find('=');
      std::string key = percent_decode(piece.substr(0, eq), true);
      std::string value =
          eq == std::string_view::npos ? std::string() : percent_decode(piece.substr(eq + 1), true);
      out.emplace_back(std::move(key), std::move(value));
    }
    start = end + 1;
  }
  return out;
}

}  // namespace gmi::http
