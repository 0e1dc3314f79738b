// Spec validation and the "gmispec" v1 binary format (see gmi/spec.hpp for the layout and
// schemas/spec.schema.json for the metadata block).
//
// parse_spec() treats its input as hostile: every length, offset and shape is checked in
// 64-bit arithmetic against the blob before anything is read or allocated, and every
// failure is a SpecFormatError that says what was wrong.
#include "gmi/spec.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>

#include "binary_io.hpp"
#include "gmi/error.hpp"

namespace gmi {

std::string EncoderIdentity::str() const {
  return name + "/" + version + "/" + std::to_string(dim);
}

namespace {

constexpr std::array<char, 8> kMagic = {'G', 'M', 'I', 'S', 'P', 'E', 'C', '\0'};
constexpr std::size_t kHeaderBytes = 16;  // magic + version + json length
constexpr std::size_t kCrcBytes = 4;
// Deeper JSON than this is not a spec: refuse it before nlohmann's recursive dump and
// comparison ever see it.
constexpr int kMaxJsonDepth = 64;
// One array dimension; keeps every shape within int (Spec::r() and Eigen indices).
constexpr std::uint64_t kMaxDim = static_cast<std::uint64_t>(std::numeric_limits<int>::max());

using binary::crc32;
using binary::get_floats;
using binary::get_u32;
using binary::pad_to_8;
using binary::put_floats;
using binary::put_u32;

[[noreturn]] void fail(const std::string& what) { throw SpecFormatError("invalid spec: " + what); }

bool valid_model_id(const std::string& id) {
  if (id.empty() || id.size() > 128 || id[0] == '.') return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

void check_finite(const float* values, std::size_t count, const char* name) {
  if (const std::size_t i = first_non_finite(values, count); i < count)
    fail(std::string(name) + "[" + std::to_string(i) + "] is not finite");
}

void check_encoder(const EncoderIdentity& e, const char* field) {
  if (e.name.empty()) fail(std::string(field) + ".name is empty");
  if (e.version.empty()) fail(std::string(field) + ".version is empty");
  if (e.dim < 1) fail(std::string(field) + ".dim must be >= 1, got " + std::to_string(e.dim));
  if (!std::isfinite(e.default_gamma) || e.default_gamma <= 0) {
    fail(std::string(field) + ".default_gamma must be a finite positive number");
  }
}

std::string shape_str(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

// Written in this key order (not sorted), so the file reads top-down and "arrays" lists the
// arrays in file order.
using OrderedJson = nlohmann::ordered_json;

OrderedJson encoder_json(const EncoderIdentity& e) {
  return {
      {"name", e.name}, {"version", e.version}, {"dim", e.dim}, {"default_gamma", e.default_gamma}};
}

// The arrays in file order: name, data, shape.
struct ArrayView {
  const char* name;
  const float* data;
  std::vector<std::uint64_t> shape;
};

std::vector<ArrayView> array_views(const Spec& s) {
  auto u = [](Eigen::Index i) { return static_cast<std::uint64_t>(i); };
  return {{"zx", s.zx.data(), {u(s.zx.rows()), u(s.zx.cols())}},
          {"zt", s.zt.data(), {u(s.zt.rows()), u(s.zt.cols())}},
          {"beta", s.beta.data(), {u(s.beta.size())}},
          {"gram_x", s.gram_x.data(), {u(s.gram_x.rows()), u(s.gram_x.cols())}},
          {"mean_x", s.mean_x.data(), {u(s.mean_x.size())}}};
}

// Everything but the array table: what serialize_spec writes and spec_metadata shows.
OrderedJson base_metadata(const Spec& s) {
  return {{"format", "gmispec"},
          {"format_version", kSpecFormatVersion},
          {"model_id", s.model_id},
          {"image_encoder", encoder_json(s.image_encoder)},
          {"text_encoder", encoder_json(s.text_encoder)},
          {"n", s.n},
          {"r", s.r()},
          {"d", s.zx.cols()},
          {"dt", s.zt.cols()},
          {"gamma", s.gamma},
          {"lambda", s.lambda},
          {"residual_mmd2", s.residual_mmd2},
          {"downloads", s.downloads},
          {"card", s.card},
          {"created_at", s.created_at},
          {"extra", OrderedJson(s.extra)}};
}

// The metadata exactly as written, and the byte size of the array section.
std::pair<OrderedJson, std::size_t> full_metadata(const Spec& s) {
  OrderedJson meta = base_metadata(s);
  OrderedJson arrays = OrderedJson::object();
  std::size_t offset = 0;
  for (const auto& a : array_views(s)) {
    std::size_t count = 1;
    for (auto dim : a.shape) count *= dim;
    arrays[a.name] = {{"offset", offset}, {"shape", a.shape}, {"dtype", "<f4"}};
    offset += count * 4;
  }
  meta["arrays"] = std::move(arrays);
  return {std::move(meta), offset};
}

std::string dump_metadata(const OrderedJson& meta) {
  try {
    return meta.dump();  // strict: invalid UTF-8 in a string throws
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata cannot be written as JSON (is every string UTF-8?): ") + e.what());
  }
}

bool json_depth_exceeds(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// --- typed field access with messages that name the field ---------------------------------

const nlohmann::json& field(const nlohmann::json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end()) fail("metadata field " + where + key + " is missing");
  return *it;
}

std::string get_string(const nlohmann::json& obj, const char* key, const std::string& where = "") {
  const auto& v = field(obj, key, where);
  if (!v.is_string()) fail("metadata field " + where + key + " must be a string");
  return v.get<std::string>();
}

double get_number(const nlohmann::json& obj, const char* key, const std::string& where = "") {
  const auto& v = field(obj, key, where);
  if (!v.is_number()) fail("metadata field " + where + key + " must be a number");
  double d = v.get<double>();
  if (!std::isfinite(d)) fail("metadata field " + where + key + " is not finite");
  return d;
}

std::uint64_t as_count(const nlohmann::json& v, const std::string& what, std::uint64_t max) {
  if (v.is_number_unsigned()) {
    auto u = v.get<std::uint64_t>();
    if (u <= max) return u;
  } else if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {
    auto u = static_cast<std::uint64_t>(v.get<std::int64_t>());
    if (u <= max) return u;
  } else {
    fail(what + " must be a non-negative integer");
  }
  fail(what + " is out of range (at most " + std::to_string(max) + ")");
}

int get_int(const nlohmann::json& obj, const char* key, const std::string& where = "") {
  return static_cast<int>(
      as_count(field(obj, key, where), "metadata field " + where + key, kMaxDim));
}

EncoderIdentity get_encoder(const nlohmann::json& meta, const char* key) {
  const auto& v = field(meta, key, "");
  if (!v.is_object()) fail(std::string("metadata field ") + key + " must be an object");
  std::string where = std::string(key) + ".";
  EncoderIdentity e;
  e.name = get_string(v, "name", where);
  e.version = get_string(v, "version", where);
  e.dim = get_int(v, "dim", where);
  e.default_gamma = get_number(v, "default_gamma", where);
  return e;
}

// Where one array lies in the array section. Each dimension is at most 2^31 - 1, so the
// element count (< 2^62) and byte size (< 2^64) cannot overflow 64 bits; the extent is then
// checked against the section before anything is allocated or read.
struct ArrayExtent {
  std::uint64_t offset = 0;
  std::uint64_t dims[2] = {1, 1};
  std::uint64_t count() const { return dims[0] * dims[1]; }
};

ArrayExtent locate_array(const nlohmann::json& arrays, const char* name, std::size_t rank,
                         std::uint64_t section_size) {
  const std::string where = std::string("arrays.") + name;
  auto it = arrays.find(name);
  if (it == arrays.end()) fail("metadata field " + where + " is missing");
  const auto& a = *it;
  if (!a.is_object()) fail("metadata field " + where + " must be an object");
  const std::string dtype = get_string(a, "dtype", where + ".");
  if (dtype != "<f4") fail(where + ".dtype is \"" + dtype + "\", only \"<f4\" is supported");
  const auto& shape = field(a, "shape", where + ".");
  if (!shape.is_array() || shape.size() != rank) {
    fail(where + ".shape must be an array of " + std::to_string(rank) + " dimension(s)");
  }
  ArrayExtent ext;
  for (std::size_t i = 0; i < rank; ++i) {
    ext.dims[i] = as_count(shape[i], where + ".shape[" + std::to_string(i) + "]", kMaxDim);
  }
  ext.offset = as_count(field(a, "offset", where + "."), where + ".offset",
                        std::numeric_limits<std::uint64_t>::max());
  if (ext.offset % 4 != 0) {
    fail(where + ".offset " + std::to_string(ext.offset) + " is not a multiple of 4");
  }
  const std::uint64_t bytes = 4 * ext.count();
  if (ext.offset > section_size || bytes > section_size - ext.offset) {
    fail(where + " (offset " + std::to_string(ext.offset) + ", " + std::to_string(bytes) +
         " bytes) runs past the end of the " + std::to_string(section_size) +
         "-byte array section");
  }
  return ext;
}

void read_matrix(const nlohmann::json& arrays, const char* name, const std::uint8_t* section,
                 std::uint64_t section_size, RowMatrix& out) {
  const ArrayExtent ext = locate_array(arrays, name, 2, section_size);
  out.resize(static_cast<Eigen::Index>(ext.dims[0]), static_cast<Eigen::Index>(ext.dims[1]));
  get_floats(section + ext.offset, ext.count(), out.data());
  check_finite(out.data(), ext.count(), name);
}

void read_vector(const nlohmann::json& arrays, const char* name, const std::uint8_t* section,
                 std::uint64_t section_size, Eigen::VectorXf& out) {
  const ArrayExtent ext = locate_array(arrays, name, 1, section_size);
  out.resize(static_cast<Eigen::Index>(ext.dims[0]));
  get_floats(section + ext.offset, ext.count(), out.data());
  check_finite(out.data(), ext.count(), name);
}

}  // namespace

void validate_model_id(const std::string& id) {
  if (valid_model_id(id)) return;
  std::string shown = id.size() > 64 ? id.substr(0, 64) + "..." : id;
  throw InputError("invalid model id \"" + shown +
                   "\": use 1-128 characters of [A-Za-z0-9._-], not starting with '.'");
}

void validate(const Spec& spec) {
  if (!valid_model_id(spec.model_id)) {
    try {
      validate_model_id(spec.model_id);
    } catch (const InputError& e) {
      fail(e.what());
    }
  }
  check_encoder(spec.image_encoder, "image_encoder");
  check_encoder(spec.text_encoder, "text_encoder");
  const Eigen::Index r = spec.beta.size();
  const int d = spec.image_encoder.dim;
  const int dt = spec.text_encoder.dim;
  if (r < 1) fail("r (the size of beta) must be >= 1");
  if (spec.n < r) {
    fail("n = " + std::to_string(spec.n) + " samples cannot give r = " + std::to_string(r) +
         " reduced points");
  }
  if (spec.zx.rows() != r || spec.zx.cols() != d) {
    fail("zx is " + shape_str(spec.zx.rows(), spec.zx.cols()) + ", expected " + shape_str(r, d) +
         " (r x image_encoder.dim)");
  }
  if (spec.zt.rows() != r || spec.zt.cols() != dt) {
    fail("zt is " + shape_str(spec.zt.rows(), spec.zt.cols()) + ", expected " + shape_str(r, dt) +
         " (r x text_encoder.dim)");
  }
  if (spec.gram_x.rows() != r || spec.gram_x.cols() != r) {
    fail("gram_x is " + shape_str(spec.gram_x.rows(), spec.gram_x.cols()) + ", expected " +
         shape_str(r, r));
  }
  if (spec.mean_x.size() != d) {
    fail("mean_x has " + std::to_string(spec.mean_x.size()) + " entries, expected " +
         std::to_string(d) + " (image_encoder.dim)");
  }
  if (!std::isfinite(spec.gamma) || spec.gamma <= 0) fail("gamma must be finite and > 0");
  if (!std::isfinite(spec.lambda) || spec.lambda < 0) fail("lambda must be finite and >= 0");
  if (!std::isfinite(spec.residual_mmd2)) fail("residual_mmd2 is not finite");
  if (!std::isfinite(spec.downloads) || spec.downloads < 0) {
    fail("downloads must be finite and >= 0");
  }
  if (!spec.extra.is_object()) fail("extra must be a JSON object");
  check_finite(spec.zx.data(), static_cast<std::size_t>(spec.zx.size()), "zx");
  check_finite(spec.zt.data(), static_cast<std::size_t>(spec.zt.size()), "zt");
  check_finite(spec.beta.data(), static_cast<std::size_t>(r), "beta");
  check_finite(spec.gram_x.data(), static_cast<std::size_t>(spec.gram_x.size()), "gram_x");
  check_finite(spec.mean_x.data(), static_cast<std::size_t>(spec.mean_x.size()), "mean_x");
  for (Eigen::Index j = 0; j < r; ++j) {
    if (spec.beta[j] < 0) fail("beta[" + std::to_string(j) + "] is negative");
  }
}

std::vector<std::uint8_t> serialize_spec(const Spec& spec) {
  validate(spec);
  auto [meta, array_bytes] = full_metadata(spec);
  const std::string json = dump_metadata(meta);
  if (json.size() > std::numeric_limits<std::uint32_t>::max()) fail("metadata over 4 GiB");
  const std::size_t array_start = pad_to_8(kHeaderBytes + json.size());

  std::vector<std::uint8_t> out(kMagic.begin(), kMagic.end());
  out.reserve(array_start + array_bytes + kCrcBytes);
  put_u32(out, kSpecFormatVersion);
  put_u32(out, static_cast<std::uint32_t>(json.size()));
  out.insert(out.end(), json.begin(), json.end());
  out.resize(array_start, 0);
  for (const auto& a : array_views(spec)) {
    std::size_t count = 1;
    for (auto dim : a.shape) count *= dim;
    put_floats(out, a.data, count);
  }
  put_u32(out, crc32(out.data(), out.size()));
  return out;
}

Spec parse_spec(const std::uint8_t* data, std::size_t size) {
  if (data == nullptr || size < kHeaderBytes + kCrcBytes) {
    fail("truncated: " + std::to_string(size) + " bytes is shorter than the smallest spec");
  }
  if (std::memcmp(data, kMagic.data(), kMagic.size()) != 0) {
    fail("not a gmi spec (bad magic; expected \"GMISPEC\\0\")");
  }
  const std::uint32_t version = get_u32(data + 8);
  if (version > kSpecFormatVersion) {
    throw SpecFormatError("spec format version " + std::to_string(version) +
                          " is newer than this gmi supports (" +
                          std::to_string(kSpecFormatVersion) + ")");
  }
  if (version != kSpecFormatVersion) fail("unknown spec format version " + std::to_string(version));
  const std::uint32_t stored_crc = get_u32(data + size - kCrcBytes);
  const std::uint32_t actual_crc = crc32(data, size - kCrcBytes);
  if (stored_crc != actual_crc) {
    fail("checksum mismatch (the spec is damaged or truncated)");
  }
  const std::uint64_t body_end = size - kCrcBytes;
  const std::uint64_t json_length = get_u32(data + 12);
  if (json_length > body_end - kHeaderBytes) {
    fail("metadata length " + std::to_string(json_length) + " runs past the end of the spec");
  }
  const std::uint64_t array_start = pad_to_8(kHeaderBytes + json_length);
  if (array_start > body_end) fail("truncated: the array section is missing");
  for (std::uint64_t i = kHeaderBytes + json_length; i < array_start; ++i) {
    if (data[i] != 0) fail("padding after the metadata is not zero");
  }

  std::string_view json_text(reinterpret_cast<const char*>(data + kHeaderBytes), json_length);
  if (json_depth_exceeds(json_text, kMaxJsonDepth)) {
    fail("metadata nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  }
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata is not valid JSON: ") + e.what());
  }
  if (!meta.is_object()) fail("metadata must be a JSON object");

  Spec spec;
  try {
    if (get_string(meta, "format") != "gmispec") fail("metadata field format must be \"gmispec\"");
    if (as_count(field(meta, "format_version", ""), "metadata field format_version", kMaxDim) !=
        version) {
      fail("metadata format_version disagrees with the header's version " +
           std::to_string(version));
    }
    spec.model_id = get_string(meta, "model_id");
    spec.image_encoder = get_encoder(meta, "image_encoder");
    spec.text_encoder = get_encoder(meta, "text_encoder");
    spec.n = get_int(meta, "n");
    const int r = get_int(meta, "r");
    const int d = get_int(meta, "d");
    const int dt = get_int(meta, "dt");
    spec.gamma = get_number(meta, "gamma");
    spec.lambda = get_number(meta, "lambda");
    spec.residual_mmd2 = get_number(meta, "residual_mmd2");
    spec.downloads = get_number(meta, "downloads");
    spec.card = get_string(meta, "card");
    spec.created_at = get_string(meta, "created_at");
    spec.extra = field(meta, "extra", "");

    const auto& arrays = field(meta, "arrays", "");
    if (!arrays.is_object()) fail("metadata field arrays must be an object");
    const std::uint8_t* section = data + array_start;
    const std::uint64_t section_size = body_end - array_start;
    read_matrix(arrays, "zx", section, section_size, spec.zx);
    read_matrix(arrays, "zt", section, section_size, spec.zt);
    read_vector(arrays, "beta", section, section_size, spec.beta);
    read_matrix(arrays, "gram_x", section, section_size, spec.gram_x);
    read_vector(arrays, "mean_x", section, section_size, spec.mean_x);

    if (spec.r() != r) {
      fail("metadata r = " + std::to_string(r) + " but beta has " + std::to_string(spec.r()) +
           " entries");
    }
    if (spec.zx.cols() != d) fail("metadata d = " + std::to_string(d) + " disagrees with zx");
    if (spec.zt.cols() != dt) fail("metadata dt = " + std::to_string(dt) + " disagrees with zt");
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata has an unexpected structure: ") + e.what());
  }
  validate(spec);
  return spec;
}

nlohmann::json spec_metadata(const Spec& spec) {
  auto [meta, array_bytes] = full_metadata(spec);
  const std::size_t json_size = dump_metadata(meta).size();
  nlohmann::json out(meta);
  out["bytes"] = pad_to_8(kHeaderBytes + json_size) + array_bytes + kCrcBytes;
  return out;
}

}  // namespace gmi
