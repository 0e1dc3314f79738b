// The gateway's form parsing: multipart/form-data bodies, their Content-Type, query strings.
#include "http_forms.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <string_view>

namespace gmi {
namespace {

using http::FormError;
using http::FormPart;
using http::is_multipart;
using http::multipart_boundary;
using http::parse_multipart;
using http::parse_query;
using http::percent_decode;

using namespace std::string_literals;  // "..."s keeps embedded NUL bytes

// Runs `f`, which must throw FormError with a message containing `expected`.
void expect_form_error(const std::function<void()>& f, const std::string& expected) {
  try {
    f();
    ADD_FAILURE() << "no FormError; expected one saying \"" << expected << "\"";
  } catch (const FormError& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos)
        << "message \"" << e.what() << "\" does not contain \"" << expected << "\"";
  }
}

// A part as a client writes it: delimiter line, headers, blank line, content.
std::string part(const std::string& boundary, const std::string& headers,
                 const std::string& content) {
  return "--" + boundary + "\r\n" + headers + "\r\n" + content + "\r\n";
}

std::string close(const std::string& boundary) { return "--" + boundary + "--\r\n"; }

std::string disposition(const std::string& name) {
  return "Content-Disposition: form-data; name=\"" + name + "\"\r\n";
}

// ---- multipart_boundary, is_multipart

TEST(HttpFormsBoundary, ReadsTokenAndQuotedBoundariesWithParametersInAnyOrder) {
  EXPECT_EQ(multipart_boundary("multipart/form-data; boundary=abc123"), "abc123");
  EXPECT_EQ(multipart_boundary("multipart/form-data; boundary=\"a b:c\""), "a b:c");
  EXPECT_EQ(multipart_boundary("multipart/form-data;charset=utf-8;boundary=\"x\\\"y\""), "x\"y");
  EXPECT_EQ(multipart_boundary("multipart/form-data; BOUNDARY=q ; charset=utf-8"), "q");
  EXPECT_EQ(multipart_boundary("  Multipart/Form-Data ; boundary=Z"), "Z");
}

TEST(HttpFormsBoundary, IsNulloptForOtherMediaTypes) {
  EXPECT_EQ(multipart_boundary("image/jpeg"), std::nullopt);
  EXPECT_EQ(multipart_boundary("multipart/mixed; boundary=abc"), std::nullopt);
  EXPECT_EQ(multipart_boundary("application/x-www-form-urlencoded"), std::nullopt);
  EXPECT_EQ(multipart_boundary(""), std::nullopt);
}

TEST(HttpFormsBoundary, RejectsMissingEmptyAndOverlongBoundaries) {
  expect_form_error([] { multipart_boundary("multipart/form-data"); }, "has no boundary");
  expect_form_error([] { multipart_boundary("multipart/form-data; charset=utf-8"); },
                    "has no boundary");
  expect_form_error([] { multipart_boundary("multipart/form-data; boundary="); }, "is empty");
  expect_form_error([] { multipart_boundary("multipart/form-data; boundary=\"\""); }, "is empty");
  EXPECT_EQ(multipart_boundary("multipart/form-data; boundary=" + std::string(70, 'b')),
            std::string(70, 'b'));
  expect_form_error(
      [] { multipart_boundary("multipart/form-data; boundary=" + std::string(71, 'b')); },
      "over 70 characters");
  expect_form_error([] { multipart_boundary("multipart/form-data; boundary=\"abc"); },
                    "unterminated quoted value");
  expect_form_error([] { multipart_boundary("multipart/form-data; boundary"); },
                    "parameter without a value");
}

TEST(HttpFormsIsMultipart, ComparesTheMediaTypeCaseInsensitively) {
  EXPECT_TRUE(is_multipart("multipart/form-data; boundary=x"));
  EXPECT_TRUE(is_multipart("MULTIPART/Mixed"));
  EXPECT_TRUE(is_multipart(" multipart/related;type=x"));
  EXPECT_FALSE(is_multipart("image/png"));
  EXPECT_FALSE(is_multipart("multipart"));
  EXPECT_FALSE(is_multipart("text/plain; note=multipart/x"));
  EXPECT_FALSE(is_multipart(""));
}

// ---- parse_multipart

TEST(HttpFormsMultipart, SplitsPartsWithAndWithoutFilename) {
  const std::string b = "XyZ";
  const std::string body =
      part(b,
           "Content-Disposition: form-data; name=\"image\"; filename=\"cat.jpg\"\r\n"
           "Content-Type: image/jpeg\r\n",
           "JPEGBYTES") +
      part(b, disposition("k"), "5") + close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].name, "image");
  EXPECT_EQ(parts[0].filename, "cat.jpg");
  EXPECT_EQ(parts[0].content_type, "image/jpeg");
  EXPECT_EQ(parts[0].content, "JPEGBYTES");
  EXPECT_EQ(parts[1].name, "k");
  EXPECT_EQ(parts[1].filename, "");
  EXPECT_EQ(parts[1].content_type, "");
  EXPECT_EQ(parts[1].content, "5");
  // Views into the body, not copies.
  EXPECT_GE(parts[0].content.data(), body.data());
  EXPECT_LE(parts[1].content.data() + parts[1].content.size(), body.data() + body.size());
}

// Byte for byte what curl 7.88.1 sent for
//   curl -F image=@img.bin -F k=5 -F 'note=a "q"' URL
// with img.bin holding "AB\r\n--\0\xff" (captured from a listening socket).
TEST(HttpFormsMultipart, ReadsABodyAsCurlSendsIt) {
  const std::string content_type =
      "multipart/form-data; boundary=------------------------6017326a76e2cba3";
  const std::string body =
      "--------------------------6017326a76e2cba3\r\n"
      "Content-Disposition: form-data; name=\"image\"; filename=\"img.bin\"\r\n"
      "Content-Type: application/octet-stream\r\n"
      "\r\n"
      "AB\r\n--\0\xff\r\n"
      "--------------------------6017326a76e2cba3\r\n"
      "Content-Disposition: form-data; name=\"k\"\r\n"
      "\r\n"
      "5\r\n"
      "--------------------------6017326a76e2cba3\r\n"
      "Content-Disposition: form-data; name=\"note\"\r\n"
      "\r\n"
      "a \"q\"\r\n"
      "--------------------------6017326a76e2cba3--\r\n"s;
  ASSERT_EQ(body.size(), 397u);  // curl's Content-Length

  const auto boundary = multipart_boundary(content_type);
  ASSERT_EQ(boundary, "------------------------6017326a76e2cba3");
  const auto parts = parse_multipart(body, *boundary, 10);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].name, "image");
  EXPECT_EQ(parts[0].filename, "img.bin");
  EXPECT_EQ(parts[0].content_type, "application/octet-stream");
  EXPECT_EQ(parts[0].content, "AB\r\n--\0\xff"s);
  EXPECT_EQ(parts[1].name, "k");
  EXPECT_EQ(parts[1].content, "5");
  EXPECT_EQ(parts[2].name, "note");
  EXPECT_EQ(parts[2].content, "a \"q\"");
}

TEST(HttpFormsMultipart, KeepsBinaryContentThatLooksLikeTheBoundary) {
  const std::string b = "----Boundary42";
  // Every prefix of "\r\n--" + boundary, the whole boundary run into other text (not a
  // delimiter: no line end after it), "--" + boundary not at a line start, NUL and 0xff.
  std::string content = "\0\xff\xfe"s;
  const std::string delimiter = "\r\n--" + b;
  for (std::size_t n = 1; n < delimiter.size(); ++n) content += delimiter.substr(0, n) + "\xff"s;
  content += delimiter + "X tail" + "\0"s + "--" + b + "\r\n" + "\r\n--" + b + "\t\tx";
  content += "\xff\0\r\n"s;  // ends with a line end of its own: the delimiter's CRLF follows
  const std::string body = part(b, disposition("blob"), content) + close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].content, content);
}

TEST(HttpFormsMultipart, HeaderNamesAndParametersAreCaseInsensitive) {
  const std::string b = "b";
  const std::string body = part(b,
                                "content-disposition: FORM-DATA; NAME=\"Q\"; FileName=x.png\r\n"
                                "CONTENT-TYPE:image/png\r\n"
                                "X-Other: ignored\r\n",
                                "png") +
                           part(b, "cOnTeNt-DiSpOsItIoN:form-data;name=token_name\r\n", "v") +
                           close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].name, "Q");  // values keep their case
  EXPECT_EQ(parts[0].filename, "x.png");
  EXPECT_EQ(parts[0].content_type, "image/png");
  EXPECT_EQ(parts[1].name, "token_name");
}

TEST(HttpFormsMultipart, UnescapesQuotedParameters) {
  const std::string b = "b";
  const std::string body =
      part(b,
           "Content-Disposition: form-data; filename=\"say \\\"hi\\\"; \\\\ok\"; name=\"n;m\"\r\n",
           "x") +
      close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].name, "n;m");
  EXPECT_EQ(parts[0].filename, "say \"hi\"; \\ok");
}

// Browsers do not escape backslashes in file names: a Windows path arrives as written.
TEST(HttpFormsMultipart, KeepsBackslashesThatEscapeNothing) {
  const std::string b = "b";
  const std::string body =
      part(b, "Content-Disposition: form-data; name=\"f\"; filename=\"C:\\dir\\a.jpg\"\r\n", "x") +
      close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].filename, "C:\\dir\\a.jpg");
}

TEST(HttpFormsMultipart, ToleratesPreambleAndEpilogue) {
  const std::string b = "sep";
  const std::string body = "This is a preamble.\r\n--sep is not here\r\n" +
                           part(b, disposition("a"), "1") + part(b, disposition("b"), "2") +
                           "--sep--\r\nan epilogue\r\n--sep\r\n";
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].content, "1");
  EXPECT_EQ(parts[1].content, "2");
}

TEST(HttpFormsMultipart, AcceptsBareLfInPartHeadersAndPaddingAfterTheBoundary) {
  const std::string body =
      "--b  \t\nContent-Disposition: form-data; name=\"a\"\nContent-Type: text/plain\n\n"
      "line1\nline2\r\n--b--";
  const auto parts = parse_multipart(body, "b", 10);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0].content_type, "text/plain");
  EXPECT_EQ(parts[0].content, "line1\nline2");  // bare LF in content is content
}

TEST(HttpFormsMultipart, ReadsEmptyContent) {
  const std::string b = "b";
  const std::string body =
      part(b, disposition("empty"), "") + part(b, disposition("file"), "") + close(b);
  const auto parts = parse_multipart(body, b, 10);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].content, "");
  EXPECT_EQ(parts[1].content, "");
  EXPECT_EQ(parts[1].name, "file");
}

TEST(HttpFormsMultipart, AnEmptyFormHasNoParts) {
  EXPECT_TRUE(parse_multipart("--b--\r\n", "b", 10).empty());
}

TEST(HttpFormsMultipart, RejectsABodyWithoutAnOpeningDelimiter) {
  expect_form_error([] { parse_multipart("", "b", 10); }, "no opening multipart boundary");
  expect_form_error([] { parse_multipart("hello world", "b", 10); },
                    "no opening multipart boundary");
  // The boundary string only inside a line, or run into other text, is no delimiter.
  expect_form_error([] { parse_multipart("x--b\r\n\r\n", "b", 10); },
                    "no opening multipart boundary");
  expect_form_error([] { parse_multipart("--bb\r\n\r\n", "b", 10); },
                    "no opening multipart boundary");
}

TEST(HttpFormsMultipart, RejectsABodyThatEndsBeforeTheCloseDelimiter) {
  const std::string b = "b";
  const std::string opened = part(b, disposition("a"), "1");
  expect_form_error([&] { parse_multipart(opened, b, 10); },
                    "the body ends before the closing boundary");
  expect_form_error([&] { parse_multipart(opened + "--b-", b, 10); },
                    "the body ends before the closing boundary");
  expect_form_error([&] { parse_multipart(opened + "--b", b, 10); },
                    "the body ends before the closing boundary");
  expect_form_error([&] { parse_multipart("--b", b, 10); },
                    "the body ends before the closing boundary");
  expect_form_error([&] { parse_multipart("--b\r\n" + disposition("a"), b, 10); },
                    "the body ends inside the headers of part 1");
}

TEST(HttpFormsMultipart, RejectsPartsWithoutAFormDataNameNamingThePart) {
  const std::string b = "b";
  const std::string good = part(b, disposition("a"), "1") + part(b, disposition("b"), "2");
  expect_form_error(
      [&] {
        parse_multipart(good + part(b, "Content-Type: text/plain\r\n", "3") + close(b), b, 10);
      },
      "part 3 has no Content-Disposition: form-data");
  expect_form_error([&] { parse_multipart(good + part(b, "", "3") + close(b), b, 10); },
                    "part 3 has no Content-Disposition: form-data");
  expect_form_error(
      [&] {
        parse_multipart(
            good + part(b, "Content-Disposition: form-data; filename=\"f\"\r\n", "3") + close(b), b,
            10);
      },
      "part 3 has no Content-Disposition name");
  expect_form_error(
      [&] {
        parse_multipart(
            good + part(b, "Content-Disposition: form-data; name=\"\"\r\n", "3") + close(b), b, 10);
      },
      "part 3 has no Content-Disposition name");
  expect_form_error(
      [&] {
        parse_multipart(part(b, "Content-Disposition: attachment; name=\"a\"\r\n", "1") + close(b),
                        b, 10);
      },
      "part 1's Content-Disposition is \"attachment\", not form-data");
  expect_form_error(
      [&] { parse_multipart(part(b, disposition("a") + disposition("b"), "1") + close(b), b, 10); },
      "part 1 has two Content-Disposition headers");
  expect_form_error(
      [&] {
        parse_multipart(part(b, "Content-Disposition: form-data; name=\"a\r\n", "1") + close(b), b,
                        10);
      },
      "part 1's Content-Disposition has an unterminated quoted value");
  expect_form_error(
      [&] { parse_multipart(part(b, disposition("a") + "no colon\r\n", "1") + close(b), b, 10); },
      "part 1 has a header line without ':'");
  expect_form_error(
      [&] {
        parse_multipart(
            part(b, "Content-Disposition: form-data; name=\"a\";\r\n filename=\"f\"\r\n", "1") +
                close(b),
            b, 10);
      },
      "part 1 has a folded header line");
}

TEST(HttpFormsMultipart, RejectsPartHeadersOver16KiB) {
  const std::string b = "b";
  // Just under the limit (with the blank line) passes; one byte more fails.
  const std::string prefix = disposition("a") + "X-Pad: ";
  const std::size_t pad = 16 * 1024 - prefix.size() - 2 /* CRLF */ - 2 /* blank line */;
  const std::string fits = prefix + std::string(pad, 'p') + "\r\n";
  ASSERT_EQ(fits.size() + 2, 16u * 1024);
  EXPECT_EQ(parse_multipart(part(b, fits, "1") + close(b), b, 10).size(), 1u);

  const std::string over = prefix + std::string(pad + 1, 'p') + "\r\n";
  expect_form_error([&] { parse_multipart(part(b, over, "1") + close(b), b, 10); },
                    "part 1 has headers over 16 KiB");
  // One endless header line with no line end at all.
  expect_form_error(
      [&] {
        parse_multipart(part(b, disposition("a"), "1") + "--b\r\n" + std::string(100000, 'h'), b,
                        10);
      },
      "part 2 has headers over 16 KiB");
}

TEST(HttpFormsMultipart, RejectsMoreThanMaxParts) {
  const std::string b = "b";
  std::string body;
  for (int i = 0; i < 5; ++i) body += part(b, disposition("p" + std::to_string(i)), "x");
  body += close(b);
  EXPECT_EQ(parse_multipart(body, b, 5).size(), 5u);
  expect_form_error([&] { parse_multipart(body, b, 4); },
                    "the multipart body has more than 4 parts");
  expect_form_error([&] { parse_multipart(body, b, 0); },
                    "the multipart body has more than 0 parts");
}

// 20 MB that a parser doing work proportional to the rest of the body at each part (copying
// it, rescanning it) would take minutes on: about 250,000 small parts, then 4 MB of content
// where every few bytes start like a delimiter.
TEST(HttpFormsMultipart, ParsesA20MBBodyInOnePass) {
  const std::string b = "Bnd0123456789";
  const std::string small = part(b, "Content-Disposition: form-data;name=s\r\n", "0");
  const std::size_t small_parts = 16'000'000 / small.size();
  const std::string delimiter = "\r\n--" + b;
  std::string lookalikes;
  for (std::size_t n = 1; lookalikes.size() < 4'000'000; n = n % (delimiter.size() - 1) + 1)
    lookalikes += delimiter.substr(0, n) + "\0"s;
  std::string body;
  body.reserve(small_parts * small.size() + lookalikes.size() + 256);
  for (std::size_t i = 0; i < small_parts; ++i) body += small;
  body += part(b, disposition("big"), lookalikes) + close(b);
  ASSERT_GT(body.size(), 20'000'000u);

  const auto parts = parse_multipart(body, b, small_parts + 1);
  ASSERT_EQ(parts.size(), small_parts + 1);
  EXPECT_EQ(parts.front().content, "0");
  EXPECT_EQ(parts.back().name, "big");
  EXPECT_EQ(parts.back().content, lookalikes);
}

// ---- percent_decode, parse_query

TEST(HttpFormsPercentDecode, DecodesEscapesAndPlusOnlyWhenAsked) {
  EXPECT_EQ(percent_decode("a%20b+c%2B%2b", true), "a b c++");
  EXPECT_EQ(percent_decode("a%20b+c", false), "a b+c");
  EXPECT_EQ(percent_decode("%00%ff%FF", false), "\0\xff\xff"s);
  EXPECT_EQ(percent_decode("", true), "");
}

TEST(HttpFormsPercentDecode, RejectsAPercentWithoutTwoHexDigits) {
  expect_form_error([] { percent_decode("%", true); }, "bad percent-escape \"%\"");
  expect_form_error([] { percent_decode("ab%4", true); }, "bad percent-escape \"%4\"");
  expect_form_error([] { percent_decode("%zz", true); }, "bad percent-escape \"%zz\"");
  expect_form_error([] { percent_decode("%g1x", false); }, "two hex digits");
}

TEST(HttpFormsQuery, DecodesPairsInOrder) {
  using Pairs = std::vector<std::pair<std::string, std::string>>;
  EXPECT_EQ(parse_query("a=1&b=x%20y&c"), (Pairs{{"a", "1"}, {"b", "x y"}, {"c", ""}}));
  EXPECT_EQ(parse_query("q=a+b&plus=%2B&eq=x=y"),
            (Pairs{{"q", "a b"}, {"plus", "+"}, {"eq", "x=y"}}));
  EXPECT_EQ(parse_query("k%3D=v&%26=%26"), (Pairs{{"k=", "v"}, {"&", "&"}}));
  EXPECT_EQ(parse_query("tag=a&tag=b&tag="), (Pairs{{"tag", "a"}, {"tag", "b"}, {"tag", ""}}));
  EXPECT_EQ(parse_query("&a=1&&b=2&"), (Pairs{{"a", "1"}, {"b", "2"}}));
  EXPECT_EQ(parse_query(""), Pairs{});
}

TEST(HttpFormsQuery, RejectsBadEscapesInKeysAndValues) {
  expect_form_error([] { parse_query("a=1&b=%zz"); }, "bad percent-escape \"%zz\"");
  expect_form_error([] { parse_query("a%=1"); }, "bad percent-escape");
  expect_form_error([] { parse_query("a=%4"); }, "bad percent-escape \"%4\"");
}

}  // namespace
}  // namespace gmi
