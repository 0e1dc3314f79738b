// ClipTokenizer against hand-derived ids over small merges files written here.
//
// Byte ids: the printable ASCII byte c is c - 33 ('a' = 64), the same with "</w>" is
// c - 33 + 256 ('a</w>' = 320); merges are numbered from 512 in file order. The expected
// values were worked out by hand from CLIP's algorithm (and agree with
// tests/reference/clip_tokenizer_ref.py); tokenize_cli_test compares against that reference
// over a learned merges file.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gmi/clip_tokenizer.hpp"
#include "gmi/error.hpp"
#include "test_support.hpp"

namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int>;
using Tokenizer = gmi::ClipTokenizer;  // the fixture below takes the class's name for the suite
using gmi::clip_clean_text;
using gmi::clip_pre_tokenize;
using gmi::InputError;
using gmi::pad_to;

// 512 he, 513 ll, 514 hell, 515 hello</w>, 516 ca, 517 cat</w>, 518 's</w>, 519 aa,
// 520 é's bytes "Ã©</w>", 521 caf, 522 cafÃ©</w>; 523 start, 524 end.
constexpr const char* kTinyMerges =
    "#version: 0.2\n"
    "h e\n"
    "l l\n"
    "he ll\n"
    "hell o</w>\n"
    "c a\n"
    "ca t</w>\n"
    "' s</w>\n"
    "a a\n"
    "\xC3\x83 \xC2\xA9</w>\n"
    "ca f\n"
    "caf \xC3\x83\xC2\xA9</w>\n";

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

void write_gzip(const fs::path& p, const std::string& text) {
  gzFile f = gzopen(p.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, text.data(), static_cast<unsigned>(text.size())), static_cast<int>(text.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

class ClipTokenizer : public ::testing::Test {
 protected:
  static Tokenizer tiny() { return Tokenizer::from_merges_text(kTinyMerges, "tiny"); }
  // The message of the InputError that from_file throws, or "" when it does not throw.
  std::string load_error(const std::string& contents, const std::string& name = "merges.txt") {
    const fs::path p = dir_.path() / name;
    write_text(p, contents);
    try {
      Tokenizer::from_file(p.string());
    } catch (const InputError& e) {
      return e.what();
    }
    return "";
  }
  gmi::testing::TempDir dir_;
};

TEST_F(ClipTokenizer, VocabularyIsBytesThenWordEndsThenMergesThenSpecials) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.vocab_size(), 525);
  EXPECT_EQ(t.start_id(), 523);
  EXPECT_EQ(t.end_id(), 524);
  EXPECT_EQ(t.token(0), "!");
  EXPECT_EQ(t.token(93), "~");
  EXPECT_EQ(t.token(94), "\xC2\xA1");     // U+00A1, the first of the Latin-1 run
  EXPECT_EQ(t.token(188), "\xC4\x80");    // byte 0 -> U+0100, the first remapped byte
  EXPECT_EQ(t.token(220), "\xC4\xA0");    // the space byte -> U+0120
  EXPECT_EQ(t.token(255), "\xC5\x83");    // byte 0xAD -> U+0143, the last one
  EXPECT_EQ(t.token(256), "!</w>");
  EXPECT_EQ(t.token(512), "he");
  EXPECT_EQ(t.token(522), "caf\xC3\x83\xC2\xA9</w>");
  EXPECT_EQ(t.token(523), "<|startoftext|>");
  EXPECT_EQ(t.token(524), "<|endoftext|>");
  EXPECT_THROW(t.token(525), InputError);
}

TEST_F(ClipTokenizer, GzipAndPlainFilesGiveTheSameTokenizer) {
  write_text(dir_.path() / "m.txt", kTinyMerges);
  write_gzip(dir_.path() / "m.txt.gz", kTinyMerges);
  Tokenizer plain = Tokenizer::from_file((dir_.path() / "m.txt").string());
  Tokenizer gz = Tokenizer::from_file((dir_.path() / "m.txt.gz").string());
  EXPECT_EQ(gz.vocab_size(), plain.vocab_size());
  EXPECT_EQ(gz.encode("Hello, cat's café!"), plain.encode("Hello, cat's café!"));
  EXPECT_EQ(gz.encode("Hello, cat's café!"), (Ids{515, 267, 517, 518, 522, 256}));
}

TEST_F(ClipTokenizer, MergesWholeWordsAndSplitsPunctuationAndContractions) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.encode("hello"), Ids{515});
  // hello</w> ,</w> cat</w> 's</w> !</w>
  EXPECT_EQ(t.encode("Hello, cat's!"), (Ids{515, 267, 517, 518, 256}));
  // d o n</w> ' t</w>: no merge applies
  EXPECT_EQ(t.encode("don't"), (Ids{67, 78, 333, 6, 339}));
  // "hell" alone ends in l</w>, so "hell o</w>" cannot fire: he ll</w>... -> he, l, l</w>
  EXPECT_EQ(t.encode("hell"), (Ids{512, 75, 331}));
}

TEST_F(ClipTokenizer, PreTokenizationFollowsClipsPattern) {
  EXPECT_EQ(clip_pre_tokenize("we're they've i'm you'll he'd it's don't 'x"),
            (std::vector<std::string>{"we", "'re", "they", "'ve", "i", "'m", "you", "'ll", "he", "'d", "it", "'s",
                                      "don", "'t", "'", "x"}));
  // Letters run together, digits stand alone, other symbols run together.
  EXPECT_EQ(clip_pre_tokenize("\xE4\xB8\x80\xE5\x8F\xAA\xE7\x8C\xAB sat 2024\xE5\xB9\xB4 !?... a-b"),
            (std::vector<std::string>{"\xE4\xB8\x80\xE5\x8F\xAA\xE7\x8C\xAB", "sat", "2", "0", "2", "4",
                                      "\xE5\xB9\xB4", "!?...", "a", "-", "b"}));
  // "!'" is one symbol run, so the 's after it is a word of its own.
  EXPECT_EQ(clip_pre_tokenize("hi!'s"), (std::vector<std::string>{"hi", "!'", "s"}));
  EXPECT_EQ(clip_pre_tokenize("a<|startoftext|>b<|endoftext|>"),
            (std::vector<std::string>{"a", "<|startoftext|>", "b", "<|endoftext|>"}));
}

TEST_F(ClipTokenizer, PreTokenizationMatchesPythonRegexCaseInsensitiveQuirks) {
  // IGNORECASE lets long s (U+017F) match the 's of "'s".
  EXPECT_EQ(clip_pre_tokenize("it'\xC5\xBF"), (std::vector<std::string>{"it", "'\xC5\xBF"}));
  // U+0345 is in no class of the case-insensitive pattern: findall skips it like a space.
  EXPECT_EQ(clip_pre_tokenize("a\xCD\x85" "b"), (std::vector<std::string>{"a", "b"}));
}

TEST_F(ClipTokenizer, SpecialTokensWrittenInTheTextBecomeTheirIds) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.encode("<|endoftext|>"), Ids{524});
  EXPECT_EQ(t.encode("a<|startoftext|>b"), (Ids{320, 523, 321}));
  EXPECT_EQ(t.encode("<|ENDOFTEXT|>"), Ids{524});  // lower-cased first
}

TEST_F(ClipTokenizer, AccentsGiveTheSameIdsComposedOrDecomposed) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.encode("caf\xC3\xA9"), Ids{522});   // NFC é
  EXPECT_EQ(t.encode("cafe\xCC\x81"), Ids{522});  // e + combining acute
  EXPECT_EQ(t.encode("CAF\xC3\x89"), Ids{522});   // upper case, lower-cased
}

TEST_F(ClipTokenizer, EmojiAreByteLevelTokens) {
  Tokenizer t = tiny();
  // U+1F600 = F0 9F 98 80: F0 is a Latin-1 byte (172); 9F, 98 are remapped (253, 246); 80</w> = 222 + 256.
  EXPECT_EQ(t.encode("\xF0\x9F\x98\x80"), (Ids{172, 253, 246, 478}));
}

TEST_F(ClipTokenizer, RepeatedPairMergesLeftToRightWithoutOverlap) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.encode("aaaa"), (Ids{519, 64, 320}));  // aa a a</w>
  EXPECT_EQ(t.encode("aaa"), (Ids{519, 320}));       // aa a</w>
}

TEST_F(ClipTokenizer, LowestRankedPairMergesFirstWherever) {
  Tokenizer t = Tokenizer::from_merges_text("#h\nb c\na b\n", "ranks");
  EXPECT_EQ(t.encode("abcd"), (Ids{64, 512, 323}));  // a bc d</w>, not ab c d</w>
}

TEST_F(ClipTokenizer, RepeatedMergeStringTakesItsLastId) {
  // As CLIP's dict-built tables: the later duplicate wins, for the rank and for the id.
  Tokenizer t = Tokenizer::from_merges_text("#h\na b\na b\n", "dup");
  EXPECT_EQ(t.vocab_size(), 516);
  EXPECT_EQ(t.encode("abc"), (Ids{513, 322}));
}

TEST_F(ClipTokenizer, HtmlEntitiesUnescapeTwiceLikePython) {
  // Expectations from Python's html.unescape(html.unescape(...)).
  EXPECT_EQ(clip_clean_text("&amp;amp;"), "&");
  EXPECT_EQ(clip_clean_text("&amp;amp;amp;"), "&amp;");
  EXPECT_EQ(clip_clean_text("&lt;b&gt; &copy &notit; &#39; &#x27; &#X27;"), "<b> \xC2\xA9 \xC2\xACit; ' ' '");
  EXPECT_EQ(clip_clean_text("&#x80; &#0; &#1;x &#xD800; &#1114112; &#65&#x42"),
            "\xE2\x82\xAC \xEF\xBF\xBD x \xEF\xBF\xBD \xEF\xBF\xBD ab");
  EXPECT_EQ(clip_clean_text("&unknown; &ampx &#x; &AMP &"), "&unknown; &x &#x; & &");
  EXPECT_EQ(clip_clean_text("&NotNestedGreaterGreater; &fjlig;"), "\xE2\xAA\xA2\xCC\xB8 fj");
}

TEST_F(ClipTokenizer, WhitespaceRunsCollapseToOneSpace) {
  EXPECT_EQ(clip_clean_text("  a \t\n b\xC2\xA0\xC2\xA0" "c\xE3\x80\x80" "d\r\n  "), "a b c d");
  // U+001C..1F: str.strip() removes them, but they are not \s to the regex.
  EXPECT_EQ(clip_clean_text("\x1C" "a\x1C" "b\x1F"), "a\x1C" "b");
  EXPECT_EQ(clip_clean_text(" \x1C a\x1C\x1C b"), "a\x1C\x1C b");
  Tokenizer t = tiny();
  EXPECT_EQ(t.encode("hello\t\t\ncat"), t.encode("hello cat"));
}

TEST_F(ClipTokenizer, LowerCasingIsFullUnicode) {
  EXPECT_EQ(clip_clean_text("\xCE\x9F\xCE\x94\xCE\x9F\xCE\xA3"), "\xCE\xBF\xCE\xB4\xCE\xBF\xCF\x82");  // final sigma
  EXPECT_EQ(clip_clean_text("\xC4\xB0"), "i\xCC\x87");  // İ -> i + combining dot
  EXPECT_EQ(clip_clean_text("\xE2\x85\xAB"), "\xE2\x85\xBB");  // Roman numeral twelve
}

TEST_F(ClipTokenizer, InvalidUtf8InputReadsAsReplacementCharacter) {
  EXPECT_EQ(clip_clean_text("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(clip_clean_text("\xF0\x9F"), "\xEF\xBF\xBD");  // one maximal subpart, one U+FFFD
}

TEST_F(ClipTokenizer, EmptyTextHasNoIds) {
  Tokenizer t = tiny();
  EXPECT_TRUE(t.encode("").empty());
  EXPECT_TRUE(t.encode(" \t\n ").empty());
  EXPECT_EQ(t.encode_with_specials(""), (Ids{523, 524}));
  EXPECT_EQ(t.decode({}), "");
}

TEST_F(ClipTokenizer, TruncationKeepsEndLast) {
  Tokenizer t = tiny();
  std::string text;
  for (int i = 0; i < 100; ++i) text += "a ";
  Ids ids = t.encode_with_specials(text, 77);
  ASSERT_EQ(ids.size(), 77u);
  EXPECT_EQ(ids.front(), 523);
  EXPECT_EQ(ids.back(), 524);
  for (size_t i = 1; i + 1 < ids.size(); ++i) EXPECT_EQ(ids[i], 320) << i;
  EXPECT_EQ(t.encode_with_specials(text, 0).size(), 102u);
  EXPECT_EQ(t.encode_with_specials(text).size(), 77u);  // CLIP's context by default
  EXPECT_EQ(t.encode_with_specials("hello", 77), (Ids{523, 515, 524}));  // never padded
}

TEST_F(ClipTokenizer, PadToFillsWithZeros) {
  EXPECT_EQ(pad_to({523, 515, 524}, 5), (Ids{523, 515, 524, 0, 0}));
  EXPECT_EQ(pad_to({1, 2, 3}, 2), (Ids{1, 2, 3}));
}

TEST_F(ClipTokenizer, DecodeJoinsTokensAndDropsSpecials) {
  Tokenizer t = tiny();
  EXPECT_EQ(t.decode(t.encode_with_specials("Hello, cat's caf\xC3\xA9!")), "hello , cat 's caf\xC3\xA9 !");
  EXPECT_EQ(t.decode({512, 75, 331}), "hell");
  EXPECT_EQ(t.decode({172, 253}), "\xEF\xBF\xBD");  // a cut-off emoji
  EXPECT_THROW(t.decode({525}), InputError);
  EXPECT_THROW(t.decode({-1}), InputError);
}

TEST_F(ClipTokenizer, UsesAtMostClipsMergeCount) {
  std::string text = "#version: 0.2\n";
  for (int i = 0; i < Tokenizer::kMaxMerges; ++i) text += "a b\n";
  text += "not a merge line\n";  // past CLIP's limit: not read
  write_gzip(dir_.path() / "big.txt.gz", text);
  Tokenizer t = Tokenizer::from_file((dir_.path() / "big.txt.gz").string());
  EXPECT_EQ(t.vocab_size(), 49408);
  EXPECT_EQ(t.start_id(), 49406);
  EXPECT_EQ(t.end_id(), 49407);
}

TEST_F(ClipTokenizer, HeaderOnlyFileHasByteTokensAlone) {
  Tokenizer t = Tokenizer::from_merges_text("#version: 0.2", "header");
  EXPECT_EQ(t.vocab_size(), 514);
  EXPECT_EQ(t.encode("hi"), (Ids{71, 328}));
}

TEST_F(ClipTokenizer, BadFilesThrowInputErrorNamingFileAndLine) {
  const std::string missing = (dir_.path() / "missing.txt.gz").string();
  try {
    Tokenizer::from_file(missing);
    ADD_FAILURE() << "no error for a missing file";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_NE(load_error("").find("empty"), std::string::npos);
  std::string err = load_error("#version\nh e\nl l l\n");
  EXPECT_NE(err.find("merges.txt:3:"), std::string::npos) << err;
  err = load_error("#version\nh e\nl\n");
  EXPECT_NE(err.find("merges.txt:3:"), std::string::npos) << err;
  err = load_error("#version\nh e\n\nl l\n");  // a blank line is not a merge
  EXPECT_NE(err.find("merges.txt:3:"), std::string::npos) << err;
  err = load_error(std::string("#version\nh e\n\x89PNG\0\0\x01", 20), "binary.bin");
  EXPECT_NE(err.find("binary.bin:3:"), std::string::npos) << err;
  err = load_error("#version\nh \xFF\n");
  EXPECT_NE(err.find("not UTF-8"), std::string::npos) << err;
  err = load_error("\x1F\x8B\x08\x00garbage", "corrupt.gz");
  EXPECT_NE(err.find("corrupt.gz"), std::string::npos) << err;
  EXPECT_NE(err.find("gzip"), std::string::npos) << err;
}

TEST_F(ClipTokenizer, TruncatedGzipIsRejected) {
  write_gzip(dir_.path() / "full.gz", kTinyMerges);
  std::ifstream in(dir_.path() / "full.gz", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(load_error(bytes.substr(0, bytes.size() - 12), "cut.gz").find("gzip"), std::string::npos);
}

// With CLIP's own bpe_simple_vocab_16e6.txt.gz (not checked in): GMI_CLIP_VOCAB=PATH.
// The ids are what CLIP's simple_tokenizer.py gives.
TEST_F(ClipTokenizer, RealClipVocabularyGivesClipsIds) {
  const char* path = std::getenv("GMI_CLIP_VOCAB");
  if (!path) GTEST_SKIP() << "set GMI_CLIP_VOCAB to CLIP's bpe_simple_vocab_16e6.txt.gz";
  Tokenizer t = Tokenizer::from_file(path);
  EXPECT_EQ(t.vocab_size(), 49408);
  EXPECT_EQ(t.encode_with_specials("a photo of a cat"), (Ids{49406, 320, 1125, 539, 320, 2368, 49407}));
  const std::string text = "Don't stop, it's caf\xC3\xA9 \xF0\x9F\x98\x80 &amp;amp;";
  EXPECT_EQ(t.encode(text), (Ids{847, 713, 1691, 267, 585, 568, 15304, 7334, 261}));
  EXPECT_EQ(t.decode(t.encode(text)), "don 't stop , it 's caf\xC3\xA9 \xF0\x9F\x98\x80 &");
  EXPECT_EQ(t.encode("\xE4\xB8\x80\xE5\x8F\xAA\xE7\x8C\xAB"), (Ids{19759, 222, 34517, 103, 163, 234, 360}));
}

TEST_F(ClipTokenizer, EncodeIsSafeFromManyThreads) {
  const Tokenizer t = tiny();
  const std::string text = "Hello, cat's caf\xC3\xA9! aaaa \xF0\x9F\x98\x80 &amp;amp;";
  const Ids expected = t.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(8, 0);
  for (int k = 0; k < 8; ++k)
    threads.emplace_back([&, k] {
      for (int i = 0; i < 200; ++i)
        if (t.encode(text) != expected) ++mismatches[static_cast<size_t>(k)];
    });
  for (auto& th : threads) th.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

}  // namespace
