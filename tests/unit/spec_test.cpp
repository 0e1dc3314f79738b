// Spec serialization ("gmispec" v1), validation, model ids, and the directory SpecStore.
#include "gmi/spec.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <thread>

#include "gmi/error.hpp"
#include "gmi/spec_store.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;
using testing::expect_same_spec;
using testing::make_random_spec;
using Bytes = std::vector<std::uint8_t>;

// An independent, bitwise CRC-32 (IEEE), so the test does not trust the code under test.
std::uint32_t reference_crc32(const std::uint8_t* p, std::size_t n) {
  std::uint32_t c = 0xFFFFFFFFU;
  for (std::size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320U & (0U - (c & 1U)));
  }
  return ~c;
}

std::uint32_t read_u32(const Bytes& b, std::size_t at) {
  return b[at] | b[at + 1] << 8 | b[at + 2] << 16 | static_cast<std::uint32_t>(b[at + 3]) << 24;
}

void write_u32(Bytes& b, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
}

void fix_crc(Bytes& b) { write_u32(b, b.size() - 4, reference_crc32(b.data(), b.size() - 4)); }

/// The pieces of a serialized spec, to re-assemble with changes.
struct Parts {
  std::uint32_t version;
  nlohmann::json meta;
  Bytes arrays;
};

Parts split(const Bytes& blob) {
  const std::uint32_t json_len = read_u32(blob, 12);
  const std::size_t array_start = (16 + json_len + 7) / 8 * 8;
  return {read_u32(blob, 8), nlohmann::json::parse(blob.begin() + 16, blob.begin() + 16 + json_len),
          Bytes(blob.begin() + static_cast<long>(array_start), blob.end() - 4)};
}

/// Builds a blob with a correct checksum from arbitrary (possibly hostile) parts.
Bytes assemble(const std::string& json, const Bytes& arrays, std::uint32_t version = 1) {
  const std::size_t array_start = (16 + json.size() + 7) / 8 * 8;
  Bytes b(array_start + arrays.size() + 4, 0);
  std::memcpy(b.data(), "GMISPEC", 8);  // with its '\0'
  write_u32(b, 8, version);
  write_u32(b, 12, static_cast<std::uint32_t>(json.size()));
  std::copy(json.begin(), json.end(), b.begin() + 16);
  std::copy(arrays.begin(), arrays.end(), b.begin() + static_cast<long>(array_start));
  fix_crc(b);
  return b;
}

Bytes assemble(const Parts& p) { return assemble(p.meta.dump(), p.arrays, p.version); }

std::string parse_error(const Bytes& blob) {
  try {
    parse_spec(blob);
  } catch (const SpecFormatError& e) {
    return e.what();
  }
  ADD_FAILURE() << "parse_spec accepted the blob";
  return "";
}

std::string validate_error(const Spec& s) {
  try {
    validate(s);
  } catch (const SpecFormatError& e) {
    return e.what();
  }
  ADD_FAILURE() << "validate accepted the spec";
  return "";
}

// ---------------------------------------------------------------------------------------
// Round trip and layout

TEST(Spec, RoundTripKeepsEveryFieldAndArraysBitExact) {
  Spec s = make_random_spec("sdxl-anime_v1.0", 42);
  // Values whose bits a sloppy float path would lose.
  s.zx(0, 0) = -0.0f;
  s.zx(0, 1) = std::numeric_limits<float>::denorm_min();
  s.zx(0, 2) = std::numeric_limits<float>::max();
  s.zx(0, 3) = std::numeric_limits<float>::lowest();
  s.zt(1, 2) = 1.0f / 3.0f;
  s.gamma = 0.1 + 0.2;  // not representable as a short decimal
  s.residual_mmd2 = -1e-12;
  s.beta[0] = 0.0f;
  const Bytes blob = serialize_spec(s);
  const Spec back = parse_spec(blob);
  expect_same_spec(back, s);
  EXPECT_TRUE(std::signbit(back.zx(0, 0)));
  EXPECT_EQ(serialize_spec(back), blob);
}

TEST(Spec, RoundTripKeepsEmptyOptionalTextAndLargerShapes) {
  Spec s = make_random_spec("m", 3, 17, 33, 5);
  s.card.clear();
  s.created_at.clear();
  s.extra = nlohmann::json::object();
  expect_same_spec(parse_spec(serialize_spec(s)), s);
}

TEST(Spec, LayoutMatchesTheDocumentedFormat) {
  const Spec s = make_random_spec("layout", 5);
  const Bytes blob = serialize_spec(s);
  ASSERT_GT(blob.size(), 20u);
  EXPECT_EQ(0, std::memcmp(blob.data(), "GMISPEC\0", 8));
  EXPECT_EQ(read_u32(blob, 8), kSpecFormatVersion);
  const std::uint32_t json_len = read_u32(blob, 12);
  const std::size_t array_start = (16 + json_len + 7) / 8 * 8;
  for (std::size_t i = 16 + json_len; i < array_start; ++i) EXPECT_EQ(blob[i], 0) << i;
  EXPECT_EQ(read_u32(blob, blob.size() - 4), reference_crc32(blob.data(), blob.size() - 4));

  const auto meta = nlohmann::json::parse(blob.begin() + 16, blob.begin() + 16 + json_len);
  EXPECT_EQ(meta["format"], "gmispec");
  EXPECT_EQ(meta["format_version"], 1);
  EXPECT_EQ(meta["model_id"], "layout");
  EXPECT_EQ(meta["r"], 4);
  EXPECT_EQ(meta["d"], 8);
  EXPECT_EQ(meta["dt"], 6);
  EXPECT_EQ(meta["n"], s.n);
  EXPECT_EQ(meta["image_encoder"]["name"], s.image_encoder.name);
  EXPECT_EQ(meta["text_encoder"]["dim"], 6);
  EXPECT_EQ(meta["extra"], s.extra);

  // Each array is float32 little-endian at its offset, row-major, with the listed shape.
  auto check = [&](const char* name, const float* values, std::vector<int> shape) {
    const auto& a = meta["arrays"][name];
    EXPECT_EQ(a["dtype"], "<f4") << name;
    EXPECT_EQ(a["shape"], nlohmann::json(shape)) << name;
    std::size_t offset = a["offset"].get<std::size_t>();
    std::size_t count = 1;
    for (int d : shape) count *= static_cast<std::size_t>(d);
    ASSERT_LE(array_start + offset + 4 * count, blob.size() - 4) << name;
    for (std::size_t i = 0; i < count; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, &values[i], 4);
      EXPECT_EQ(read_u32(blob, array_start + offset + 4 * i), bits) << name << "[" << i << "]";
    }
  };
  check("zx", s.zx.data(), {4, 8});
  check("zt", s.zt.data(), {4, 6});
  check("beta", s.beta.data(), {4});
  check("gram_x", s.gram_x.data(), {4, 4});
  check("mean_x", s.mean_x.data(), {8});
}

TEST(Spec, SchemaRequiresExactlyTheFieldsTheWriterWrites) {
  std::ifstream in(std::string(GMI_SOURCE_DIR) + "/schemas/spec.schema.json");
  ASSERT_TRUE(in) << "schemas/spec.schema.json missing";
  const auto schema = nlohmann::json::parse(in);
  EXPECT_EQ(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
  std::set<std::string> required(schema["required"].begin(), schema["required"].end());
  const Bytes blob = serialize_spec(make_random_spec());
  const auto meta = split(blob).meta;
  std::set<std::string> written;
  for (const auto& [key, value] : meta.items()) written.insert(key);
  EXPECT_EQ(required, written);
  for (const auto& key : written) EXPECT_TRUE(schema["properties"].contains(key)) << key;
}

TEST(Spec, MetadataShowsShapesEncodersResidualAndSize) {
  const Spec s = make_random_spec("meta", 9);
  const auto meta = spec_metadata(s);
  EXPECT_EQ(meta["model_id"], "meta");
  EXPECT_EQ(meta["r"], 4);
  EXPECT_EQ(meta["n"], s.n);
  EXPECT_EQ(meta["d"], 8);
  EXPECT_EQ(meta["dt"], 6);
  EXPECT_EQ(meta["residual_mmd2"], s.residual_mmd2);
  EXPECT_EQ(meta["image_encoder"]["version"], "1.2.0");
  EXPECT_EQ(meta["text_encoder"]["name"], "builtin-ngram");
  EXPECT_EQ(meta["bytes"], serialize_spec(s).size());
}

TEST(EncoderIdentity, StrIsNameVersionDim) {
  EncoderIdentity e{"clip-vit-b32", "openai-1", 512, 2.0};
  EXPECT_EQ(e.str(), "clip-vit-b32/openai-1/512");
}

// ---------------------------------------------------------------------------------------
// Damage and hostile input

TEST(Spec, AnyFlippedByteIsRejectedAndPastTheHeaderItIsTheChecksum) {
  const Bytes blob = serialize_spec(make_random_spec());
  for (std::size_t i = 0; i < blob.size(); ++i) {
    Bytes damaged = blob;
    damaged[i] ^= 0x10;
    std::string msg = parse_error(damaged);
    if (i >= 16) {
      EXPECT_NE(msg.find("checksum"), std::string::npos) << "byte " << i << ": " << msg;
    }
  }
}

TEST(Spec, RejectsEveryTruncation) {
  const Bytes blob = serialize_spec(make_random_spec());
  for (std::size_t n = 0; n < blob.size(); ++n) {
    Bytes cut(blob.begin(), blob.begin() + static_cast<long>(n));
    EXPECT_THROW(parse_spec(cut), SpecFormatError) << n << " bytes";
  }
  EXPECT_THROW(parse_spec(nullptr, 0), SpecFormatError);
}

TEST(Spec, RejectsWrongMagic) {
  Bytes blob = serialize_spec(make_random_spec());
  blob[0] = 'X';
  fix_crc(blob);
  EXPECT_NE(parse_error(blob).find("magic"), std::string::npos);
  Bytes png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n', 0, 0, 0, 13, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_NE(parse_error(png).find("magic"), std::string::npos);
}

TEST(Spec, RejectsAFutureVersionSayingSo) {
  Parts p = split(serialize_spec(make_random_spec()));
  p.version = 7;
  p.meta["format_version"] = 7;
  EXPECT_EQ(parse_error(assemble(p)), "spec format version 7 is newer than this gmi supports (1)");
  p.version = 0;
  EXPECT_NE(parse_error(assemble(p)).find("unknown spec format version 0"), std::string::npos);
}

TEST(Spec, RejectsHeaderAndMetadataVersionDisagreeing) {
  Parts p = split(serialize_spec(make_random_spec()));
  p.meta["format_version"] = 2;
  EXPECT_NE(parse_error(assemble(p)).find("format_version"), std::string::npos);
}

TEST(Spec, RejectsShapesWhoseSizeOverflowsOrExceedsTheBlob) {
  const Parts good = split(serialize_spec(make_random_spec()));
  const std::uint64_t big = std::numeric_limits<std::uint64_t>::max();
  const std::vector<nlohmann::json> shapes = {
      {2147483647, 2147483647},     // 2^64 - 2^34 bytes: no overflow, far past the end
      {std::uint64_t{1} << 62, 4},  // byte size would wrap 64 bits
      {big, big},                   // ditto, and not even an int64
      {2147483648ULL, 1},           // one past int
      {-1, 8},                      // negative
      {4.5, 8},                     // not an integer
      {"4", 8},                     // not a number
      {4},                          // wrong rank
      {4, 8, 1},                    // wrong rank
      {5, 8},                       // disagrees with r
  };
  for (const auto& shape : shapes) {
    Parts p = good;
    p.meta["arrays"]["zx"]["shape"] = shape;
    EXPECT_THROW(parse_spec(assemble(p)), SpecFormatError) << shape.dump();
  }
  // The big ones must be refused for being big, before any allocation is attempted.
  Parts p = good;
  p.meta["arrays"]["mean_x"]["shape"] = {2147483647};
  EXPECT_NE(parse_error(assemble(p)).find("runs past the end"), std::string::npos);
  p.meta["arrays"]["mean_x"]["shape"] = {std::uint64_t{1} << 40};
  EXPECT_NE(parse_error(assemble(p)).find("out of range"), std::string::npos);
}

TEST(Spec, RejectsOffsetsOutsideTheArraySection) {
  const Parts good = split(serialize_spec(make_random_spec()));
  const std::uint64_t section = good.arrays.size();
  for (nlohmann::json offset : {nlohmann::json(section), nlohmann::json(section - 4),
                                nlohmann::json(std::numeric_limits<std::uint64_t>::max() - 3),
                                nlohmann::json(std::uint64_t{1} << 63), nlohmann::json(-4),
                                nlohmann::json(2), nlohmann::json(nullptr)}) {
    Parts p = good;
    p.meta["arrays"]["gram_x"]["offset"] = offset;
    EXPECT_THROW(parse_spec(assemble(p)), SpecFormatError) << offset.dump();
  }
}

TEST(Spec, RejectsUnknownDtypeAndMissingArrays) {
  const Parts good = split(serialize_spec(make_random_spec()));
  Parts p = good;
  p.meta["arrays"]["beta"]["dtype"] = "<f8";
  EXPECT_NE(parse_error(assemble(p)).find("dtype"), std::string::npos);
  p = good;
  p.meta["arrays"].erase("mean_x");
  EXPECT_NE(parse_error(assemble(p)).find("arrays.mean_x"), std::string::npos);
  p = good;
  p.meta["arrays"] = nlohmann::json::array();
  EXPECT_THROW(parse_spec(assemble(p)), SpecFormatError);
}

TEST(Spec, RejectsNonFiniteArrayValues) {
  const Parts good = split(serialize_spec(make_random_spec()));
  const std::size_t gram_offset = good.meta["arrays"]["gram_x"]["offset"].get<std::size_t>();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Parts p = good;
    std::uint32_t bits;
    std::memcpy(&bits, &bad, 4);
    write_u32(p.arrays, gram_offset + 4 * 5, bits);
    std::string msg = parse_error(assemble(p));
    EXPECT_NE(msg.find("gram_x[5] is not finite"), std::string::npos) << msg;
  }
}

TEST(Spec, RejectsMetadataThatIsNotTheExpectedJson) {
  const Bytes arrays = split(serialize_spec(make_random_spec())).arrays;
  EXPECT_NE(parse_error(assemble("{\"format\": \"gmispec\",", arrays)).find("not valid JSON"),
            std::string::npos);
  EXPECT_NE(parse_error(assemble("[1, 2, 3]", arrays)).find("JSON object"), std::string::npos);
  EXPECT_THROW(parse_spec(assemble("", arrays)), SpecFormatError);
  EXPECT_THROW(parse_spec(assemble(std::string("{\"a\":\"\xff\"}"), arrays)), SpecFormatError);
  // Deep nesting is refused outright (nlohmann's dump and compare recurse).
  std::string deep = "{\"extra\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_NE(parse_error(assemble(deep, arrays)).find("deeper"), std::string::npos);
}

TEST(Spec, RejectsMissingOrMistypedFieldsNamingThem) {
  const Parts good = split(serialize_spec(make_random_spec()));
  for (const char* key : {"model_id", "n", "gamma", "image_encoder", "card", "extra", "r"}) {
    Parts p = good;
    p.meta.erase(key);
    EXPECT_NE(parse_error(assemble(p)).find(key), std::string::npos) << key;
  }
  struct Case {
    nlohmann::json::json_pointer where;
    nlohmann::json value;
  };
  const std::vector<Case> cases = {
      {"/format"_json_pointer, "other"},
      {"/model_id"_json_pointer, 12},
      {"/model_id"_json_pointer, "../escape"},
      {"/n"_json_pointer, 2.5},
      {"/n"_json_pointer, -3},
      {"/n"_json_pointer, 3},  // fewer samples than reduced points
      {"/gamma"_json_pointer, "1"},
      {"/gamma"_json_pointer, nullptr},  // how nlohmann writes NaN
      {"/gamma"_json_pointer, 0},
      {"/lambda"_json_pointer, -1},
      {"/downloads"_json_pointer, -1},
      {"/image_encoder/dim"_json_pointer, 9},  // disagrees with zx
      {"/image_encoder/name"_json_pointer, ""},
      {"/text_encoder"_json_pointer, "builtin"},
      {"/r"_json_pointer, 3},
      {"/d"_json_pointer, 7},
      {"/dt"_json_pointer, 7},
      {"/extra"_json_pointer, nlohmann::json::array()},
  };
  for (const auto& c : cases) {
    Parts p = good;
    p.meta[c.where] = c.value;
    EXPECT_THROW(parse_spec(assemble(p)), SpecFormatError) << c.where.to_string();
  }
}

TEST(Spec, RejectsLengthsThatRunPastTheEnd) {
  Bytes blob = serialize_spec(make_random_spec());
  Bytes b = blob;
  write_u32(b, 12, static_cast<std::uint32_t>(blob.size()));
  fix_crc(b);
  EXPECT_THROW(parse_spec(b), SpecFormatError);
  b = blob;
  write_u32(b, 12, 0xFFFFFFFFU);
  fix_crc(b);
  EXPECT_THROW(parse_spec(b), SpecFormatError);
}

TEST(Spec, RejectsNonZeroPadding) {
  Parts p = split(serialize_spec(make_random_spec()));
  std::string json = p.meta.dump();
  while ((16 + json.size()) % 8 == 0) json += ' ';
  Bytes b = assemble(json, p.arrays);
  b[16 + json.size()] = 1;
  fix_crc(b);
  EXPECT_NE(parse_error(b).find("padding"), std::string::npos);
}

// ---------------------------------------------------------------------------------------
// Validation

TEST(Spec, ValidateAcceptsTheFixtureAndChecksEveryShape) {
  const Spec good = make_random_spec();
  EXPECT_NO_THROW(validate(good));

  Spec s = good;
  s.zx.resize(4, 7);
  s.zx.setZero();
  EXPECT_NE(validate_error(s).find("zx is 4x7, expected 4x8"), std::string::npos);
  s = good;
  s.zt.resize(3, 6);
  s.zt.setZero();
  EXPECT_NE(validate_error(s).find("zt"), std::string::npos);
  s = good;
  s.gram_x.resize(4, 3);
  s.gram_x.setZero();
  EXPECT_NE(validate_error(s).find("gram_x"), std::string::npos);
  s = good;
  s.mean_x.resize(6);
  s.mean_x.setZero();
  EXPECT_NE(validate_error(s).find("mean_x"), std::string::npos);
  s = good;
  s.beta[2] = -0.01f;
  EXPECT_NE(validate_error(s).find("beta[2] is negative"), std::string::npos);
  s = good;
  s.n = 3;
  EXPECT_NE(validate_error(s).find("n = 3"), std::string::npos);
  s = good;
  s.beta.resize(0);
  s.zx.resize(0, 8);
  s.zt.resize(0, 6);
  s.gram_x.resize(0, 0);
  EXPECT_NE(validate_error(s).find("r (the size of beta) must be >= 1"), std::string::npos);
  s = good;
  s.image_encoder.dim = 0;
  EXPECT_THROW(validate(s), SpecFormatError);
}

TEST(Spec, ValidateRejectsNonFiniteValuesAnywhere) {
  const Spec good = make_random_spec();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Spec s = good;
  s.zx(3, 7) = nan;
  EXPECT_NE(validate_error(s).find("zx[31] is not finite"), std::string::npos);
  s = good;
  s.zt(0, 0) = inf;
  EXPECT_THROW(validate(s), SpecFormatError);
  s = good;
  s.beta[1] = nan;
  EXPECT_THROW(validate(s), SpecFormatError);
  s = good;
  s.mean_x[0] = -inf;
  EXPECT_THROW(validate(s), SpecFormatError);
  s = good;
  s.gamma = std::nan("");
  EXPECT_THROW(validate(s), SpecFormatError);
  s = good;
  s.residual_mmd2 = std::numeric_limits<double>::infinity();
  EXPECT_THROW(validate(s), SpecFormatError);
  s = good;
  s.image_encoder.default_gamma = std::nan("");
  EXPECT_THROW(validate(s), SpecFormatError);
  EXPECT_THROW(serialize_spec(s), SpecFormatError);
}

TEST(Spec, SerializeRejectsTextThatIsNotUtf8) {
  Spec s = make_random_spec();
  s.card = "bad \xff\xfe bytes";
  EXPECT_THROW(serialize_spec(s), SpecFormatError);
}

TEST(ModelId, AcceptsTheDocumentedAlphabet) {
  for (const std::string& id : std::vector<std::string>{
           "a", "Z", "0", "sdxl-anime_v1.0", "-lead-dash", "_x", "a..b", std::string(128, 'm')}) {
    EXPECT_NO_THROW(validate_model_id(id)) << id;
  }
}

TEST(ModelId, RejectsEverythingElse) {
  for (const std::string& id :
       std::vector<std::string>{std::string(), std::string(".hidden"), std::string(".."),
                                std::string("a/b"), std::string("../x"), std::string("a b"),
                                std::string("caf\xC3\xA9"), std::string("a\0b", 3),
                                std::string("a:b"), std::string("a\\b"), std::string(129, 'm')}) {
    EXPECT_THROW(validate_model_id(id), InputError) << id;
  }
  Spec s = make_random_spec(".hidden");
  EXPECT_THROW(validate(s), SpecFormatError);
}

// ---------------------------------------------------------------------------------------
// Directory store

TEST(DirSpecStore, StoresGetsListsReplacesAndRemoves) {
  testing::TempDir tmp;
  auto store = open_spec_store("dir:" + (tmp.path() / "specs").string());
  testing::check_store_behaviour(*store);
}

TEST(DirSpecStore, FencedWritesNeverLetAStaleUploadReplaceANewerSpec) {
  testing::TempDir tmp;
  auto store = open_spec_store("dir:" + (tmp.path() / "specs").string());
  testing::check_fenced_put_behaviour(*store);
}

TEST(DirSpecStore, StoresTheHubMetricWithIncreasingVersions) {
  testing::TempDir tmp;
  auto store = open_spec_store("dir:" + (tmp.path() / "specs").string());
  testing::check_metric_store_behaviour(*store);
}

TEST(DirSpecStore, ADamagedMetricFileIsAFormatErrorNamingIt) {
  testing::TempDir tmp;
  auto store = open_spec_store("dir:" + tmp.path().string());
  store->put_metric(testing::make_test_metric(3), 0);
  const auto path = tmp.path() / "hub.gmimetric";
  ASSERT_TRUE(std::filesystem::exists(path));
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-9, std::ios::end);
    f.put('\x5a');
  }
  try {
    store->get_metric();
    FAIL() << "a damaged metric was read";
  } catch (const SpecFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("hub.gmimetric"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(store->list().empty()) << "the metric file is never listed as a spec";
}

TEST(DirSpecStore, WritesOneFilePerModelAndNoTempFilesRemain) {
  testing::TempDir tmp;
  auto store = open_spec_store(tmp.path().string());
  const Spec s = make_random_spec("one");
  store->put(s);
  store->put(make_random_spec("one", 2));
  store->put(make_random_spec("two", 3));
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp.path())) names.insert(e.path().filename());
  EXPECT_EQ(names, (std::set<std::string>{"one.gmispec", "two.gmispec", ".generation", ".lock"}));
  // The file is exactly the serialized spec.
  std::ifstream in(tmp.path() / "two.gmispec", std::ios::binary);
  Bytes file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(file, serialize_spec(make_random_spec("two", 3)));
}

TEST(DirSpecStore, GenerationIsSharedByEveryStoreOnTheDirectory) {
  testing::TempDir tmp;
  auto writer = open_spec_store(tmp.path().string());
  auto reader = open_spec_store("dir:" + tmp.path().string());
  EXPECT_EQ(reader->generation(), 0u);
  writer->put(make_random_spec("m"));
  EXPECT_EQ(reader->generation(), 1u);
  writer->remove("m");
  EXPECT_EQ(reader->generation(), 2u);
  EXPECT_TRUE(reader->list().empty());
}

TEST(DirSpecStore, ConcurrentWritersNeverLoseAGenerationBump) {
  testing::TempDir tmp;
  constexpr int kThreads = 4;
  constexpr int kPuts = 8;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto store = open_spec_store(tmp.path().string());  // one store per thread
      for (int i = 0; i < kPuts; ++i) {
        store->put(make_random_spec("m" + std::to_string(t), static_cast<unsigned>(i + 1)));
      }
    });
  }
  for (auto& th : threads) th.join();
  auto store = open_spec_store(tmp.path().string());
  EXPECT_EQ(store->generation(), static_cast<std::uint64_t>(kThreads * kPuts));
  EXPECT_EQ(store->list().size(), static_cast<std::size_t>(kThreads));
  for (int t = 0; t < kThreads; ++t) {
    auto s = store->get("m" + std::to_string(t));
    ASSERT_TRUE(s.has_value());
    expect_same_spec(*s, make_random_spec("m" + std::to_string(t), kPuts));
  }
}

TEST(DirSpecStore, DamagedFileIsASpecFormatErrorNamingTheModel) {
  testing::TempDir tmp;
  auto store = open_spec_store(tmp.path().string());
  store->put(make_random_spec("broken"));
  {
    std::fstream f(tmp.path() / "broken.gmispec", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('#');
  }
  try {
    store->get("broken");
    FAIL() << "damaged spec accepted";
  } catch (const SpecFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'broken'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
  std::ofstream(tmp.path() / "empty.gmispec", std::ios::binary);
  EXPECT_THROW(store->get("empty"), SpecFormatError);
}

TEST(DirSpecStore, RejectsAFileHoldingAnotherModel) {
  testing::TempDir tmp;
  auto store = open_spec_store(tmp.path().string());
  store->put(make_random_spec("original"));
  fs::rename(tmp.path() / "original.gmispec", tmp.path() / "renamed.gmispec");
  EXPECT_EQ(store->list(), (std::vector<std::string>{"renamed"}));
  EXPECT_THROW(store->get("renamed"), SpecFormatError);
}

TEST(DirSpecStore, ListIgnoresFilesThatAreNotSpecs) {
  testing::TempDir tmp;
  auto store = open_spec_store(tmp.path().string());
  store->put(make_random_spec("real"));
  std::ofstream(tmp.path() / "README.md") << "hello";
  std::ofstream(tmp.path() / ".real.gmispec.tmp-1-2") << "partial";
  std::ofstream(tmp.path() / ".hidden.gmispec") << "x";
  std::ofstream(tmp.path() / "bad name.gmispec") << "x";
  std::ofstream(tmp.path() / "real.gmispec.bak") << "x";
  fs::create_directory(tmp.path() / "subdir.gmispec");
  EXPECT_EQ(store->list(), (std::vector<std::string>{"real"}));
}

TEST(DirSpecStore, CreatesAMissingDirectoryAndRefusesAFile) {
  testing::TempDir tmp;
  const fs::path nested = tmp.path() / "a" / "b" / "specs";
  auto store = open_spec_store(nested.string());
  EXPECT_TRUE(fs::is_directory(nested));
  EXPECT_EQ(store->describe(), "dir:" + nested.string());
  std::ofstream(tmp.path() / "plain-file") << "x";
  EXPECT_THROW(open_spec_store((tmp.path() / "plain-file").string()), InputError);
}

TEST(DirSpecStore, ReadOnlyDirectoryStillServesReads) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  testing::TempDir tmp;
  {
    auto store = open_spec_store(tmp.path().string());
    store->put(make_random_spec("ro"));
  }
  fs::permissions(tmp.path(), fs::perms::owner_read | fs::perms::owner_exec);
  struct RestorePerms {
    fs::path p;
    ~RestorePerms() { fs::permissions(p, fs::perms::owner_all); }
  } restore{tmp.path()};
  auto store = open_spec_store(tmp.path().string());
  EXPECT_EQ(store->list(), (std::vector<std::string>{"ro"}));
  EXPECT_TRUE(store->get("ro").has_value());
  EXPECT_EQ(store->generation(), 1u);
  EXPECT_THROW(store->put(make_random_spec("new")), IoError);
}

TEST(OpenSpecStore, RejectsUnknownSchemesAndEmptyLocations) {
  EXPECT_THROW(open_spec_store("s3://bucket/specs"), InputError);
  EXPECT_THROW(open_spec_store("rediss://host:6380"), InputError);
  EXPECT_THROW(open_spec_store("http://localhost/specs"), InputError);
  EXPECT_THROW(open_spec_store("dir:"), InputError);
  EXPECT_THROW(open_spec_store(""), InputError);
}

}  // namespace
}  // namespace gmi

namespace gmi {
namespace {

// The finiteness check every load runs over every value: the first NaN or infinity anywhere,
// a block's edges included; denormals, zeros and the largest floats are finite.
TEST(FiniteCheck, FindsTheFirstNonFiniteValueWhereverItIs) {
  std::vector<float> v(1500, 1.0f);
  v[3] = std::numeric_limits<float>::denorm_min();
  v[4] = -0.0f;
  v[5] = std::numeric_limits<float>::max();
  v[6] = -std::numeric_limits<float>::max();
  EXPECT_EQ(first_non_finite(v.data(), v.size()), v.size());
  EXPECT_TRUE(all_finite(v.data(), v.size()));
  for (const std::size_t at : {std::size_t{0}, std::size_t{511}, std::size_t{512}, std::size_t{1499}}) {
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()}) {
      std::vector<float> w = v;
      w[at] = bad;
      if (at + 7 < w.size()) w[at + 7] = bad;  // a later one is not the first
      EXPECT_EQ(first_non_finite(w.data(), w.size()), at) << "at " << at << " value " << bad;
      EXPECT_FALSE(all_finite(w.data(), w.size()));
    }
  }
  EXPECT_EQ(first_non_finite(v.data(), 0), 0u);
}

}  // namespace
}  // namespace gmi
