// HTTP form parsing for the gateway: multipart/form-data bodies, query strings, percent-escapes.
#pragma once
// Beast parses framing only, so the gateway parses what is inside a body itself. Everything
// here is a pure function of its input, free of I/O, and safe to call from any thread.
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gmi::http {

/// A malformed form, query string or Content-Type: the message says what is wrong, for a 400.
class FormError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// One part of a multipart/form-data body (RFC 7578). `content` is a view into the body
/// passed to parse_multipart: valid while that body lives.
struct FormPart {
  std::string name;          ///< from Content-Disposition: form-data; name="..."
  std::string filename;      ///< from filename="..." (empty when absent)
  std::string content_type;  ///< the part's Content-Type (empty when absent)
  std::string_view content;
};

/// The boundary of a "multipart/form-data; boundary=..." Content-Type value (media type
/// compared case-insensitively, boundary quoted or not, parameters in any order);
/// nullopt when the type is not multipart/form-data. FormError when it is multipart/form-data
/// but has no boundary, or an empty/over-70-character one (RFC 2046).
std::optional<std::string> multipart_boundary(std::string_view content_type);

/// True when the media type (before any ';') is multipart/<anything>, case-insensitive.
bool is_multipart(std::string_view content_type);

/// Splits a multipart/form-data body into its parts, in order. Tolerates a preamble before
/// the first delimiter and an epilogue after the close delimiter, CRLF line ends (also
/// accept bare LF in part headers), header names case-insensitive, parameters quoted or
/// token, backslash escapes inside quoted strings. FormError (with a message naming what is
/// wrong, e.g. "part 3 has no Content-Disposition name", "the body ends before the closing
/// boundary") for: no first delimiter, a part without a form-data Content-Disposition or
/// without name, part headers over 16 KiB, a missing close delimiter, more than max_parts parts.
/// Linear time in the body size, no copy of part contents.
std::vector<FormPart> parse_multipart(std::string_view body, std::string_view boundary,
                                      std::size_t max_parts);

/// Percent-decoding; `plus_is_space` for application/x-www-form-urlencoded and query strings.
/// FormError on a '%' not followed by two hex digits.
std::string percent_decode(std::string_view text, bool plus_is_space);

/// A query string ("a=1&b=x%20y&c", without the '?'), decoded, in order; "c" alone is ("c","").
/// Empty pieces ("a=1&&b=2") are skipped. FormError on bad escapes.
std::vector<std::pair<std::string, std::string>> parse_query(std::string_view query);

}  // namespace gmi::http
