// `gmi text tokenize` against tests/reference/clip_tokenizer_ref.py, an independent Python
// model of CLIP's tokenizer, over the same hard strings and the same merges file (learned by
// the reference from the corpus below, so that merges fire on the strings tested).
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "test_support.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::ProcessResult;
using testing::run_process;

// A few KB of prompts in the style of a text-to-image hub, with the scripts, marks and
// punctuation the hard strings use.
constexpr const char* kCorpus = R"(
a photo of a cat sitting on a windowsill, golden hour, soft light, 35mm film
a photo of a dog running on the beach at sunset, high detail, 8k uhd
portrait of a woman with red hair, oil painting, trending on artstation
portrait of an old man, dramatic lighting, masterpiece, best quality
masterpiece, best quality, ultra detailed, highly detailed, sharp focus, intricate details
a cute cat wearing a tiny hat, digital art, concept art, illustration
a cozy cafe in paris, café crème and croissants, brûlée, naïve art, façade of the building
don't stop believing, it's what we're made of, they've gone home, I'm here, you'll see, he'd know
landscape of mountains and lakes, misty morning, national geographic photo
cyberpunk city street at night, neon lights, rain, reflections, blade runner style
anime girl with blue eyes, studio ghibli style, makoto shinkai, beautiful sky
一只可爱的猫坐在窗台上 一只狗 可爱的猫 猫和狗
東京タワーの夜景 アニメ風 夜景 東京
한국어 텍스트 프롬프트 고양이 사진
emoji 😀 😃 🐱 👍 👍🏽 🇯🇵 🏳️‍🌈 family 👨‍👩‍👧 cat 🐱 face 😀
Ångström Ørsted naïve façade crème brûlée café
ΟΔΟΣ ΣΟΦΙΑΣ οδός σοφίας ελληνικά γράμματα Ὀδυσσεύς
İstanbul Diyarbakır straße Straße
1234567890 3.14159 1,000,000 2nd 21st ½ ⅔ Ⅻ ١٢٣
e-mail me@example.com https://example.com/path?q=1&x=2 www.example.org
C++ & C# vs. Rust's borrow-checker, python's regex
(masterpiece:1.2), [[detailed]], {sharp}, 8k uhd, f/1.8, 85mm lens, bokeh
Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ﬀ ﬃ ligature
एक बिल्ली की तस्वीर सुंदर बिल्ली
صورة قطة جميلة قطة
ภาพแมวน่ารัก แมว
hello world, hello there, hello again, the cat says hello
watercolor painting of a fox in the forest, autumn leaves, warm colors
a robot holding a flower, 3d render, octane render, unreal engine 5
a bowl of ramen, food photography, steam rising, chopsticks
a castle on a hill, fantasy art, epic, matte painting, by greg rutkowski
a watercolour of a lighthouse, stormy sea, waves crashing
the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX!!!
what's the weather like? it'll be sunny; we'd go out; I've been there
a photo of an astronaut riding a horse on the moon, photorealistic
close-up of a hummingbird drinking nectar, macro photography, shallow depth of field
a steampunk airship above victorian london, brass and copper, gears
minimalist poster, flat design, vector art, pastel colors, negative space
pixel art of a knight and a dragon, 16-bit, retro video game
a black and white photo of new york city in the 1920s, grain, vintage
an isometric diorama of a tiny bakery, warm interior, bread loaves, cinnamon rolls
underwater coral reef teeming with tropical fish, sunbeams piercing turquoise water
a samurai meditating beneath cherry blossoms, ukiyo-e woodblock print, hokusai
surreal melting clocks draped over branches, dali inspired, dreamlike desert
a cathedral interior with stained glass windows, volumetric god rays, gothic architecture
a frozen waterfall in iceland, aurora borealis overhead, long exposure photograph
a futuristic motorcycle concept, chrome, carbon fiber, studio lighting, product shot
an elderly fisherman mending nets at dawn, weathered hands, documentary photography
botanical illustration of ferns, mushrooms and moss, scientific drawing, sepia ink
a medieval marketplace bustling with merchants, spices, textiles, lanterns
a giant tortoise carrying a village on its shell, whimsical, children's book illustration
abstract geometric composition, bauhaus, primary colors, kandinsky, mondrian
a lonely astronaut sitting on a swing, planet rings on the horizon, melancholic
glowing jellyfish floating through a dark ocean, bioluminescence, ethereal
a vintage typewriter on a wooden desk, coffee mug, scattered manuscripts, nostalgia
low poly fox, papercraft, origami, soft shadows, pastel background
a thunderstorm over wheat fields, lightning bolt, dramatic clouds, kansas
ancient ruins overgrown with vines, jungle temple, explorers with torches
a mechanical owl with clockwork gears, brass feathers, glowing amber eyes
charcoal sketch of a ballerina mid-leap, expressive strokes, smudged graphite
a snowy cabin in the woods, smoke from the chimney, cozy winter evening
neon-lit ramen stall in a rainy alley, hong kong, cinematic color grading
a majestic lion with a flowing mane, savanna at golden hour, wildlife photography
psychedelic swirling patterns, vibrant magenta and cyan, 1970s poster
a knitted wool sweater texture, macro, cozy fibers, seamless pattern
a haunted victorian mansion, fog, full moon, crows, eerie atmosphere
a chef plating a gourmet dessert, raspberries, chocolate sauce, michelin star
sci-fi spaceship corridor, hexagonal panels, blinking consoles, hard surface modeling
a quiet library with towering bookshelves, ladders, dust motes in sunlight
grandma's kitchen, jars of pickles, checkered tablecloth, rustic farmhouse
why'd they leave? who'll know? she'd rather not; that's life; there's hope
Müller's Bäckerei, Köln, Zürich, São Paulo, Kraków, Reykjavík, Ελλάδα, Россия
кошка сидит на окне, красивая фотография, Москва зимой
jalapeño piñata fiesta, señorita, mañana, año nuevo
a hyperrealistic sculpture of a hand emerging from marble, renaissance chiselwork
an overgrown greenhouse full of carnivorous plants, humid, dripping condensation
skateboarder performing a kickflip, fisheye lens, graffiti wall, urban youth culture
a cup of matcha latte with foam art, top-down flatlay, linen napkin, morning
propaganda poster of a heroic tractor driver, constructivism, bold typography
an enchanted bookstore where books fly like birds, magical realism, lamplight
a drowned city beneath a glassy lake, submerged spires, eerie calm, wide angle
comic book panel, halftone dots, speech bubble saying "kapow", superhero punch
a pangolin librarian wearing spectacles, anthropomorphic, detailed fur, storybook
topographic map of imaginary islands, cartography, compass rose, parchment
)";

// The strings both tokenizers must agree on.
const std::vector<std::string>& hard_strings() {
  static const std::vector<std::string> s = {
      "a photo of a cat",
      "A PHOTO OF A CAT, trending on ArtStation!!!",
      "don't stop believin' \xE2\x80\x94 it's what we're, they've, I'm, you'll, he'd",
      "DON'T YOU'LL WE'RE 'S",
      "caf\xC3\xA9 cr\xC3\xA8me br\xC3\xBBl\xC3\xA9" "e",
      "cafe\xCC\x81 cre\xCC\x80me bru\xCC\x82le\xCC\x81" "e",
      "\xC3\x85ngstr\xC3\xB6m \xC3\x98rsted na\xC3\xAFve fa\xC3\xA7" "ade",
      "\xCE\x9F\xCE\x94\xCE\x9F\xCE\xA3 \xCE\xA3\xCE\x9F\xCE\xA6\xCE\x99\xCE\x91\xCE\xA3 \xCE\xA3\xCE\x91\xCE\xA3. "
      "\xCE\x91\xCE\xA3",
      "\xC4\xB0stanbul D\xC4\xB0YARBAKIR",
      "stra\xC3\x9F" "e STRASSE \xC3\x9F \xE1\xBA\x9E",
      "\xE4\xB8\x80\xE5\x8F\xAA\xE5\x8F\xAF\xE7\x88\xB1\xE7\x9A\x84\xE7\x8C\xAB\xE5\x9D\x90\xE5\x9C\xA8"
      "\xE7\xAA\x97\xE5\x8F\xB0\xE4\xB8\x8A",
      "\xE6\x9D\xB1\xE4\xBA\xAC\xE3\x82\xBF\xE3\x83\xAF\xE3\x83\xBC\xE3\x81\xAE\xE5\xA4\x9C\xE6\x99\xAF"
      "\xE3\x80\x81\xE3\x82\xA2\xE3\x83\x8B\xE3\x83\xA1\xE9\xA2\xA8",
      "\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4 \xED\x85\x8D\xEC\x8A\xA4\xED\x8A\xB8",
      "\xF0\x9F\x98\x80\xF0\x9F\x98\x83 emoji \xF0\x9F\x90\xB1\xE2\x80\x8D\xF0\x9F\x91\xA4 "
      "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD family \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D"
      "\xF0\x9F\x91\xA7",
      "\xF0\x9F\x87\xAF\xF0\x9F\x87\xB5 flags \xF0\x9F\x8F\xB3\xEF\xB8\x8F\xE2\x80\x8D\xF0\x9F\x8C\x88",
      "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x27;hex&#x27;",
      "&copy &notit; &ampx &#x80; &#0; &#1;x &#xD800; &#1114112; &unknown; &AMP &NotNestedGreaterGreater;",
      "&amp;lt;b&amp;gt; &amp;#39; &#38;amp; &#x26;#x41;",
      "tabs\tand\nnewlines\r\n  and   runs\xC2\xA0of\xE3\x80\x80spaces",
      "   leading and trailing   ",
      "\x1C" "file\x1D" "separators\x1E\x1F",
      "",
      "  \t \n ",
      "1234567890 3.14159 1,000,000 2nd 21st \xC2\xBD \xE2\x85\x94 \xE2\x85\xAB \xD9\xA1\xD9\xA2\xD9\xA3",
      "!!!???...,,,;;;:::---___***",
      "<|startoftext|>a photo<|endoftext|>",
      "<|STARTOFTEXT|> shouting <|EndOfText|>",
      "it'\xC5\xBF long s, a\xCD\x85" "b ypogegrammeni",
      "\xE1\xBD\x88\xCE\x94\xCE\xA5\xCE\xA3\xCE\xA3\xCE\x95\xCE\x8E\xCE\xA3 \xE1\xBE\xBC",
      "hello</w>world",
      "e-mail me@example.com https://example.com/path?q=1&x=2",
      "C++ & C# vs. Rust's borrow-checker",
      "\xEF\xBC\xA6\xEF\xBD\x95\xEF\xBD\x8C\xEF\xBD\x8C \xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\xA3 "
      "\xEF\xBC\x91\xEF\xBC\x92\xEF\xBC\x93",
      "\xEF\xAC\x81 ligature \xEF\xAC\x80 \xEF\xAC\x83",
      "Zalgo: Z\xCC\xA4\xCD\x94\xCD\xA7\xCC\x91\xCC\x93" "a\xCC\x88\xCD\x96\xCC\xAD\xCC\x88\xCC\x87l\xCD\xAE",
      "\xE0\xA4\x8F\xE0\xA4\x95 \xE0\xA4\xAC\xE0\xA4\xBF\xE0\xA4\xB2\xE0\xA5\x8D\xE0\xA4\xB2\xE0\xA5\x80",
      "\xD8\xB5\xD9\x88\xD8\xB1\xD8\xA9 \xD9\x82\xD8\xB7\xD8\xA9",
      "\xE0\xB8\xA0\xE0\xB8\xB2\xE0\xB8\x9E\xE0\xB9\x81\xE0\xB8\xA1\xE0\xB8\xA7",
      "x\xE2\x80\x8By\xE2\x80\x8Dz\xEF\xBB\xBF",
      "MiXeD CaSe WoRdS wIth 'QUOTES' and \"double\"",
      "portrait of a woman, (masterpiece:1.2), [[detailed]], {sharp}, 8k uhd, f/1.8",
      "\xE2\x80\xA8line sep\xE2\x80\xA9para sep\xC2\x85nel",
      "Kelvin \xE2\x84\xAA and \xE2\x84\xAB angstrom sign",
  };
  return s;
}

std::string long_prompt() {
  std::string p;
  for (int i = 0; i < 12; ++i) p += "masterpiece, best quality, ultra detailed, a photo of a cat, ";
  return p;
}

class TokenizeCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    std::ofstream(root() / "corpus.txt") << kCorpus;
    for (const char* name : {"merges.txt", "merges.txt.gz"}) {
      ProcessResult r = python({"--learn-merges", (root() / "corpus.txt").string(), "2000", (root() / name).string()});
      if (r.exit_code != 0) {
        setup_error_ = "the Python reference could not learn merges (needs /usr/bin/python3 with python3-regex): " +
                       r.err;
        return;
      }
    }
  }
  static void TearDownTestSuite() { delete dir_; }
  void SetUp() override { ASSERT_TRUE(setup_error_.empty()) << setup_error_; }

  static fs::path root() { return dir_->path(); }
  static std::string merges(bool gz = true) { return (root() / (gz ? "merges.txt.gz" : "merges.txt")).string(); }
  static ProcessResult gmi(std::vector<std::string> args) { return testing::run_gmi(std::move(args)); }
  static ProcessResult python(std::vector<std::string> args, const std::string& stdin_data = "") {
    const char* py = std::getenv("GMI_PYTHON");
    args.insert(args.begin(), std::string(GMI_SOURCE_DIR) + "/tests/reference/clip_tokenizer_ref.py");
    args.insert(args.begin(), py ? py : "/usr/bin/python3");
    return run_process(args, {}, stdin_data);
  }
  // {"text", "ids"} lines -> the ids, in order.
  static std::vector<std::vector<int>> ids_of(const std::string& out) {
    std::vector<std::vector<int>> all;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);) all.push_back(json::parse(line).at("ids").get<std::vector<int>>());
    return all;
  }
  static std::vector<std::vector<int>> gmi_ids(const std::vector<std::string>& texts, const std::string& vocab,
                                               const std::string& context) {
    std::vector<std::string> args = {"text", "tokenize", "--vocab", vocab, "--json", "--context", context, "--"};
    args.insert(args.end(), texts.begin(), texts.end());
    ProcessResult r = gmi(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ids_of(r.out);
  }
  static std::vector<std::vector<int>> reference_ids(const std::vector<std::string>& texts, const std::string& vocab,
                                                     const std::string& context) {
    std::string in;
    for (const auto& t : texts) in += json(t).dump() + "\n";
    ProcessResult r = python({"--encode", vocab, "--context", context}, in);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ids_of(r.out);
  }
  static testing::TempDir* dir_;
  static std::string setup_error_;
};
testing::TempDir* TokenizeCli::dir_ = nullptr;
std::string TokenizeCli::setup_error_;

TEST_F(TokenizeCli, IdsMatchThePythonReferenceOnHardStrings) {
  const auto& texts = hard_strings();
  const auto expected = reference_ids(texts, merges(false), "0");
  const auto got = gmi_ids(texts, merges(), "0");
  ASSERT_EQ(expected.size(), texts.size());
  ASSERT_EQ(got.size(), texts.size());
  int merged = 0;  // ids of merges (not bytes, not specials): the merges file really is exercised
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(got[i], expected[i]) << "text " << i << ": " << json(texts[i]).dump();
    for (int id : expected[i]) merged += id >= 512 && id < expected[i].front();
  }
  EXPECT_GT(merged, 100);
}

TEST_F(TokenizeCli, PlainAndGzippedMergesFilesAgree) {
  EXPECT_EQ(gmi_ids(hard_strings(), merges(false), "0"), gmi_ids(hard_strings(), merges(true), "0"));
}

TEST_F(TokenizeCli, DefaultContextTruncatesTo77WithEndLast) {
  const std::vector<std::string> texts = {long_prompt(), "a photo of a cat"};
  std::vector<std::string> args = {"text", "tokenize", "--vocab", merges(), "--json", "--", texts[0], texts[1]};
  ProcessResult r = gmi(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto got = ids_of(r.out);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got, reference_ids(texts, merges(false), "77"));
  ASSERT_EQ(got[0].size(), 77u);
  EXPECT_EQ(got[0].back(), reference_ids({""}, merges(false), "0")[0].back());  // end
  EXPECT_GT(gmi_ids({texts[0]}, merges(), "0")[0].size(), 77u);                // --context 0 keeps all
  EXPECT_LT(got[1].size(), 77u);                                               // never padded
}

TEST_F(TokenizeCli, JsonLinesCarryTheText) {
  ProcessResult r = gmi({"text", "tokenize", "--vocab", merges(), "--json", "a photo of a cat", "tabs\tand\nlines"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::istringstream in(r.out);
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_EQ(json::parse(line).at("text"), "a photo of a cat");
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_EQ(json::parse(line).at("text"), "tabs\tand\nlines");
  EXPECT_FALSE(std::getline(in, line));
}

TEST_F(TokenizeCli, TableShowsCountAndIdsPerText) {
  ProcessResult r = gmi({"text", "tokenize", "--vocab", merges(), "a photo of a cat", "hello"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto ids = gmi_ids({"a photo of a cat"}, merges(), "77")[0];
  std::string id_list;
  for (int id : ids) {
    if (!id_list.empty()) id_list += ' ';
    id_list += std::to_string(id);
  }
  EXPECT_NE(r.out.find("count"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"a photo of a cat\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(std::to_string(ids.size()) + "  \"a photo of a cat\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(id_list), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"hello\""), std::string::npos) << r.out;
}

TEST_F(TokenizeCli, BadVocabFileExitsTwoNamingIt) {
  const std::string bad = (root() / "bad-merges.txt").string();
  std::ofstream(bad) << "#version: 0.2\nh e\nthree sym bols\n";
  ProcessResult r = gmi({"text", "tokenize", "--vocab", bad, "hello"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("gmi: error: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(bad + ":3:"), std::string::npos) << r.err;

  r = gmi({"text", "tokenize", "--vocab", (root() / "missing.gz").string(), "hello"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("missing.gz"), std::string::npos) << r.err;
}

TEST_F(TokenizeCli, HelpDescribesTheOptions) {
  ProcessResult r = gmi({"text", "tokenize", "--help"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  for (const char* word : {"--vocab", "--context", "--json", "TEXT"})
    EXPECT_NE(r.out.find(word), std::string::npos) << word << " missing from:\n" << r.out;
  r = gmi({"text", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("tokenize"), std::string::npos) << r.out;
}

TEST_F(TokenizeCli, MissingTextIsAUsageError) {
  ProcessResult r = gmi({"text", "tokenize", "--vocab", merges()});
  EXPECT_NE(r.exit_code, 0);
  r = gmi({"text", "tokenize", "--vocab", merges(), "--context", "-1", "hello"});
  EXPECT_NE(r.exit_code, 0);
}

}  // namespace
}  // namespace gmi
