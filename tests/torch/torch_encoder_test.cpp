// The TorchScript backend on small modules the tests make with python3-torch: rows equal
// an independent torch computation of the card's recipe, batching changes nothing, and
// every loading error names the file.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/image.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

class TorchEncoder : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    auto r = testing::run_process({"/usr/bin/python3", GMI_SOURCE_DIR "/tests/reference/make_tiny_encoders.py",
                                   "--out", (dir_->path() / "tiny").string()});
    ASSERT_EQ(r.exit_code, 0) << "python3-torch is needed for these tests: " << r.err;
    r = testing::run_process({"/usr/bin/python3", GMI_SOURCE_DIR "/scripts/export_clip.py", "--random-init",
                              "--tiny", "--captioner-tiny", "--out", (dir_->path() / "clip").string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path tiny(const std::string& p) { return dir_->path() / "tiny" / p; }
  static fs::path clip(const std::string& p) { return dir_->path() / "clip" / p; }

  static std::vector<Image> images() {
    std::vector<Image> out;
    for (int i = 0; i < 3; ++i) out.push_back(read_image_file(tiny("images/" + std::to_string(i) + ".png")));
    return out;
  }

  // A copy of the "maps" encoder whose card is edited.
  static fs::path edited(const std::string& name, const std::function<void(json&)>& edit) {
    const fs::path d = dir_->path() / name;
    fs::create_directories(d);
    fs::copy_file(tiny("maps/module.pt"), d / "module.pt", fs::copy_options::overwrite_existing);
    json card = json::parse(std::ifstream(tiny("maps/card.json")));
    edit(card);
    std::ofstream(d / "card.json") << card.dump();
    return d / "card.json";
  }

  static std::string load_error(const fs::path& card, const EncoderRuntime& rt = {}) {
    try {
      make_image_encoder(card.string(), rt);
    } catch (const InputError& e) {
      return e.what();
    }
    ADD_FAILURE() << "no InputError for " << card;
    return "";
  }

  static testing::TempDir* dir_;
};

testing::TempDir* TorchEncoder::dir_ = nullptr;

TEST_F(TorchEncoder, RowsEqualTheCardsRecipeComputedByTorch) {
  const json expected = json::parse(std::ifstream(tiny("expected.json")));
  for (const std::string name : {"maps", "vector"}) {
    auto enc = make_image_encoder(tiny(name + "/card.json").string());
    EXPECT_EQ(enc->identity().str(), "tiny-" + name + "/test1/" + std::to_string(expected[name][0].size()));
    EXPECT_DOUBLE_EQ(enc->identity().default_gamma, 1.5);
    const RowMatrix x = enc->encode(images());
    ASSERT_EQ(x.rows(), 3);
    double worst = 0;
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      EXPECT_NEAR(x.row(i).norm(), 1.0, 1e-5);
      for (Eigen::Index j = 0; j < x.cols(); ++j) {
        worst = std::max(worst, std::abs(x(i, j) - expected[name][i][j].get<double>()));
      }
    }
    EXPECT_LT(worst, 1e-5) << name;
  }
}

TEST_F(TorchEncoder, BatchesOfAnySizeGiveTheSameRows) {
  EncoderRuntime one;
  one.max_batch = 1;
  auto batched = make_image_encoder(tiny("maps/card.json").string());
  auto single = make_image_encoder(tiny("maps/card.json").string(), one);
  const RowMatrix a = batched->encode(images());
  const RowMatrix b = single->encode(images());
  EXPECT_LT((a - b).cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_EQ(batched->encode({}).rows(), 0);
}

TEST_F(TorchEncoder, ImagesOfOtherSizesArePreparedAsTheCardSays) {
  auto enc = make_image_encoder(tiny("maps/card.json").string());
  Image big = resize(images()[0], 160, 96);
  const RowMatrix x = enc->encode({big});
  EXPECT_NEAR(x.row(0).norm(), 1.0, 1e-5);
  // The card's geometry applied first gives the same row.
  const EncoderCard card = load_encoder_card(tiny("maps/card.json"));
  const RowMatrix y = enc->encode({prepare_image(big, card.input)});
  EXPECT_LT((x - y).cwiseAbs().maxCoeff(), 1e-6);
}

TEST_F(TorchEncoder, LoadingErrorsNameTheFile) {
  std::string e = load_error(edited("three", [](json& c) {
    c["outputs"].push_back({{"name", "c"}, {"channels", 4}, {"reduce", "mean_std"}});
    c["dim"] = 68;
  }));
  EXPECT_NE(e.find("returns 2 tensor(s)"), std::string::npos) << e;
  EXPECT_NE(e.find("three/module.pt"), std::string::npos) << e;

  e = load_error(edited("channels", [](json& c) {
    c["outputs"][0]["channels"] = 9;
    c["dim"] = 45 + 24;
  }));
  EXPECT_NE(e.find("has 8 channels, the card says 9"), std::string::npos) << e;

  e = load_error(edited("sha", [](json& c) { c["files"][0]["sha256"] = std::string(64, '0'); }));
  EXPECT_NE(e.find("sha256 mismatch"), std::string::npos) << e;

  const fs::path garbage = edited("garbage", [](json&) {});
  std::ofstream(garbage.parent_path() / "module.pt") << "not a TorchScript archive";
  const std::string sha = sha256_file(garbage.parent_path() / "module.pt");
  json c = json::parse(std::ifstream(garbage));
  c["files"][0]["sha256"] = sha;
  std::ofstream(garbage) << c.dump();
  e = load_error(garbage);
  EXPECT_NE(e.find("failed to load TorchScript module"), std::string::npos) << e;
  EXPECT_NE(e.find("garbage/module.pt"), std::string::npos) << e;

  const fs::path missing = edited("missing", [](json&) {});
  fs::remove(missing.parent_path() / "module.pt");
  e = load_error(missing);
  EXPECT_NE(e.find("is missing"), std::string::npos) << e;
}

TEST_F(TorchEncoder, ACudaDeviceWithoutCudaIsAClearError) {
  EncoderRuntime rt;
  rt.device = "cuda:0";
  const std::string e = load_error(tiny("maps/card.json"), rt);
  // On a machine with a GPU this loads; here it must say why it cannot.
  if (!e.empty()) EXPECT_NE(e.find("cuda:0"), std::string::npos) << e;
  rt.device = "tpu";
  EXPECT_NE(load_error(tiny("maps/card.json"), rt).find("not cpu, cuda or cuda:N"), std::string::npos);
}

TEST_F(TorchEncoder, ClipTowersGiveUnitRowsAndEmptyTextsZeroRows) {
  auto image = make_image_encoder(clip("image.card.json").string());
  EXPECT_EQ(image->identity().dim, 32);
  EXPECT_EQ(image->input_min_side(), 224);
  const RowMatrix x = image->encode(images());  // 64x64 images, upscaled to 224 by the card's geometry
  for (Eigen::Index i = 0; i < x.rows(); ++i) EXPECT_NEAR(x.row(i).norm(), 1.0, 1e-5);
  EXPECT_GT((x.row(0) - x.row(1)).norm(), 1e-4);

  auto text = make_text_encoder(clip("text.card.json").string());
  EXPECT_EQ(text->identity().dim, 32);
  const RowMatrix t = text->encode({"a watercolour of a harbour", "", "a watercolour of a harbour",
                                    "a pencil sketch of a cat"});
  EXPECT_NEAR(t.row(0).norm(), 1.0, 1e-5);
  EXPECT_EQ(t.row(1).norm(), 0.0);
  EXPECT_LT((t.row(0) - t.row(2)).norm(), 1e-6);
  EXPECT_GT((t.row(0) - t.row(3)).norm(), 1e-4);
  EXPECT_THROW(make_text_encoder(clip("image.card.json").string()), InputError);
}

TEST_F(TorchEncoder, ClipTextRowsEqualTheExportedModuleRunFromPython) {
  // The same prompts through the reference tokenizer and text.pt in Python.
  const std::vector<std::string> prompts = {"a watercolour of a harbour at dusk",
                                            "Oil painting, thick impasto; it's a portrait!"};
  auto text = make_text_encoder(clip("text.card.json").string());
  const RowMatrix t = text->encode(prompts);
  const auto r = testing::run_process(
      {"/usr/bin/python3", "-c",
       "import json, sys, torch\n"
       "sys.path.insert(0, sys.argv[1])\n"
       "import clip_tokenizer_ref as ref\n"
       "tok = ref.Tokenizer(ref.read_merges(sys.argv[2]))\n"
       "m = torch.jit.load(sys.argv[3])\n"
       "rows = []\n"
       "for p in json.loads(sys.argv[4]):\n"
       "    ids = tok.encode_with_specials(p, 77)\n"
       "    ids = ids + [0] * (77 - len(ids))\n"
       "    y = m(torch.tensor([ids]))[0]\n"
       "    rows.append((y / y.norm()).tolist())\n"
       "print(json.dumps(rows))\n",
       GMI_SOURCE_DIR "/tests/reference", clip("bpe_tiny_vocab.txt.gz").string(), clip("text.pt").string(),
       json(prompts).dump()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json rows = json::parse(r.out);
  for (std::size_t i = 0; i < prompts.size(); ++i)
    for (Eigen::Index j = 0; j < t.cols(); ++j)
      EXPECT_NEAR(t(static_cast<Eigen::Index>(i), j), rows[i][j].get<double>(), 1e-5) << prompts[i];
}

TEST_F(TorchEncoder, CaptionerCaptionsEqualTheModuleRunFromPython) {
  auto captioner = make_captioner(clip("captioner.card.json").string());
  EXPECT_EQ(captioner->identity().name, "clip-tiny-random-captioner");
  EXPECT_EQ(captioner->input_min_side(), 224);
  // Images at the module's size, so both sides see the same pixels.
  std::vector<Image> ims;
  std::vector<std::string> paths;
  for (const Image& small : images()) {
    ims.push_back(resize(small, 224, 224));
    paths.push_back((dir_->path() / ("cap" + std::to_string(paths.size()) + ".png")).string());
    const auto png = encode_png(ims.back());
    std::ofstream(paths.back(), std::ios::binary).write(reinterpret_cast<const char*>(png.data()), png.size());
  }
  const std::vector<std::string> caps = captioner->caption(ims);
  ASSERT_EQ(caps.size(), 3u);
  std::vector<std::string> argv = {
      "/usr/bin/python3", "-c",
      "import json, sys, torch, numpy as np\n"
      "from PIL import Image\n"
      "sys.path.insert(0, sys.argv[1])\n"
      "import clip_tokenizer_ref as ref\n"
      "tok = ref.Tokenizer(ref.read_merges(sys.argv[2]))\n"
      "m = torch.jit.load(sys.argv[3])\n"
      "card = json.load(open(sys.argv[4]))['input']\n"
      "start, end = len(tok.vocab) - 2, len(tok.vocab) - 1\n"
      "out = []\n"
      "for path in sys.argv[5:]:\n"
      "    x = torch.from_numpy(np.asarray(Image.open(path).convert('RGB')).copy()).permute(2, 0, 1)[None]\n"
      "    x = x.float() / card['scale']\n"
      "    x = (x - torch.tensor(card['mean']).view(1, 3, 1, 1)) / torch.tensor(card['std']).view(1, 3, 1, 1)\n"
      "    toks = []\n"
      "    for i in m(x)[0].tolist():\n"
      "        if i == end: break\n"
      "        if 0 < i < start: toks.append(tok.vocab[i])\n"
      "    raw = bytes(tok.char_to_byte[c] for c in ''.join(toks))\n"
      "    out.append(raw.decode('utf-8', errors='replace').replace('</w>', ' ').rstrip(' '))\n"
      "print(json.dumps(out))\n",
      GMI_SOURCE_DIR "/tests/reference", clip("bpe_tiny_vocab.txt.gz").string(), clip("captioner.pt").string(),
      clip("captioner.card.json").string()};
  for (const auto& p : paths) argv.push_back(p);
  const auto r = testing::run_process(argv);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json raw = json::parse(r.out);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(caps[i], raw[i].get<std::string>()) << "image " << i;
  }
  EXPECT_FALSE(caps[0].empty());
  EXPECT_THROW(make_captioner(clip("image.card.json").string()), InputError);
  EXPECT_THROW(make_captioner("auto"), InputError);
}

}  // namespace
}  // namespace gmi
