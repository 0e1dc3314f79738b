// The prompt-bank interrogator's maths on closed-form cases, and the interrogator names.
#include "gmi/interrogator.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "gmi/error.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

RowMatrix rows(std::initializer_list<std::initializer_list<float>> values) {
  RowMatrix m(static_cast<Eigen::Index>(values.size()),
              static_cast<Eigen::Index>(values.begin()->size()));
  Eigen::Index i = 0;
  for (const auto& r : values) {
    Eigen::Index j = 0;
    for (float v : r) m(i, j++) = v;
    ++i;
  }
  return m;
}

TEST(PromptBank, TopOneIsTheNearestPromptItself) {
  const RowMatrix bank = rows({{1, 0, 0}, {0, 1, 0}, {0, 0, 1}});
  const RowMatrix x = rows({{0.2f, 0.9f, 0.1f}, {0.1f, 0.1f, -0.5f}});
  const RowMatrix t = prompt_bank_pseudo_prompts(x, bank, 1, 0.01);
  EXPECT_TRUE(t.row(0).isApprox(bank.row(1), 1e-6f)) << t;
  // Row 1's nearest by cosine is e1 (0.1 beats e2's tie at 0.1 by bank order, e3 is -0.5).
  EXPECT_TRUE(t.row(1).isApprox(bank.row(0), 1e-6f)) << t;
}

TEST(PromptBank, TwoEquallyNearPromptsMixHalfAndHalfAndRenormalise) {
  const RowMatrix bank = rows({{1, 0}, {0, 1}});
  const RowMatrix x = rows({{1, 1}});
  const RowMatrix t = prompt_bank_pseudo_prompts(x, bank, 2, 0.05);
  const float h = 1.0f / std::sqrt(2.0f);
  EXPECT_NEAR(t(0, 0), h, 1e-6);
  EXPECT_NEAR(t(0, 1), h, 1e-6);
}

TEST(PromptBank, WeightsAreTheSoftmaxOfCosinesOverTau) {
  // x at 0 rad; bank at 0 and 90 degrees: cosines 1 and 0; tau = 0.5.
  // w = softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1); t^ = w / ||w||.
  const RowMatrix bank = rows({{1, 0}, {0, 1}, {-1, 0}});
  const RowMatrix x = rows({{3, 0}});  // length does not matter: cosines
  const RowMatrix t = prompt_bank_pseudo_prompts(x, bank, 2, 0.5);
  const double a = std::exp(2.0), b = 1.0, n = std::sqrt(a * a + b * b);
  EXPECT_NEAR(t(0, 0), a / n, 1e-6);
  EXPECT_NEAR(t(0, 1), b / n, 1e-6);
  // The third prompt (cos -1) is outside the top 2 and does not count at all.
  const RowMatrix all = prompt_bank_pseudo_prompts(x, bank, 3, 0.5);
  const double c = std::exp(-2.0), m0 = a - c, m1 = b, nn = std::sqrt(m0 * m0 + m1 * m1);
  EXPECT_NEAR(all(0, 0), m0 / nn, 1e-6);
  EXPECT_NEAR(all(0, 1), m1 / nn, 1e-6);
}

TEST(PromptBank, LargeTauIsTheMeanOfTheTopKAndTopKClampsToTheBank) {
  const RowMatrix bank = rows({{1, 0}, {0, 1}});
  const RowMatrix x = rows({{1, 0.2f}});
  const RowMatrix t = prompt_bank_pseudo_prompts(x, bank, 50, 1e9);
  EXPECT_NEAR(t(0, 0), t(0, 1), 1e-6);
  EXPECT_NEAR(t.row(0).norm(), 1.0, 1e-6);
}

TEST(PromptBank, RefusesMismatchedDimsAndBadOptions) {
  const RowMatrix bank = rows({{1, 0, 0}});
  const RowMatrix x = rows({{1, 0}});
  try {
    prompt_bank_pseudo_prompts(x, bank, 1, 0.1);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("share one space"), std::string::npos) << e.what();
  }
  EXPECT_THROW(prompt_bank_pseudo_prompts(rows({{1, 0, 0}}), bank, 0, 0.1), InputError);
  EXPECT_THROW(prompt_bank_pseudo_prompts(rows({{1, 0, 0}}), bank, 1, 0.0), InputError);
  EXPECT_THROW(prompt_bank_pseudo_prompts(rows({{1, 0, 0}}), RowMatrix(0, 3), 1, 0.1), InputError);
  auto interrogator = make_prompt_bank_interrogator(bank, 4, 0.1);
  EXPECT_EQ(interrogator->name(), "prompt-bank");
  EXPECT_TRUE(interrogator->pseudo_prompts(rows({{0, 2, 0}})).row(0).isApprox(bank.row(0)));
}

TEST(PromptBank, ReadsOnePromptPerLineSkippingBlanksAndComments) {
  testing::TempDir dir;
  const auto path = dir.path() / "bank.txt";
  std::ofstream(path) << "# platform prompts\n  a photo of a cat  \n\n\tanime style\r\n#x\n";
  EXPECT_EQ(read_prompt_bank(path.string()),
            (std::vector<std::string>{"a photo of a cat", "anime style"}));
  std::ofstream(dir.path() / "empty.txt") << "\n# nothing\n";
  EXPECT_THROW(read_prompt_bank((dir.path() / "empty.txt").string()), InputError);
  EXPECT_THROW(read_prompt_bank((dir.path() / "missing.txt").string()), IoError);
}

TEST(Interrogators, EachNameSaysWhatItWorksFrom) {
  EXPECT_EQ(interrogator_input("neighbour"), InterrogatorInput::kImageEmbedding);
  EXPECT_EQ(interrogator_input("ridge"), InterrogatorInput::kImageEmbedding);
  EXPECT_EQ(interrogator_input("prompt-bank"), InterrogatorInput::kImageEmbedding);
  EXPECT_EQ(interrogator_input("captioner"), InterrogatorInput::kImage);
  EXPECT_TRUE(hub_learned_interrogator("ridge"));
  EXPECT_FALSE(hub_learned_interrogator("prompt-bank"));
  try {
    interrogator_input("oracle");
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("prompt-bank, captioner"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace gmi
