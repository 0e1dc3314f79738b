// Encoder cards: parsing and validation, file checksums, and the input geometry.
#include "gmi/encoder_card.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
#include <nlohmann/json.hpp>

#include "gmi/error.hpp"

namespace gmi {

using nlohmann::json;
namespace fs = std::filesystem;

int CardOutput::width() const {
  switch (reduce) {
    case Reduce::kGramUpper:
      return channels * (channels + 1) / 2;
    case Reduce::kMeanStd:
      return 2 * channels;
    case Reduce::kNone:
      return channels;
  }
  return 0;
}

EncoderIdentity EncoderCard::identity() const {
  EncoderIdentity id;
  id.name = name;
  id.version = version;
  id.dim = dim;
  id.default_gamma = default_gamma;
  return id;
}

const CardFile& EncoderCard::file(const std::string& role) const {
  for (const auto& f : files) {
    if (f.role == role) return f;
  }
  throw InputError("encoder card " + path.string() + ": no file with role \"" + role + "\"");
}

namespace {

class CardReader {
 public:
  explicit CardReader(fs::path path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& why) const {
    throw InputError("encoder card " + path_.string() + ": " + field + ": " + why);
  }

  const json& need(const json& j, const char* key, const std::string& where) const {
    if (!j.is_object() || !j.contains(key) || j[key].is_null()) fail(where + key, "missing");
    return j[key];
  }
  std::string str(const json& j, const char* key, const std::string& where = "") const {
    const json& v = need(j, key, where);
    if (!v.is_string() || v.get<std::string>().empty()) fail(where + key, "must be a non-empty string");
    return v.get<std::string>();
  }
  double num(const json& j, const char* key, double lo, double hi, const std::string& where = "") const {
    const json& v = need(j, key, where);
    if (!v.is_number()) fail(where + key, "must be a number");
    const double x = v.get<double>();
    if (!(x >= lo && x <= hi)) fail(where + key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return x;
  }
  int integer(const json& j, const char* key, int lo, int hi, const std::string& where = "") const {
    const json& v = need(j, key, where);
    if (!v.is_number_integer()) fail(where + key, "must be an integer");
    const auto x = v.get<long long>();
    if (x < lo || x > hi) fail(where + key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<int>(x);
  }
  void triple(const json& j, const char* key, float out[3], bool positive) const {
    const std::string field = std::string("input.") + key;
    const json& v = need(j, key, "input.");
    if (!v.is_array() || v.size() != 3) fail(field, "must be an array of 3 numbers");
    for (int c = 0; c < 3; ++c) {
      if (!v[c].is_number()) fail(field, "must be an array of 3 numbers");
      out[c] = v[c].get<float>();
      if (positive && !(out[c] > 0)) fail(field, "must be positive");
    }
  }

  InputGeometry geometry(const json& j) const {
    InputGeometry g;
    g.size = integer(j, "size", 1, 8192, "input.");
    const std::string resize = str(j, "resize", "input.");
    if (resize == "shorter_side") g.resize = InputGeometry::Resize::kShorterSide;
    else if (resize == "none") g.resize = InputGeometry::Resize::kNone;
    else fail("input.resize", "\"" + resize + "\" is not shorter_side or none");
    const std::string filter = str(j, "filter", "input.");
    if (filter == "bicubic") g.filter = InputGeometry::Filter::kBicubic;
    else if (filter == "bilinear") g.filter = InputGeometry::Filter::kBilinear;
    else fail("input.filter", "\"" + filter + "\" is not bicubic or bilinear");
    g.min_side = j.contains("min_side") ? integer(j, "min_side", 1, 16384, "input.") : g.size;
    if (g.min_side < g.size) fail("input.min_side", "must be >= input.size");
    g.scale = static_cast<float>(num(j, "scale", 1e-6, 1e6, "input."));
    triple(j, "mean", g.mean, false);
    triple(j, "std", g.std, true);
    return g;
  }

 private:
  fs::path path_;
};

}  // namespace

EncoderCard load_encoder_card(const fs::path& path) {
  CardReader r(path);
  std::ifstream in(path);
  if (!in) throw InputError("encoder card " + path.string() + ": cannot be read (missing?)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw InputError("encoder card " + path.string() + ": not JSON: " + e.what());
  }
  if (!j.is_object()) r.fail("card", "must be a JSON object");
  if (r.integer(j, "card_version", 0, 1 << 20) != 1) r.fail("card_version", "this gmi reads version 1");
  EncoderCard c;
  c.path = fs::absolute(path);
  c.name = r.str(j, "name");
  c.version = r.str(j, "version");
  c.modality = r.str(j, "modality");
  if (c.modality != "image" && c.modality != "text" && c.modality != "captioner") {
    r.fail("modality", "\"" + c.modality + "\" is not image, text or captioner");
  }
  c.backend = r.str(j, "backend");
  if (c.backend != "builtin" && c.backend != "torchscript" && c.backend != "composite") {
    r.fail("backend", "\"" + c.backend + "\" is not builtin, torchscript or composite");
  }
  c.dim = c.modality == "captioner" ? 0 : r.integer(j, "dim", 1, 1 << 20);
  c.default_gamma = j.contains("default_gamma") ? r.num(j, "default_gamma", 1e-9, 1e9) : 1.0;
  if (c.modality != "text" && c.backend == "torchscript") c.input = r.geometry(r.need(j, "input", ""));
  if (c.modality == "text") {
    const json& t = r.need(j, "text", "");
    c.context = r.integer(t, "context", 2, 4096, "text.");
    c.tokenizer = r.str(t, "tokenizer", "text.");
    if (c.tokenizer != "clip-bpe") r.fail("text.tokenizer", "\"" + c.tokenizer + "\" is not clip-bpe");
  }
  const fs::path dir = c.path.parent_path();
  if (j.contains("files")) {
    if (!j["files"].is_array()) r.fail("files", "must be an array");
    for (std::size_t i = 0; i < j["files"].size(); ++i) {
      const std::string where = "files[" + std::to_string(i) + "].";
      const json& f = j["files"][i];
      CardFile cf;
      cf.role = r.str(f, "role", where);
      cf.path = dir / r.str(f, "path", where);
      cf.sha256 = r.str(f, "sha256", where);
      if (cf.sha256.size() != 64 ||
          !std::all_of(cf.sha256.begin(), cf.sha256.end(), [](char ch) {
            return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
          })) {
        r.fail(where + "sha256", "must be 64 lower-case hex digits");
      }
      c.files.push_back(std::move(cf));
    }
  }
  if (j.contains("outputs")) {
    if (!j["outputs"].is_array()) r.fail("outputs", "must be an array");
    for (std::size_t i = 0; i < j["outputs"].size(); ++i) {
      const std::string where = "outputs[" + std::to_string(i) + "].";
      const json& o = j["outputs"][i];
      CardOutput co;
      co.name = r.str(o, "name", where);
      const std::string reduce = r.str(o, "reduce", where);
      if (reduce == "none") co.reduce = CardOutput::Reduce::kNone;
      else if (reduce == "gram_upper") co.reduce = CardOutput::Reduce::kGramUpper;
      else if (reduce == "mean_std") co.reduce = CardOutput::Reduce::kMeanStd;
      else r.fail(where + "reduce", "\"" + reduce + "\" is not none, gram_upper or mean_std");
      co.channels = o.contains("channels") ? r.integer(o, "channels", 0, 1 << 20, where) : 0;
      if (co.reduce != CardOutput::Reduce::kNone && co.channels < 1) r.fail(where + "channels", "needed by " + reduce);
      co.weight = o.contains("weight") ? r.num(o, "weight", 0, 1e6, where) : 1.0;
      co.power = o.contains("power") ? r.num(o, "power", 0.05, 4, where) : 1.0;
      c.outputs.push_back(std::move(co));
    }
  }
  if (j.contains("parts")) {
    if (!j["parts"].is_array()) r.fail("parts", "must be an array");
    for (std::size_t i = 0; i < j["parts"].size(); ++i) {
      const std::string where = "parts[" + std::to_string(i) + "].";
      CardPart p;
      p.encoder = r.str(j["parts"][i], "encoder", where);
      if (p.encoder != "builtin" && fs::path(p.encoder).is_relative()) p.encoder = (dir / p.encoder).lexically_normal().string();
      p.weight = j["parts"][i].contains("weight") ? r.num(j["parts"][i], "weight", 0, 1e6, where) : 1.0;
      c.parts.push_back(std::move(p));
    }
  }
  if (c.backend == "torchscript") {
    c.file("module");
    if (c.modality == "image") {
      if (c.outputs.empty()) r.fail("outputs", "a torchscript image card lists its outputs");
      int width = 0;
      bool any_none = false;
      for (const auto& o : c.outputs) {
        width += o.width();
        any_none = any_none || (o.reduce == CardOutput::Reduce::kNone && o.channels == 0);
      }
      if (!any_none && width != c.dim) {
        r.fail("dim", std::to_string(c.dim) + " but the outputs make " + std::to_string(width));
      }
    }
    if (c.modality != "image") c.file("vocab");
  }
  if (c.backend == "composite") {
    if (c.modality != "image") r.fail("backend", "composite cards are image cards");
    if (c.parts.size() < 2) r.fail("parts", "a composite card has at least two parts");
  }
  return c;
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path.string());
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw IoError("sha256: OpenSSL failed");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<std::size_t>(in.gcount()));
  }
  if (in.bad()) throw IoError("error reading " + path.string());
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

void verify_card_files(const EncoderCard& card) {
  // Resolving "auto", a composite's parts and the module load all verify the same files:
  // a file already seen to match, unchanged since (size and mtime), is not hashed again.
  static std::mutex mutex;
  static std::set<std::tuple<std::string, std::string, std::uintmax_t, std::int64_t>> verified;
  for (const auto& f : card.files) {
    if (!fs::is_regular_file(f.path)) {
      throw InputError("encoder card " + card.path.string() + ": file " + f.path.string() + " is missing");
    }
    const auto key = std::make_tuple(f.path.string(), f.sha256, fs::file_size(f.path),
                                     static_cast<std::int64_t>(fs::last_write_time(f.path).time_since_epoch().count()));
    {
      std::lock_guard lock(mutex);
      if (verified.count(key) != 0) continue;
    }
    const std::string got = sha256_file(f.path);
    if (got != f.sha256) {
      throw InputError("encoder card " + card.path.string() + ": file " + f.path.string() +
                       ": sha256 mismatch (card says " + f.sha256 + ", file has " + got + ")");
    }
    std::lock_guard lock(mutex);
    verified.insert(key);
  }
}

namespace {

double cubic(double x) {
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}
double triangle(double x) {
  x = std::abs(x);
  return x < 1 ? 1 - x : 0;
}

struct Taps {
  std::vector<int> first, count;
  std::vector<float> weights;  // count[i] weights per output, at offset i * max
  int max = 0;
};

// PIL's coefficient layout: output i covers input [center - support, center + support).
// Only the outputs [begin, begin + n) of an in -> out axis (index k is output begin + k).
Taps make_taps(int in, int out, InputGeometry::Filter filter, int begin, int n) {
  const double scale = static_cast<double>(in) / out;
  const double fscale = std::max(scale, 1.0);
  const double base = filter == InputGeometry::Filter::kBicubic ? 2.0 : 1.0;
  const double support = base * fscale;
  Taps t;
  t.max = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(n);
  t.count.resize(n);
  t.weights.assign(static_cast<std::size_t>(n) * t.max, 0.f);
  for (int k_out = 0; k_out < n; ++k_out) {
    const int i = begin + k_out;
    const double center = (i + 0.5) * scale;
    int lo = static_cast<int>(center - support + 0.5);
    int hi = static_cast<int>(center + support + 0.5);
    lo = std::max(lo, 0);
    hi = std::min(hi, in);
    const int taps = std::min(hi - lo, t.max);
    double sum = 0;
    std::vector<double> w(taps);
    for (int k = 0; k < taps; ++k) {
      const double x = (lo + k - center + 0.5) / fscale;
      w[k] = filter == InputGeometry::Filter::kBicubic ? cubic(x) : triangle(x);
      sum += w[k];
    }
    for (int k = 0; k < taps; ++k) t.weights[static_cast<std::size_t>(k_out) * t.max + k] = static_cast<float>(sum != 0 ? w[k] / sum : 0);
    t.first[k_out] = lo;
    t.count[k_out] = taps;
  }
  return t;
}

std::uint8_t clip8(float v) { return static_cast<std::uint8_t>(std::clamp(std::lround(v), 0L, 255L)); }

}  // namespace

Image resample(const Image& image, int width, int height, InputGeometry::Filter filter) {
  if (width == image.width && height == image.height && image.width > 0 && image.height > 0) return image;
  return resample_window(image, width, height, 0, 0, width, height, filter);
}

Image resample_window(const Image& image, int width, int height, int x0, int y0, int w, int h,
                      InputGeometry::Filter filter) {
  if (width <= 0 || height <= 0 || image.width <= 0 || image.height <= 0) {
    throw InputError("resample: empty image or target");
  }
  if (w <= 0 || h <= 0 || x0 < 0 || y0 < 0 || x0 + static_cast<long long>(w) > width ||
      y0 + static_cast<long long>(h) > height) {
    throw InputError("resample: the window is not inside the target");
  }
  // Horizontal pass into 8-bit (as PIL does), then vertical; only the source rows and the
  // output columns the window needs.
  const Taps tx = make_taps(image.width, width, filter, x0, w);
  const Taps ty = make_taps(image.height, height, filter, y0, h);
  int row_first = image.height, row_last = -1;
  for (int y = 0; y < h; ++y) {
    if (ty.count[y] == 0) continue;
    row_first = std::min(row_first, ty.first[y]);
    row_last = std::max(row_last, ty.first[y] + ty.count[y] - 1);
  }
  if (row_last < row_first) row_first = row_last = 0;
  const int rows = row_last - row_first + 1;
  Image mid;
  mid.width = w;
  mid.height = rows;
  mid.rgb.resize(static_cast<std::size_t>(w) * rows * 3);
  for (int yy = 0; yy < rows; ++yy) {
    const std::uint8_t* src = &image.rgb[static_cast<std::size_t>(row_first + yy) * image.width * 3];
    std::uint8_t* dst = &mid.rgb[static_cast<std::size_t>(yy) * w * 3];
    for (int x = 0; x < w; ++x) {
      float acc[3] = {0, 0, 0};
      const float* wt = &tx.weights[static_cast<std::size_t>(x) * tx.max];
      for (int k = 0; k < tx.count[x]; ++k) {
        const std::uint8_t* p = src + static_cast<std::size_t>(tx.first[x] + k) * 3;
        acc[0] += wt[k] * p[0];
        acc[1] += wt[k] * p[1];
        acc[2] += wt[k] * p[2];
      }
      for (int c = 0; c < 3; ++c) dst[x * 3 + c] = clip8(acc[c]);
    }
  }
  Image out;
  out.width = w;
  out.height = h;
  out.rgb.resize(static_cast<std::size_t>(w) * h * 3);
  std::vector<float> acc(static_cast<std::size_t>(w) * 3);
  for (int y = 0; y < h; ++y) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const float* wt = &ty.weights[static_cast<std::size_t>(y) * ty.max];
    for (int k = 0; k < ty.count[y]; ++k) {
      const std::uint8_t* row = &mid.rgb[static_cast<std::size_t>(ty.first[y] - row_first + k) * w * 3];
      for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += wt[k] * row[i];
    }
    std::uint8_t* dst = &out.rgb[static_cast<std::size_t>(y) * w * 3];
    for (std::size_t i = 0; i < acc.size(); ++i) dst[i] = clip8(acc[i]);
  }
  return out;
}

Image prepare_image(const Image& image, const InputGeometry& g) {
  if (image.width <= 0 || image.height <= 0) throw InputError("prepare_image: empty image");
  Image scaled;
  const Image* src = &image;
  const int shorter = std::min(image.width, image.height);
  if (g.resize == InputGeometry::Resize::kShorterSide ? shorter != g.size : shorter < g.size) {
    // torchvision's Resize(size): the shorter side becomes `size`, the longer is truncated.
    int w, h;
    if (image.width <= image.height) {
      w = g.size;
      h = static_cast<int>(static_cast<long long>(g.size) * image.height / image.width);
    } else {
      h = g.size;
      w = static_cast<int>(static_cast<long long>(g.size) * image.width / image.height);
    }
    // torchvision's CenterCrop of the resized image: offsets round((in - out) / 2). Only
    // that crop is computed, so an extreme aspect ratio costs the crop, not the strip.
    const int left = static_cast<int>(std::nearbyint((w - g.size) / 2.0));  // half to even
    const int top = static_cast<int>(std::nearbyint((h - g.size) / 2.0));
    if (w >= g.size && h >= g.size) return resample_window(image, w, h, left, top, g.size, g.size, g.filter);
    scaled = resample(image, w, h, g.filter);
    src = &scaled;
  }
  if (src->width == g.size && src->height == g.size) return scaled.width > 0 ? scaled : image;
  // torchvision's CenterCrop: offsets round((in - out) / 2).
  const int left = static_cast<int>(std::nearbyint((src->width - g.size) / 2.0));  // half to even, as Python
  const int top = static_cast<int>(std::nearbyint((src->height - g.size) / 2.0));
  Image out;
  out.width = out.height = g.size;
  out.rgb.resize(static_cast<std::size_t>(g.size) * g.size * 3);
  for (int y = 0; y < g.size; ++y) {
    std::copy_n(&src->rgb[(static_cast<std::size_t>(top + y) * src->width + left) * 3], static_cast<std::size_t>(g.size) * 3,
                &out.rgb[static_cast<std::size_t>(y) * g.size * 3]);
  }
  return out;
}

}  // namespace gmi
