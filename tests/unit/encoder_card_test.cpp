// Encoder cards, the input geometry, the composite encoder and the registry; none of
// this needs LibTorch.
#include "gmi/encoder_card.hpp"

#include <gtest/gtest.h>

#include <array>
#include <random>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

json image_card(const std::string& sha) {
  return {{"card_version", 1},
          {"name", "tiny"},
          {"version", "1"},
          {"modality", "image"},
          {"backend", "torchscript"},
          {"dim", 36 + 24},
          {"default_gamma", 1.5},
          {"input",
           {{"size", 64}, {"resize", "shorter_side"}, {"filter", "bicubic"}, {"min_side", 80},
            {"scale", 255.0}, {"mean", {0.5, 0.4, 0.3}}, {"std", {0.25, 0.2, 0.3}}}},
          {"outputs",
           {{{"name", "a"}, {"channels", 8}, {"reduce", "gram_upper"}, {"weight", 2.0}},
            {{"name", "b"}, {"channels", 12}, {"reduce", "mean_std"}}}},
          {"files", {{{"role", "module"}, {"path", "m.pt"}, {"sha256", sha}}}}};
}

std::string expect_input_error(const fs::path& card) {
  try {
    load_encoder_card(card);
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InputError for " << card;
  return "";
}

TEST(EncoderCard, Sha256OfKnownInput) {
  testing::TempDir dir;
  write(dir.path() / "abc", "abc");
  EXPECT_EQ(sha256_file(dir.path() / "abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  write(dir.path() / "empty", "");
  EXPECT_EQ(sha256_file(dir.path() / "empty"), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(EncoderCard, ReadsEveryField) {
  testing::TempDir dir;
  write(dir.path() / "m.pt", "weights");
  write(dir.path() / "card.json", image_card(sha256_file(dir.path() / "m.pt")).dump());
  const EncoderCard c = load_encoder_card(dir.path() / "card.json");
  EXPECT_EQ(c.identity().str(), "tiny/1/60");
  EXPECT_DOUBLE_EQ(c.default_gamma, 1.5);
  EXPECT_EQ(c.input.size, 64);
  EXPECT_EQ(c.input.min_side, 80);
  EXPECT_EQ(c.input.filter, InputGeometry::Filter::kBicubic);
  EXPECT_FLOAT_EQ(c.input.std[1], 0.2f);
  ASSERT_EQ(c.outputs.size(), 2u);
  EXPECT_EQ(c.outputs[0].width(), 36);
  EXPECT_EQ(c.outputs[1].width(), 24);
  EXPECT_DOUBLE_EQ(c.outputs[1].weight, 1.0);
  EXPECT_EQ(c.file("module").path, fs::absolute(dir.path() / "m.pt"));
  EXPECT_NO_THROW(verify_card_files(c));
}

TEST(EncoderCard, ErrorsNameTheFileAndTheField) {
  testing::TempDir dir;
  const std::string sha(64, 'a');
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = image_card(sha);
    edit(j);
    write(dir.path() / "card.json", j.dump());
    return expect_input_error(dir.path() / "card.json");
  };
  EXPECT_NE(with([](json& j) { j.erase("name"); }).find("name: missing"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["input"]["resize"] = "stretch"; }).find("input.resize"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["input"]["std"] = {1, 0, 1}; }).find("input.std: must be positive"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["input"]["min_side"] = 10; }).find("input.min_side"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["dim"] = 61; }).find("dim: 61 but the outputs make 60"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["files"][0]["sha256"] = "xyz"; }).find("files[0].sha256"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["card_version"] = 2; }).find("card_version"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["outputs"][0]["reduce"] = "max"; }).find("outputs[0].reduce"), std::string::npos);
  EXPECT_NE(with([](json& j) { j["files"] = json::array(); }).find("no file with role \"module\""), std::string::npos);
  const std::string where = with([](json& j) { j.erase("version"); });
  EXPECT_NE(where.find((dir.path() / "card.json").string()), std::string::npos) << where;
  write(dir.path() / "card.json", "{not json");
  EXPECT_NE(expect_input_error(dir.path() / "card.json").find("not JSON"), std::string::npos);
  EXPECT_NE(expect_input_error(dir.path() / "absent.json").find("cannot be read"), std::string::npos);
}

TEST(EncoderCard, VerifyRefusesAMissingOrChangedFile) {
  testing::TempDir dir;
  write(dir.path() / "m.pt", "weights");
  write(dir.path() / "card.json", image_card(sha256_file(dir.path() / "m.pt")).dump());
  const EncoderCard c = load_encoder_card(dir.path() / "card.json");
  write(dir.path() / "m.pt", "other weights");
  try {
    verify_card_files(c);
    FAIL() << "a changed file verified";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("m.pt: sha256 mismatch"), std::string::npos) << e.what();
  }
  fs::remove(dir.path() / "m.pt");
  try {
    verify_card_files(c);
    FAIL() << "a missing file verified";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("is missing"), std::string::npos) << e.what();
  }
}

Image gradient(int w, int h) {
  Image im;
  im.width = w;
  im.height = h;
  im.rgb.resize(static_cast<std::size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      auto* p = &im.rgb[(static_cast<std::size_t>(y) * w + x) * 3];
      p[0] = static_cast<std::uint8_t>(x * 255 / std::max(1, w - 1));
      p[1] = static_cast<std::uint8_t>(y * 255 / std::max(1, h - 1));
      p[2] = static_cast<std::uint8_t>((x * 7 + y * 13) % 256);
    }
  return im;
}

TEST(InputGeometry, ShorterSideResizesThenCropsTheCentre) {
  InputGeometry g;
  g.size = 32;
  const Image out = prepare_image(gradient(100, 50), g);
  EXPECT_EQ(out.width, 32);
  EXPECT_EQ(out.height, 32);
  // 100x50 -> 64x32 -> columns 16..47: the red ramp is centred, so red at the middle ~ 127.
  EXPECT_NEAR(out.at(16, 16, 0), 127, 6);
  EXPECT_LT(out.at(0, 16, 0), out.at(31, 16, 0));
}

TEST(InputGeometry, NoneCropsAtNativeResolutionAndUpscalesOnlySmallImages) {
  InputGeometry g;
  g.size = 16;
  g.resize = InputGeometry::Resize::kNone;
  const Image big = gradient(64, 40);
  const Image out = prepare_image(big, g);
  ASSERT_EQ(out.width, 16);
  // Offsets (64-16)/2 = 24 and (40-16)/2 = 12: pixels are copied, not resampled.
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(out.at(x, y, c), big.at(x + 24, y + 12, c));
  const Image small = prepare_image(gradient(8, 12), g);
  EXPECT_EQ(small.width, 16);
  EXPECT_EQ(small.height, 16);
}

TEST(InputGeometry, ResampleKeepsAConstantImageConstant) {
  Image im = gradient(37, 23);
  std::fill(im.rgb.begin(), im.rgb.end(), 200);
  for (auto f : {InputGeometry::Filter::kBicubic, InputGeometry::Filter::kBilinear}) {
    for (auto [w, h] : {std::pair{11, 7}, std::pair{80, 50}}) {
      const Image out = resample(im, w, h, f);
      for (auto v : out.rgb) ASSERT_EQ(v, 200);
    }
  }
}

// A noisy image: windows must match pixel for pixel, not only on smooth content.
Image noise_image(int w, int h, unsigned seed) {
  Image im;
  im.width = w;
  im.height = h;
  im.rgb.resize(static_cast<std::size_t>(w) * h * 3);
  std::mt19937 rng(seed);
  for (auto& v : im.rgb) v = static_cast<std::uint8_t>(rng() & 255);
  return im;
}

Image crop(const Image& im, int x0, int y0, int w, int h) {
  Image out;
  out.width = w;
  out.height = h;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) out.rgb.push_back(im.at(x0 + x, y0 + y, c));
  return out;
}

TEST(InputGeometry, AWindowOfAResampleIsThatPartOfTheWholeResample) {
  for (auto f : {InputGeometry::Filter::kBicubic, InputGeometry::Filter::kBilinear}) {
    for (auto [sw, sh, W, H] : {std::array{97, 61, 40, 30}, std::array{30, 20, 90, 60}, std::array{50, 3, 400, 24}}) {
      const Image src = noise_image(sw, sh, static_cast<unsigned>(sw * H));
      const Image whole = resample(src, W, H, f);
      const int x0 = W / 3, y0 = H / 4, w = W / 2, h = H / 2;
      const Image part = resample_window(src, W, H, x0, y0, w, h, f);
      ASSERT_EQ(part.rgb, crop(whole, x0, y0, w, h).rgb) << sw << "x" << sh << " -> " << W << "x" << H;
    }
  }
  EXPECT_THROW(resample_window(noise_image(8, 8, 1), 16, 16, 10, 0, 8, 8, InputGeometry::Filter::kBicubic),
               InputError);
}

TEST(InputGeometry, AnExtremeAspectRatioCostsItsCropNotItsStrip) {
  // 20000 x 1 scaled to a shorter side of 224 would be a 4.5 G-pixel strip; only the
  // 224 x 224 crop is computed (this test would need ~3 GB and minutes otherwise).
  InputGeometry g;
  g.size = 224;
  g.resize = InputGeometry::Resize::kShorterSide;
  const Image out = prepare_image(noise_image(20000, 1, 7), g);
  EXPECT_EQ(out.width, 224);
  EXPECT_EQ(out.height, 224);
}

TEST(InputGeometry, BicubicMatchesPillowWithinOneLevel) {
  // Pillow's resize is the reference CLIP's preprocessing uses (torchvision on PIL images).
  testing::TempDir dir;
  const Image src = gradient(97, 61);
  write(dir.path() / "src.png", std::string(reinterpret_cast<const char*>(encode_png(src).data()), encode_png(src).size()));
  const auto r = testing::run_process(
      {"/usr/bin/python3", "-c",
       "import sys; from PIL import Image\n"
       "im = Image.open(sys.argv[1]).convert('RGB')\n"
       "im.resize((40, 25), Image.BICUBIC).save(sys.argv[2])\n"
       "im.resize((150, 90), Image.BICUBIC).save(sys.argv[3])\n"
       "im.resize((40, 25), Image.BILINEAR).save(sys.argv[4])\n",
       (dir.path() / "src.png").string(), (dir.path() / "down.png").string(), (dir.path() / "up.png").string(),
       (dir.path() / "bil.png").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::tuple<std::string, int, int, InputGeometry::Filter> cases[] = {
      {"down.png", 40, 25, InputGeometry::Filter::kBicubic},
      {"up.png", 150, 90, InputGeometry::Filter::kBicubic},
      {"bil.png", 40, 25, InputGeometry::Filter::kBilinear}};
  for (const auto& [file, w, h, f] : cases) {
    const Image ref = read_image_file(dir.path() / file);
    const Image ours = resample(src, w, h, f);
    ASSERT_EQ(ours.rgb.size(), ref.rgb.size());
    int worst = 0;
    for (std::size_t i = 0; i < ref.rgb.size(); ++i) worst = std::max(worst, std::abs(int(ours.rgb[i]) - int(ref.rgb[i])));
    EXPECT_LE(worst, 1) << file;
  }
}

class FixedEncoder final : public ImageEncoder {
 public:
  FixedEncoder(std::string name, Eigen::RowVectorXf row, int side) : row_(std::move(row)), side_(side) {
    id_.name = std::move(name);
    id_.version = "1";
    id_.dim = static_cast<int>(row_.size());
  }
  const EncoderIdentity& identity() const override { return id_; }
  int input_min_side() const override { return side_; }
  RowMatrix encode(const std::vector<Image>& images) const override {
    RowMatrix out(static_cast<Eigen::Index>(images.size()), id_.dim);
    for (Eigen::Index i = 0; i < out.rows(); ++i) out.row(i) = row_;
    return out;
  }

 private:
  EncoderIdentity id_;
  Eigen::RowVectorXf row_;
  int side_;
};

TEST(CompositeEncoder, BlocksGetTheirWeightsShareOfTheNorm) {
  Eigen::RowVectorXf a(2), b(3);
  a << 1, 0;
  b << 0, 0.6f, 0.8f;
  EncoderIdentity id;
  id.name = "combo";
  id.version = "1";
  id.dim = 5;
  auto enc = make_composite_image_encoder(
      id, {{std::make_shared<FixedEncoder>("a", a, 100), 3.0}, {std::make_shared<FixedEncoder>("b", b, 300), 1.0}});
  EXPECT_EQ(enc->input_min_side(), 300);
  const RowMatrix x = enc->encode({Image{}, Image{}});
  ASSERT_EQ(x.cols(), 5);
  EXPECT_NEAR(x.row(1).norm(), 1.0, 1e-6);
  EXPECT_NEAR(x.row(0).head(2).squaredNorm(), 0.75, 1e-6);
  EXPECT_NEAR(x.row(0).tail(3).squaredNorm(), 0.25, 1e-6);
  EXPECT_NEAR(x(0, 4) / x(0, 3), 0.8 / 0.6, 1e-5);
  id.dim = 6;
  EXPECT_THROW(make_composite_image_encoder(id, {{std::make_shared<FixedEncoder>("a", a, 1), 1.0},
                                                 {std::make_shared<FixedEncoder>("b", b, 1), 1.0}}),
               InputError);
}

TEST(EncoderRegistry, AutoIsTheBuiltinEncoderWhenNothingIsInstalled) {
  testing::TempDir dir;
  EncoderRuntime rt;
  rt.encoder_dir = dir.path();
  EXPECT_EQ(resolve_encoder("auto", rt, "image"), "builtin");
  EXPECT_EQ(image_encoder_info("auto", rt).identity, make_builtin_image_encoder()->identity());
  EXPECT_EQ(text_encoder_identity("auto", rt), make_builtin_text_encoder()->identity());
  // A damaged install (card without its files) does not count as installed.
  write(dir.path() / kDefaultCompositeEncoder / "card.json", "{\"card_version\": 1}");
  EXPECT_EQ(resolve_encoder("auto", rt, "image"), "builtin");
}

TEST(EncoderRegistry, NamesResolveInTheEncoderFolderAndModalitiesAreChecked) {
  testing::TempDir dir;
  EncoderRuntime rt;
  rt.encoder_dir = dir.path();
  // A composite of the built-in encoder with itself needs no weights at all.
  const int d = make_builtin_image_encoder()->identity().dim;
  write(dir.path() / "twice" / "card.json",
        json{{"card_version", 1}, {"name", "twice"}, {"version", "1"}, {"modality", "image"},
             {"backend", "composite"}, {"dim", 2 * d},
             {"parts", {{{"encoder", "builtin"}, {"weight", 1}}, {{"encoder", "builtin"}, {"weight", 3}}}}}
            .dump());
  const ImageEncoderInfo info = image_encoder_info("twice", rt);
  EXPECT_EQ(info.identity.name, "twice");
  EXPECT_EQ(info.identity.dim, 2 * d);
  EXPECT_NE(info.identity.version.find("gmi-style/2"), std::string::npos) << info.identity.version;
  auto enc = make_image_encoder("twice", rt);
  EXPECT_EQ(enc->identity(), info.identity);
  EXPECT_THROW(make_text_encoder("twice", rt), InputError);  // an image card, not a text card
  try {
    make_image_encoder("absent", rt);
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown encoder 'absent'"), std::string::npos);
  }
}

}  // namespace
}  // namespace gmi
