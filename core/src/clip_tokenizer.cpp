#include "gmi/clip_tokenizer.hpp"

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string_view>

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include "gmi/error.hpp"

namespace gmi {
namespace {

// ------------------------------------------------------------------ UTF-8

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::string to_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

constexpr char32_t kReplacement = 0xFFFD;

/// Decodes UTF-8; each maximal ill-formed subpart becomes one U+FFFD (as Python's
/// errors="replace" does). `first_error`, when given, receives the byte offset of the first
/// ill-formed sequence (or npos).
std::u32string from_utf8(std::string_view s, size_t* first_error = nullptr) {
  std::u32string out;
  out.reserve(s.size());
  if (first_error) *first_error = std::string_view::npos;
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out += static_cast<char32_t>(b0);
      ++i;
      continue;
    }
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    }
    char32_t c = len == 2 ? (b0 & 0x1F) : len == 3 ? (b0 & 0x0F) : (b0 & 0x07);
    int got = 1;
    while (len > 0 && got < len && i + got < n) {
      const auto b = static_cast<unsigned char>(s[i + got]);
      const unsigned char l = got == 1 ? lo : 0x80, h = got == 1 ? hi : 0xBF;
      if (b < l || b > h) break;
      c = (c << 6) | (b & 0x3F);
      ++got;
    }
    if (len > 0 && got == len) {
      out += c;
    } else {
      if (first_error && *first_error == std::string_view::npos) *first_error = i;
      out += kReplacement;
    }
    i += static_cast<size_t>(got);
  }
  return out;
}

// ------------------------------------------------------------------ character classes

/// Python's str.isspace(): what str.strip() removes.
bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

/// The `regex` module's \s (CLIP's whitespace_clean and pattern): isspace() minus U+001C..1F.
bool is_regex_space(char32_t c) { return is_py_space(c) && !(c >= 0x1C && c <= 0x1F); }

bool is_letter(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_L_MASK) != 0; }
bool is_number(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_N_MASK) != 0; }

/// U+0345 (a combining mark that case-folds to the letter iota) falls in no class of CLIP's
/// case-insensitive pattern: `regex` neither counts it as \p{L} nor as [^\s\p{L}\p{N}].
bool is_unmatched(char32_t c) { return is_regex_space(c) || c == 0x0345; }

bool is_other(char32_t c) { return !is_unmatched(c) && !is_letter(c) && !is_number(c); }

// ------------------------------------------------------------------ html.unescape

struct HtmlEntity {
  std::string_view name;
  std::string_view value;
};
struct HtmlNumericFix {
  char32_t code;
  std::string_view value;
};
#include "html_entities.inc"

const std::string_view* find_entity(std::u32string_view name) {
  std::string key;
  for (char32_t c : name) {
    if (c >= 0x80) return nullptr;  // every entity name is ASCII
    key += static_cast<char>(c);
  }
  const auto* end = std::end(kHtmlEntities);
  const auto* it = std::lower_bound(std::begin(kHtmlEntities), end, key,
                                    [](const HtmlEntity& e, const std::string& k) { return e.name < k; });
  return it != end && it->name == key ? &it->value : nullptr;
}

void append_numeric_reference(std::u32string& out, char32_t num) {
  for (const auto& fix : kHtmlInvalidCharrefs)
    if (fix.code == num) {
      out += from_utf8(fix.value);
      return;
    }
  if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
    out += kReplacement;
    return;
  }
  if (std::binary_search(std::begin(kHtmlInvalidCodepoints), std::end(kHtmlInvalidCodepoints), num)) return;
  out += num;
}

bool is_ascii_digit(char32_t c) { return c >= '0' && c <= '9'; }
int hex_value(char32_t c) {
  if (c >= '0' && c <= '9') return static_cast<int>(c - '0');
  if (c >= 'a' && c <= 'f') return static_cast<int>(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return static_cast<int>(c - 'A' + 10);
  return -1;
}

/// Python's html.unescape: the references matched by
/// &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?), replaced as it replaces them.
std::u32string html_unescape(const std::u32string& s) {
  if (s.find(U'&') == std::u32string::npos) return s;
  std::u32string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    if (s[i] != U'&') {
      out += s[i++];
      continue;
    }
    size_t j = i + 1;
    if (j < n && s[j] == U'#') {
      size_t k = j + 1;
      const bool hex = k < n && (s[k] == U'x' || s[k] == U'X') && k + 1 < n && hex_value(s[k + 1]) >= 0;
      if (!hex && !(k < n && is_ascii_digit(s[k]))) {
        out += s[i++];
        continue;
      }
      if (hex) ++k;
      char32_t num = 0;  // saturates just past the last code point: all that matters beyond
      while (k < n && (hex ? hex_value(s[k]) >= 0 : is_ascii_digit(s[k]))) {
        const char32_t d = hex ? static_cast<char32_t>(hex_value(s[k])) : s[k] - U'0';
        num = std::min<char32_t>(num * (hex ? 16 : 10) + d, 0x110000);
        ++k;
      }
      if (k < n && s[k] == U';') ++k;
      append_numeric_reference(out, num);
      i = k;
      continue;
    }
    static constexpr std::u32string_view kNameStop = U"\t\n\f <&#;";
    size_t k = j;
    while (k < n && k - j < 32 && kNameStop.find(s[k]) == std::u32string_view::npos) ++k;
    if (k == j) {
      out += s[i++];
      continue;
    }
    if (k < n && s[k] == U';') ++k;
    const std::u32string_view ref(s.data() + j, k - j);
    if (const auto* value = find_entity(ref)) {
      out += from_utf8(*value);
    } else {
      // The longest known prefix of at least two characters, the rest kept as text.
      bool found = false;
      for (size_t len = ref.size() - 1; len >= 2 && len < ref.size(); --len) {
        if (const auto* v = find_entity(ref.substr(0, len))) {
          out += from_utf8(*v);
          out += ref.substr(len);
          found = true;
          break;
        }
      }
      if (!found) {
        out += U'&';
        out += ref;
      }
    }
    i = k;
  }
  return out;
}

// ------------------------------------------------------------------ cleaning

icu::UnicodeString to_icu(const std::u32string& s) {
  return icu::UnicodeString::fromUTF32(reinterpret_cast<const UChar32*>(s.data()), static_cast<int32_t>(s.size()));
}

std::u32string from_icu(const icu::UnicodeString& u) {
  std::u32string out(static_cast<size_t>(u.countChar32()), U'\0');
  UErrorCode status = U_ZERO_ERROR;
  u.toUTF32(reinterpret_cast<UChar32*>(out.data()), static_cast<int32_t>(out.size()), status);
  return out;
}

std::u32string nfc(const std::u32string& s) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* norm = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) throw Error(std::string("ICU NFC normaliser unavailable: ") + u_errorName(status));
  icu::UnicodeString out = norm->normalize(to_icu(s), status);
  if (U_FAILURE(status)) throw Error(std::string("ICU NFC normalisation failed: ") + u_errorName(status));
  return from_icu(out);
}

/// Full lower-casing, context (final sigma) included, as Python's str.lower().
std::u32string lower(const std::u32string& s) {
  icu::UnicodeString u = to_icu(s);
  u.toLower(icu::Locale::getRoot());
  return from_icu(u);
}

std::u32string strip(const std::u32string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_py_space(s[b])) ++b;
  while (e > b && is_py_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::u32string collapse_spaces(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (is_regex_space(s[i])) {
      out += U' ';
      while (i < s.size() && is_regex_space(s[i])) ++i;
    } else {
      out += s[i++];
    }
  }
  return out;
}

std::u32string clean(std::string_view text) {
  std::u32string s = nfc(from_utf8(text));
  s = strip(html_unescape(html_unescape(s)));
  return lower(strip(collapse_spaces(s)));
}

// ------------------------------------------------------------------ pre-tokenisation

constexpr std::string_view kStart = "<|startoftext|>";
constexpr std::string_view kEnd = "<|endoftext|>";

/// One character of the case-insensitive pattern: the `regex` module's simple case folding
/// also matches U+017F (long s) to 's'.
bool matches_ci(char32_t c, char p) {
  if (c == static_cast<unsigned char>(p)) return true;
  if (p >= 'a' && p <= 'z' && c == static_cast<char32_t>(p - 'a' + 'A')) return true;
  return p == 's' && c == 0x017F;
}

/// The length of `literal` matched case-insensitively at s[i], or 0.
size_t match_literal(const std::u32string& s, size_t i, std::string_view literal) {
  if (s.size() - i < literal.size()) return 0;
  for (size_t k = 0; k < literal.size(); ++k)
    if (!matches_ci(s[i + k], literal[k])) return 0;
  return literal.size();
}

/// The pieces of CLIP's pattern in `s`, as [begin, end) offsets; characters no alternative
/// matches (whitespace) are skipped, as re.findall skips them.
std::vector<std::pair<size_t, size_t>> pre_tokenize(const std::u32string& s) {
  static constexpr std::string_view kContractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  std::vector<std::pair<size_t, size_t>> pieces;
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    size_t len = match_literal(s, i, kStart);
    if (!len) len = match_literal(s, i, kEnd);
    for (size_t k = 0; !len && s[i] == U'\'' && k < std::size(kContractions); ++k)
      len = match_literal(s, i, kContractions[k]);
    if (!len) {
      auto run = [&](bool (*in_class)(char32_t)) {
        size_t e = i;
        while (e < n && in_class(s[e])) ++e;
        return e - i;
      };
      if (is_letter(s[i])) {
        len = run(is_letter);
      } else if (is_number(s[i])) {
        len = 1;
      } else if (is_other(s[i])) {
        len = run(is_other);
      }
    }
    if (len) {
      pieces.emplace_back(i, i + len);
      i += len;
    } else {
      ++i;
    }
  }
  return pieces;
}

// ------------------------------------------------------------------ the byte alphabet

/// CLIP's bytes_to_unicode, in vocabulary order: the printable Latin-1 bytes as themselves,
/// then every other byte, in increasing order, as U+0100 onwards.
struct ByteAlphabet {
  unsigned char byte_at[256];  // vocabulary position -> byte
  char32_t char_of[256];       // byte -> its character
  short byte_from[256 + 68];   // character -> its byte, or -1
  ByteAlphabet() {
    auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
    int pos = 0;
    for (int b = 0; b < 256; ++b)
      if (printable(b)) {
        byte_at[pos++] = static_cast<unsigned char>(b);
        char_of[b] = static_cast<char32_t>(b);
      }
    int extra = 0;
    for (int b = 0; b < 256; ++b)
      if (!printable(b)) {
        byte_at[pos++] = static_cast<unsigned char>(b);
        char_of[b] = static_cast<char32_t>(256 + extra++);
      }
    std::fill(std::begin(byte_from), std::end(byte_from), static_cast<short>(-1));
    for (int b = 0; b < 256; ++b) byte_from[char_of[b]] = static_cast<short>(b);
  }
  /// The byte of a byte character, or -1.
  int byte_of(char32_t c) const { return c < std::size(byte_from) ? byte_from[c] : -1; }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

std::uint64_t pair_key(int a, int b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}

// ------------------------------------------------------------------ reading the file

bool is_gzip(std::string_view data) {
  return data.size() >= 2 && static_cast<unsigned char>(data[0]) == 0x1F && static_cast<unsigned char>(data[1]) == 0x8B;
}

std::string gunzip(std::string_view data, const std::string& path) {
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) throw Error("zlib: inflateInit2 failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  std::string out;
  char buf[1 << 16];
  int rc = Z_OK;
  for (;;) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof buf;
    rc = inflate(&zs, Z_NO_FLUSH);
    out.append(buf, sizeof buf - zs.avail_out);
    if (rc == Z_STREAM_END) {
      // Concatenated gzip members read as one stream, as Python's gzip does.
      const std::string_view rest(reinterpret_cast<const char*>(zs.next_in), zs.avail_in);
      if (!is_gzip(rest)) break;
      inflateReset(&zs);
      continue;
    }
    if (rc != Z_OK) break;
    if (zs.avail_in == 0 && zs.avail_out != 0) {
      rc = Z_BUF_ERROR;  // the input ended inside the stream
      break;
    }
  }
  inflateEnd(&zs);
  if (rc != Z_STREAM_END) throw InputError("merges file " + path + ": corrupt or truncated gzip data");
  return out;
}

int line_of(std::string_view text, size_t offset) {
  return 1 + static_cast<int>(std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(offset), '\n'));
}

}  // namespace

// ------------------------------------------------------------------ ClipTokenizer

ClipTokenizer ClipTokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open merges file " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw InputError("cannot read merges file " + path);
  std::string data = ss.str();
  if (is_gzip(data)) data = gunzip(data, path);
  return from_merges_text(data, path);
}

ClipTokenizer ClipTokenizer::from_merges_text(std::string_view text, const std::string& name) {
  const std::string where = "merges file " + name;
  if (text.empty()) throw InputError(where + ": empty file");
  if (size_t nul = text.find('\0'); nul != std::string_view::npos)
    throw InputError(where + ":" + std::to_string(line_of(text, nul)) + ": not a text file (NUL byte)");
  size_t bad = 0;
  from_utf8(text, &bad);
  if (bad != std::string_view::npos)
    throw InputError(where + ":" + std::to_string(line_of(text, bad)) + ": not UTF-8 text");

  std::vector<std::string_view> lines;
  for (size_t b = 0;;) {
    const size_t e = text.find('\n', b);
    if (e == std::string_view::npos) {
      if (b < text.size()) lines.push_back(text.substr(b));  // a final newline starts no line
      break;
    }
    lines.push_back(text.substr(b, e - b));
    b = e + 1;
  }

  const ByteAlphabet& abc = alphabet();
  ClipTokenizer t;
  for (int pos = 0; pos < 256; ++pos) t.vocab_.push_back(to_utf8(std::u32string(1, abc.char_of[abc.byte_at[pos]])));
  for (int pos = 0; pos < 256; ++pos) t.vocab_.push_back(t.vocab_[static_cast<size_t>(pos)] + "</w>");

  std::vector<std::pair<std::string, std::string>> merges;
  const size_t count = std::min(lines.empty() ? 0 : lines.size() - 1, static_cast<size_t>(kMaxMerges));
  for (size_t k = 1; k <= count; ++k) {
    // Split on whitespace as Python's str.split() does.
    std::vector<std::string> symbols;
    std::u32string symbol;
    for (char32_t c : from_utf8(lines[k]) + U" ") {
      if (is_py_space(c)) {
        if (!symbol.empty()) symbols.push_back(to_utf8(symbol));
        symbol.clear();
      } else {
        symbol += c;
      }
    }
    if (symbols.size() != 2)
      throw InputError(where + ":" + std::to_string(k + 1) + ": expected a merge of two symbols \"a b\", found " +
                       std::to_string(symbols.size()));
    t.vocab_.push_back(symbols[0] + symbols[1]);
    merges.emplace_back(std::move(symbols[0]), std::move(symbols[1]));
  }
  t.vocab_.emplace_back(kStart);
  t.vocab_.emplace_back(kEnd);

  // Symbols are ids; a string listed twice means its last id, as in CLIP's dict-built encoder,
  // so that id equality is string equality.
  std::unordered_map<std::string, int> id_of;
  id_of.reserve(t.vocab_.size());
  for (size_t id = 0; id < t.vocab_.size(); ++id) id_of[t.vocab_[id]] = static_cast<int>(id);
  for (int pos = 0; pos < 256; ++pos) {
    t.byte_id_[abc.byte_at[pos]] = id_of.at(t.vocab_[static_cast<size_t>(pos)]);
    t.byte_end_id_[abc.byte_at[pos]] = id_of.at(t.vocab_[static_cast<size_t>(pos + 256)]);
  }
  t.merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = id_of.find(a), ib = id_of.find(b);
    if (ia == id_of.end() || ib == id_of.end()) continue;  // a symbol no word can hold
    t.merges_[pair_key(ia->second, ib->second)] = Merge{static_cast<int>(rank), id_of.at(a + b)};
  }
  return t;
}

const std::string& ClipTokenizer::token(int id) const {
  if (id < 0 || id >= vocab_size())
    throw InputError("token id " + std::to_string(id) + " is outside the vocabulary (0.." +
                     std::to_string(vocab_size() - 1) + ")");
  return vocab_[static_cast<size_t>(id)];
}

std::vector<int> ClipTokenizer::bpe(std::vector<int> word) const {
  // CLIP's loop: merge every occurrence (left to right, not overlapping) of the lowest-ranked
  // adjacent pair, until no adjacent pair is a merge. Quadratic in the piece's length, as CLIP's.
  std::vector<int> next;
  while (word.size() > 1) {
    const Merge* best = nullptr;
    std::uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const std::uint64_t key = pair_key(word[i], word[i + 1]);
      auto it = merges_.find(key);
      if (it != merges_.end() && (!best || it->second.rank < best->rank)) {
        best = &it->second;
        best_key = key;
      }
    }
    if (!best) break;
    next.clear();
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && pair_key(word[i], word[i + 1]) == best_key) {
        next.push_back(best->result);
        i += 2;
      } else {
        next.push_back(word[i++]);
      }
    }
    word.swap(next);
  }
  return word;
}

std::vector<int> ClipTokenizer::encode(std::string_view text) const {
  const std::u32string cleaned = clean(text);
  std::vector<int> ids;
  for (const auto& [b, e] : pre_tokenize(cleaned)) {
    const std::string piece = to_utf8(std::u32string_view(cleaned).substr(b, e - b));
    if (piece == kStart || piece == kEnd) {
      ids.push_back(piece == kStart ? start_id() : end_id());
      continue;
    }
    std::vector<int> word;
    word.reserve(piece.size());
    for (size_t i = 0; i < piece.size(); ++i) {
      const auto byte = static_cast<unsigned char>(piece[i]);
      word.push_back(i + 1 < piece.size() ? byte_id_[byte] : byte_end_id_[byte]);
    }
    for (int id : bpe(std::move(word))) ids.push_back(id);
  }
  return ids;
}

std::vector<int> ClipTokenizer::encode_with_specials(std::string_view text, int context) const {
  std::vector<int> ids{start_id()};
  for (int id : encode(text)) ids.push_back(id);
  ids.push_back(end_id());
  if (context > 0 && ids.size() > static_cast<size_t>(context)) {
    ids.resize(static_cast<size_t>(context));
    ids.back() = end_id();
  }
  return ids;
}

std::string ClipTokenizer::decode(const std::vector<int>& ids) const {
  const ByteAlphabet& abc = alphabet();
  std::string bytes;
  for (int id : ids) {
    const std::string& tok = token(id);
    if (id == start_id() || id == end_id()) continue;
    for (char32_t c : from_utf8(tok)) {
      const int b = abc.byte_of(c);
      if (b >= 0) {
        bytes += static_cast<char>(b);
      } else {
        append_utf8(bytes, c);  // not a byte character (only in an unusual merges file): as is
      }
    }
  }
  std::string text = to_utf8(from_utf8(bytes));
  std::string out;
  out.reserve(text.size());
  static constexpr std::string_view kWordEnd = "</w>";
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, kWordEnd.size(), kWordEnd) == 0) {
      out += ' ';
      i += kWordEnd.size();
    } else {
      out += text[i++];
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

std::vector<int> pad_to(std::vector<int> ids, int context) {
  if (context > 0 && ids.size() < static_cast<size_t>(context)) ids.resize(static_cast<size_t>(context), 0);
  return ids;
}

std::string clip_clean_text(std::string_view text) { return to_utf8(clean(text)); }

std::vector<std::string> clip_pre_tokenize(std::string_view cleaned) {
  const std::u32string s = from_utf8(cleaned);
  std::vector<std::string> out;
  for (const auto& [b, e] : pre_tokenize(s)) out.push_back(to_utf8(std::u32string_view(s).substr(b, e - b)));
  return out;
}

}  // namespace gmi
