// Segment snapshots: a packed index written to a file and opened again (its binary16 points
// memory-mapped) must score exactly as before; damaged, truncated, foreign or mismatched
// files are refused with a message naming what is wrong.
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/metric.hpp"
#include "gmi/scoring.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using testing::make_random_spec;
using testing::TempDir;

constexpr int kD = 8, kDt = 6;

std::vector<Spec> hub(int models, unsigned seed0 = 1) {
  std::vector<Spec> specs;
  for (int m = 0; m < models; ++m)
    specs.push_back(make_random_spec("model-" + std::to_string(m), seed0 + static_cast<unsigned>(m),
                                     3 + m % 4, kD, kDt));
  for (int m = 0; m < models; ++m) specs[static_cast<std::size_t>(m)].downloads = 10.0 * m;
  return specs;
}

testing::RandomQueries queries(int n, unsigned seed) { return testing::random_queries(n, seed, kD, kDt); }

// Every scorer's every score, bit for bit.
void expect_same_scores(const SpecIndex& a, const SpecIndex& b) {
  ASSERT_EQ(a.model_ids(), b.model_ids());
  EXPECT_EQ(a.memory_bytes(), b.memory_bytes());
  EXPECT_EQ(a.storage(), b.storage());
  EXPECT_TRUE(a.image_encoder() == b.image_encoder());
  EXPECT_TRUE(a.text_encoder() == b.text_encoder());
  const auto q = queries(7, 3);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest, Scorer::kMean, Scorer::kPopularity}) {
    ScoreOptions o;
    o.scorer = scorer;
    const RowMatrixD sa = a.score_all_batch(q.xs, q.ts, o), sb = b.score_all_batch(q.xs, q.ts, o);
    ASSERT_EQ(sa.rows(), sb.rows());
    ASSERT_EQ(sa.cols(), sb.cols());
    for (Eigen::Index i = 0; i < sa.size(); ++i) EXPECT_EQ(sa.data()[i], sb.data()[i]) << to_string(scorer);
  }
}

std::vector<char> read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::filesystem::path& p, const std::vector<char>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Snapshot, BothStoragesRoundTripAndScoreBitForBit) {
  TempDir dir;
  for (SpecStorage storage : {SpecStorage::kF32, SpecStorage::kF16}) {
    const SpecIndex index(hub(40), nullptr, SpecSpace::kRaw, storage);
    const auto path = dir.path() / (std::string(to_string(storage)) + ".gmisnap");
    index.save(path.string());
    // Nothing else is left in the directory (the temporary file is renamed).
    EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()),
              storage == SpecStorage::kF32 ? 1 : 2);
    for (bool map : {true, false})
      for (bool verify : {true, false}) {
        SpecIndex::OpenOptions o;
        o.map_points = map;
        o.verify = verify;
        const SpecIndex opened = SpecIndex::open(path.string(), nullptr, o);
        expect_same_scores(index, opened);
        const bool mapped = map && storage == SpecStorage::kF16;
        EXPECT_EQ(opened.mapped_bytes() > 0, mapped);
        if (mapped) EXPECT_EQ(opened.mapped_bytes(), index.points() * (kD + kDt) * sizeof(std::uint16_t));
      }
  }
}

// A mapped index is an ordinary index: copies share the mapping (and outlive the first
// holder), a merge of mapped parts owns its points, and the two-stage search runs on it.
TEST(Snapshot, AMappedIndexCopiesMergesAndSearchesTwoStage) {
  TempDir dir;
  const SpecIndex index(hub(300), nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  const auto path = (dir.path() / "s.gmisnap").string();
  index.save(path);
  SpecIndex copy;
  {
    const SpecIndex opened = SpecIndex::open(path);
    copy = opened;
  }
  std::filesystem::remove(path);  // the mapping keeps the data
  expect_same_scores(index, copy);
  const SpecIndex merged = SpecIndex::merge({{&copy, nullptr}});
  EXPECT_EQ(merged.mapped_bytes(), 0u);
  expect_same_scores(index, merged);
  const auto q = queries(5, 9);
  ScoreOptions o;
  o.top_k = 4;
  SpecIndex::TwoStage search;
  search.candidates = 40;
  const auto want = index.rank_batch_two_stage(q.xs, q.ts, o, search);
  const auto got = copy.rank_batch_two_stage(q.xs, q.ts, o, search);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i)
    for (std::size_t j = 0; j < want[i].size(); ++j) EXPECT_EQ(got[i][j].model, want[i][j].model);
}

TEST(Snapshot, AnEmptyIndexRoundTrips) {
  TempDir dir;
  const auto path = (dir.path() / "e.gmisnap").string();
  SpecIndex().save(path);
  EXPECT_EQ(SpecIndex::open(path).size(), 0u);
}

TEST(Snapshot, DamagedTruncatedAndForeignFilesAreRefusedWithTheReason) {
  TempDir dir;
  const SpecIndex index(hub(30), nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  const auto path = dir.path() / "s.gmisnap";
  index.save(path.string());
  const std::vector<char> good = read_file(path);
  const auto bad = (dir.path() / "bad.gmisnap").string();

  // A flipped bit in the points (the first section, at 4096): verify catches it; a mapped
  // open without verify does not read the points and opens.
  std::vector<char> bytes = good;
  bytes[4096 + 10] ^= 0x10;
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("section 0 checksum mismatch"), std::string::npos);
  SpecIndex::OpenOptions lazy;
  lazy.verify = false;
  EXPECT_NO_THROW(SpecIndex::open(bad, nullptr, lazy));
  // ... but every array read in is always checked.
  bytes = good;
  bytes[bytes.size() - 3] ^= 0x01;  // the model ids, the last section
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad, nullptr, lazy); }).find("section 13 checksum mismatch"),
            std::string::npos);
  // The header.
  bytes = good;
  bytes[20] ^= 0x01;
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("header checksum mismatch"), std::string::npos);
  // Truncated.
  bytes.assign(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2));
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("outside the file"), std::string::npos);
  bytes.assign(good.begin(), good.begin() + 40);
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("truncated header"), std::string::npos);
  // A header whose checksum holds but whose sizes would wrap (points 2^48 of 2^20 columns).
  bytes = good;
  const auto put_u64 = [&](std::size_t at, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) bytes[at + static_cast<std::size_t>(i)] = static_cast<char>(v >> (8 * i));
  };
  const auto crc_at = [](const std::vector<char>& b, std::size_t n) {
    return static_cast<std::uint32_t>(::crc32(0L, reinterpret_cast<const Bytef*>(b.data()), static_cast<uInt>(n)));
  };
  std::size_t head = 0;  // where the header's own checksum sits
  for (std::size_t n = 64; n + 4 <= 4096 && head == 0; ++n) {
    std::uint32_t stored = 0;
    for (int i = 0; i < 4; ++i) stored |= static_cast<std::uint32_t>(static_cast<unsigned char>(good[n + static_cast<std::size_t>(i)])) << (8 * i);
    if (crc_at(good, n) == stored) head = n;
  }
  ASSERT_GT(head, 0u);
  put_u64(24, std::uint64_t{1} << 48);  // points (after magic, format, storage, models)
  put_u64(40, std::uint64_t{1} << 20);  // dx
  const std::uint32_t crc = crc_at(bytes, head);
  for (int i = 0; i < 4; ++i) bytes[head + static_cast<std::size_t>(i)] = static_cast<char>(crc >> (8 * i));
  write_file(bad, bytes);
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("implausible sizes"), std::string::npos);
  // Foreign.
  write_file(bad, std::vector<char>(100, 'x'));
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find("bad magic"), std::string::npos);
  write_file(bad, std::vector<char>(3, 'x'));
  EXPECT_THROW(SpecIndex::open(bad), SpecFormatError);
  EXPECT_THROW(SpecIndex::open((dir.path() / "missing").string()), IoError);
  // The message names the file.
  EXPECT_NE(error_of([&] { SpecIndex::open(bad); }).find(bad), std::string::npos);
}

TEST(Snapshot, TheMetricMustBeTheOneThePointsWereMappedWith) {
  TempDir dir;
  const std::vector<Spec> specs = hub(40);
  MetricOptions mo;
  mo.min_models = 4;
  const auto metric = std::make_shared<const Metric>(learn_metric(specs, mo));
  const SpecIndex index(specs, metric, SpecSpace::kRaw, SpecStorage::kF16);
  const auto path = (dir.path() / "m.gmisnap").string();
  index.save(path);
  expect_same_scores(index, SpecIndex::open(path, metric));
  EXPECT_THROW(SpecIndex::open(path), EncoderMismatchError);
  MetricOptions other = mo;
  other.shrinkage = 3.0;
  const auto another = std::make_shared<const Metric>(learn_metric(specs, other));
  EXPECT_NE(error_of([&] { SpecIndex::open(path, another); }).find("was packed with metric"), std::string::npos);
  const auto plain = (dir.path() / "p.gmisnap").string();
  SpecIndex(specs).save(plain);
  EXPECT_THROW(SpecIndex::open(plain, metric), EncoderMismatchError);
}

TEST(Snapshot, SavingWhereNothingCanBeWrittenIsAnIoError) {
  const SpecIndex index(hub(3));
  EXPECT_THROW(index.save("/nonexistent-dir/x.gmisnap"), IoError);
}

}  // namespace
}  // namespace gmi
