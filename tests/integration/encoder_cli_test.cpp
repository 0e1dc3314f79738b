// The encoder choice through the real `gmi` binary: `auto` resolves the same way for every
// command, and a spec made by one encoder is refused by a query embedded by another, with
// both identities in the message.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"
#include "synthetic_images.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

testing::ProcessResult gmi(std::vector<std::string> args, std::vector<std::string> env = {}) {
  return testing::run_gmi(std::move(args), env);
}

// A composite of the built-in encoder with itself: a real composite card that needs no
// weights, installed under the name `auto` picks.
void install_composite(const fs::path& dir) {
  const int d = make_builtin_image_encoder()->identity().dim;
  fs::create_directories(dir / "gmi-style-mnv2");
  std::ofstream(dir / "gmi-style-mnv2" / "card.json")
      << json{{"card_version", 1}, {"name", "gmi-style-mnv2"}, {"version", "test"}, {"modality", "image"},
              {"backend", "composite"}, {"dim", 2 * d}, {"default_gamma", 2.0},
              {"parts", {{{"encoder", "builtin"}, {"weight", 0.7}}, {{"encoder", "builtin"}, {"weight", 0.3}}}}}
             .dump();
}

class EncoderCli : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir_.path() / "m");
    std::ofstream mf(dir_.path() / "m" / "manifest.jsonl");
    for (int c = 0; c < 6; ++c) {
      const std::string rel = "img" + std::to_string(c) + ".jpg";
      testing::write_file(dir_.path() / "m" / rel, encode_jpeg(testing::styled(testing::content_image(c, 1), 1, c), 92));
      mf << json{{"image", rel}, {"prompt", "pattern " + std::to_string(c)}}.dump() << "\n";
    }
    testing::write_file(dir_.path() / "q.jpg", encode_jpeg(testing::styled(testing::content_image(30, 9), 1, 7), 92));
  }
  std::string enc() const { return (dir_.path() / "encoders").string(); }
  testing::TempDir dir_;
};

TEST_F(EncoderCli, AutoIsTheInstalledCompositeForEveryCommandWhenLibTorchIsBuiltIn) {
  fs::create_directories(enc());
  auto r = gmi({"encoder", "show", "--json", "--encoder-dir", enc()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["source"], "builtin");
  install_composite(enc());
  r = gmi({"encoder", "show", "--json"}, {"GMI_ENCODER_DIR=" + enc()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json shown = json::parse(r.out);
  const bool torch = shown["torch"].get<std::string>().rfind("LibTorch", 0) == 0;
  EXPECT_EQ(shown["source"] == "builtin", !torch) << shown.dump();
  // spec build and identify resolve `auto` the same way: the spec records that identity.
  r = gmi({"spec", "build", "--model", "m1", "--manifest", (dir_.path() / "m" / "manifest.jsonl").string(),
           "--store", "dir:" + (dir_.path() / "specs").string(), "--json"},
          {"GMI_ENCODER_DIR=" + enc()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["spec"]["image_encoder"]["name"], torch ? "gmi-style-mnv2" : "gmi-style");
  r = gmi({"identify", "--store", "dir:" + (dir_.path() / "specs").string(), "--json", (dir_.path() / "q.jpg").string()},
          {"GMI_ENCODER_DIR=" + enc()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(EncoderCli, ASpecOfOneEncoderIsRefusedByAQueryOfAnotherNamingBoth) {
  install_composite(enc());
  auto r = gmi({"spec", "build", "--model", "m1", "--manifest", (dir_.path() / "m" / "manifest.jsonl").string(),
                "--store", "dir:" + (dir_.path() / "specs").string(), "--encoder", "builtin"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = gmi({"identify", "--store", "dir:" + (dir_.path() / "specs").string(), "--encoder-dir", enc(), "--encoder",
           "gmi-style-mnv2", (dir_.path() / "q.jpg").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("gmi-style/2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("gmi-style-mnv2/test"), std::string::npos) << r.err;
}

TEST_F(EncoderCli, AnUnknownOrBrokenEncoderIsABadInputExit) {
  auto r = gmi({"encoder", "show", "--encoder-dir", enc(), "nope"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown encoder 'nope'"), std::string::npos) << r.err;
  fs::create_directories(dir_.path() / "bad");
  std::ofstream(dir_.path() / "bad" / "card.json") << "{\"card_version\": 1, \"name\": \"x\"}";
  r = gmi({"identify", "--store", "dir:" + (dir_.path() / "specs").string(), "--encoder",
           (dir_.path() / "bad" / "card.json").string(), (dir_.path() / "q.jpg").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("version: missing"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace gmi
