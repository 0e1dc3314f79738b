// Segment snapshots: a packed SpecIndex written to one local file and opened again, its
// binary16 points memory-mapped. See SpecIndex::save / SpecIndex::open (scoring.hpp).
//
// Layout (little-endian):
//   "GMISNAP1"                      magic, 8 bytes
//   u32 format (1), u32 storage (0 f32, 1 f16)
//   u64 models, points, gram_total, dx, dt
//   image encoder, text encoder:    str name, str version, u32 dim, u64 default_gamma bits
//   str metric checksum             ("" for none)
//   u32 sections; per section:      u64 offset, u64 bytes, u32 crc32
//   u32 crc32 of everything above
// then each section at a multiple of 4096 (so the points can be mapped and read aligned):
//   zx, zt (float32 or binary16), zx_sqnorm, zt_inv_norm, beta, log_beta (float32, P each),
//   grams (float32), offsets (u64, M + 1), gram_offsets (u64, M), beta_k_beta (f64, M),
//   gamma (f32, M), mean_unit (f32, M x dx), downloads (f64, M), ids (per model u32 length,
//   bytes). str is u32 length + bytes.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_set>
#include <vector>

#include "binary_io.hpp"
#include "gmi/error.hpp"
#include "gmi/files.hpp"
#include "gmi/metric.hpp"
#include "gmi/scoring.hpp"
#include "unique_fd.hpp"

namespace gmi {
namespace {

using Eigen::Index;

constexpr char kMagic[8] = {'G', 'M', 'I', 'S', 'N', 'A', 'P', '1'};
constexpr std::uint32_t kFormat = 1;
constexpr std::size_t kAlign = 4096;
constexpr int kSections = 14;
// Header fields beyond this are not a snapshot's (ids and names are short).
constexpr std::size_t kMaxHeader = 1 << 20;

static_assert(std::endian::native == std::endian::little,
              "snapshots store arrays in the host's byte order, which must be little-endian");

std::string errno_text() { return std::strerror(errno); }

void put_u64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

void put_str(std::vector<std::uint8_t>& out, const std::string& s) {
  binary::put_u32(out, static_cast<std::uint32_t>(s.size()));
  out.insert(out.end(), s.begin(), s.end());
}

void put_identity(std::vector<std::uint8_t>& out, const EncoderIdentity& e) {
  put_str(out, e.name);
  put_str(out, e.version);
  binary::put_u32(out, static_cast<std::uint32_t>(e.dim));
  put_u64(out, std::bit_cast<std::uint64_t>(e.default_gamma));
}

struct Section {
  const void* data = nullptr;
  std::size_t bytes = 0;
};

// Reads the header fields in order, every read checked against the header's end.
class HeaderReader {
 public:
  HeaderReader(const std::uint8_t* p, std::size_t size, const std::string& path) : p_(p), size_(size), path_(path) {}
  const std::uint8_t* take(std::size_t n) {
    if (n > size_ - at_) fail("truncated header");
    const std::uint8_t* out = p_ + at_;
    at_ += n;
    return out;
  }
  std::uint32_t u32() { return binary::get_u32(take(4)); }
  std::uint64_t u64() {
    const std::uint8_t* b = take(8);
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = v << 8 | b[i];
    return v;
  }
  std::string str() {
    const std::uint32_t n = u32();
    const auto* b = reinterpret_cast<const char*>(take(n));
    return std::string(b, n);
  }
  EncoderIdentity identity() {
    EncoderIdentity e;
    e.name = str();
    e.version = str();
    e.dim = static_cast<int>(u32());
    e.default_gamma = std::bit_cast<double>(u64());
    return e;
  }
  std::size_t at() const { return at_; }
  [[noreturn]] void fail(const std::string& what) const {
    throw SpecFormatError("segment snapshot " + path_ + ": " + what);
  }

 private:
  const std::uint8_t* p_;
  std::size_t size_;
  std::size_t at_ = 0;
  const std::string& path_;
};

// A read-only mapping of a whole file, unmapped when the last holder lets go.
struct Mapping {
  void* base = MAP_FAILED;
  std::size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base != MAP_FAILED) ::munmap(base, size);
  }
  const std::uint8_t* bytes() const { return static_cast<const std::uint8_t*>(base); }
};

std::size_t aligned(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

void SpecIndex::save(const std::string& path) const {
  const std::size_t models = size(), points_n = points();
  const bool half = storage_ == SpecStorage::kF16;
  std::vector<std::uint8_t> ids;
  for (const std::string& id : model_ids_) put_str(ids, id);
  const std::vector<std::size_t> no_models(1, 0);  // a default-made index has no offsets yet
  const std::vector<std::size_t>& offsets = offsets_.empty() ? no_models : offsets_;
  const std::size_t point_bytes = half ? sizeof(std::uint16_t) : sizeof(float);
  const Section sections[kSections] = {
      {half ? static_cast<const void*>(zx16_.data()) : zx_.data(), points_n * static_cast<std::size_t>(dx_) * point_bytes},
      {half ? static_cast<const void*>(zt16_.data()) : zt_.data(), points_n * static_cast<std::size_t>(dt_) * point_bytes},
      {zx_sqnorm_.data(), points_n * sizeof(float)},
      {zt_inv_norm_.data(), points_n * sizeof(float)},
      {beta_.data(), points_n * sizeof(float)},
      {log_beta_.data(), points_n * sizeof(float)},
      {grams_.data(), grams_.size() * sizeof(float)},
      {offsets.data(), offsets.size() * sizeof(std::size_t)},
      {gram_offsets_.data(), gram_offsets_.size() * sizeof(std::size_t)},
      {beta_k_beta_.data(), models * sizeof(double)},
      {gamma_.data(), models * sizeof(float)},
      {mean_unit_.data(), models * static_cast<std::size_t>(dx_) * sizeof(float)},
      {downloads_.data(), models * sizeof(double)},
      {ids.data(), ids.size()},
  };
  static_assert(sizeof(std::size_t) == 8, "offsets are stored as u64");

  std::vector<std::uint8_t> head(kMagic, kMagic + 8);
  binary::put_u32(head, kFormat);
  binary::put_u32(head, half ? 1 : 0);
  for (std::uint64_t v : {static_cast<std::uint64_t>(models), static_cast<std::uint64_t>(points_n),
                          static_cast<std::uint64_t>(grams_.size()), static_cast<std::uint64_t>(dx_),
                          static_cast<std::uint64_t>(dt_)})
    put_u64(head, v);
  put_identity(head, image_encoder_);
  put_identity(head, text_encoder_);
  put_str(head, metric_ ? metric_->checksum() : std::string());
  binary::put_u32(head, kSections);
  // The table's size is known before its values: offsets follow the header, each aligned.
  const std::size_t head_end = head.size() + kSections * 20 + 4;
  std::size_t at = aligned(head_end);
  for (const Section& sec : sections) {
    put_u64(head, at);
    put_u64(head, sec.bytes);
    binary::put_u32(head, binary::crc32(static_cast<const std::uint8_t*>(sec.data), sec.bytes));
    at = aligned(at + sec.bytes);
  }
  binary::put_u32(head, binary::crc32(head.data(), head.size()));

  write_file_atomically(path, [&](const FileWrite& write) {
    write(head.data(), head.size());
    std::size_t written = head.size();
    const std::vector<std::uint8_t> zeros(kAlign, 0);
    for (const Section& sec : sections) {
      const std::size_t pad = aligned(written) - written;
      write(zeros.data(), pad);
      write(sec.data, sec.bytes);
      written += pad + sec.bytes;
    }
  });
}

SpecIndex SpecIndex::open(const std::string& path, std::shared_ptr<const Metric> metric, const OpenOptions& options) {
  detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw IoError("segment snapshot " + path + ": cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw IoError("segment snapshot " + path + ": fstat failed: " + errno_text());
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<std::size_t>(st.st_size);
  if (map->size < 8) throw SpecFormatError("segment snapshot " + path + ": not a snapshot (too short)");
  map->base = ::mmap(nullptr, map->size, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (map->base == MAP_FAILED) throw IoError("segment snapshot " + path + ": mmap failed: " + errno_text());
  const std::uint8_t* file = map->bytes();

  HeaderReader h(file, std::min(map->size, kMaxHeader), path);
  if (std::memcmp(h.take(8), kMagic, 8) != 0) h.fail("not a snapshot (bad magic)");
  if (const std::uint32_t format = h.u32(); format != kFormat)
    h.fail("format " + std::to_string(format) + ", this build reads " + std::to_string(kFormat));
  const std::uint32_t storage = h.u32();
  if (storage > 1) h.fail("unknown storage " + std::to_string(storage));
  const std::uint64_t models = h.u64(), points_n = h.u64(), gram_total = h.u64(), dx = h.u64(), dt = h.u64();
  SpecIndex out;
  out.image_encoder_ = h.identity();
  out.text_encoder_ = h.identity();
  const std::string metric_sum = h.str();
  if (h.u32() != kSections) h.fail("wrong number of sections");
  std::uint64_t offset[kSections], bytes[kSections];
  std::uint32_t crc[kSections];
  for (int i = 0; i < kSections; ++i) offset[i] = h.u64(), bytes[i] = h.u64(), crc[i] = h.u32();
  const std::size_t head_size = h.at();
  if (h.u32() != binary::crc32(file, head_size)) h.fail("header checksum mismatch (damaged file)");
  // Sizes first (no allocation before they are known to fit the file and each other).
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 48;
  if (models > kHuge || points_n > kHuge || gram_total > kHuge || dx > (1u << 20) || dt > (1u << 20))
    h.fail("implausible sizes");
  const bool half = storage == 1;
  const std::uint64_t pb = half ? 2 : 4;
  // Every size below is a product of these; none may wrap (a crafted header could make a
  // wrapped size match its section).
  std::uint64_t product = 0;
  if (__builtin_mul_overflow(points_n, std::max({dx, dt, std::uint64_t{8}}), &product) ||
      __builtin_mul_overflow(product, std::uint64_t{8}, &product) ||
      __builtin_mul_overflow(models, std::max(dx, std::uint64_t{8}), &product) ||
      __builtin_mul_overflow(product, std::uint64_t{8}, &product) ||
      __builtin_mul_overflow(gram_total, std::uint64_t{8}, &product))
    h.fail("implausible sizes");
  const std::uint64_t want[kSections] = {points_n * dx * pb, points_n * dt * pb, points_n * 4, points_n * 4,
                                         points_n * 4,       points_n * 4,       gram_total * 4, (models + 1) * 8,
                                         models * 8,         models * 8,         models * 4,     models * dx * 4,
                                         models * 8,         bytes[13]};
  for (int i = 0; i < kSections; ++i) {
    if (bytes[i] != want[i]) h.fail("section " + std::to_string(i) + " has " + std::to_string(bytes[i]) +
                                    " bytes, its header says " + std::to_string(want[i]));
    if (offset[i] % kAlign != 0 || offset[i] > map->size || bytes[i] > map->size - offset[i])
      h.fail("section " + std::to_string(i) + " lies outside the file (truncated?)");
    const bool read_in = !(half && options.map_points && i < 2);
    if ((options.verify || read_in) && binary::crc32(file + offset[i], bytes[i]) != crc[i])
      h.fail("section " + std::to_string(i) + " checksum mismatch (damaged file)");
  }
  // The metric: the one the points were mapped with, or none.
  const std::string given = metric ? metric->checksum() : std::string();
  if (given != metric_sum)
    throw EncoderMismatchError("segment snapshot " + path + " was packed " +
                               (metric_sum.empty() ? std::string("without a metric") : "with metric " + metric_sum) +
                               ", the index is asked for " +
                               (given.empty() ? std::string("none") : "metric " + given));
  if (metric) check_metric_encoder(*metric, out.image_encoder_);
  const std::uint64_t dm = metric ? static_cast<std::uint64_t>(metric->dim_out())
                                  : static_cast<std::uint64_t>(out.image_encoder_.dim);
  if (models > 0 && (dx != dm || dt != static_cast<std::uint64_t>(out.text_encoder_.dim)))
    h.fail("point dimensions " + std::to_string(dx) + " x " + std::to_string(dt) + " do not match the encoders");

  const auto section = [&](int i) { return file + offset[i]; };
  const auto copy_in = [&](int i, void* to) {  // (memcpy wants real pointers even for 0 bytes)
    if (bytes[i] > 0) std::memcpy(to, section(i), bytes[i]);
  };
  const auto P = static_cast<Index>(points_n), M = static_cast<Index>(models);
  out.metric_ = std::move(metric);
  out.storage_ = half ? SpecStorage::kF16 : SpecStorage::kF32;
  out.dx_ = static_cast<Index>(dx);
  out.dt_ = static_cast<Index>(dt);
  out.offsets_.resize(models + 1);
  copy_in(7, out.offsets_.data());
  out.gram_offsets_.resize(models);
  copy_in(8, out.gram_offsets_.data());
  if (out.offsets_[0] != 0 || out.offsets_[models] != points_n) h.fail("point offsets do not span the points");
  std::size_t g = 0;
  for (std::size_t m = 0; m < models; ++m) {
    if (out.offsets_[m + 1] <= out.offsets_[m]) h.fail("model " + std::to_string(m) + " has no points");
    const std::size_t r = out.offsets_[m + 1] - out.offsets_[m];
    if (out.gram_offsets_[m] != g) h.fail("Gram offsets do not match the point counts");
    g += r * r;
  }
  if (g != gram_total) h.fail("Gram offsets do not match the point counts");
  if (half) {
    const auto* zx = reinterpret_cast<const std::uint16_t*>(section(0));
    const auto* zt = reinterpret_cast<const std::uint16_t*>(section(1));
    if (options.map_points) {
      out.zx16_.view(zx, points_n * dx, map);
      out.zt16_.view(zt, points_n * dt, map);
    } else {
      out.zx16_.resize(points_n * dx);
      out.zt16_.resize(points_n * dt);
      copy_in(0, out.zx16_.mutable_data());
      copy_in(1, out.zt16_.mutable_data());
    }
  } else {
    out.zx_.resize(P, out.dx_);
    out.zt_.resize(P, out.dt_);
    copy_in(0, out.zx_.data());
    copy_in(1, out.zt_.data());
  }
  const auto read_floats = [&](int i, Eigen::VectorXf& v, Index n) {
    v.resize(n);
    copy_in(i, v.data());
  };
  read_floats(2, out.zx_sqnorm_, P);
  read_floats(3, out.zt_inv_norm_, P);
  read_floats(4, out.beta_, P);
  read_floats(5, out.log_beta_, P);
  read_floats(10, out.gamma_, M);
  out.grams_.resize(gram_total);
  copy_in(6, out.grams_.data());
  out.beta_k_beta_.resize(M);
  copy_in(9, out.beta_k_beta_.data());
  out.mean_unit_.resize(M, out.dx_);
  copy_in(11, out.mean_unit_.data());
  out.downloads_.resize(M);
  copy_in(12, out.downloads_.data());
  HeaderReader ids(section(13), bytes[13], path);
  out.model_ids_.reserve(models);
  std::unordered_set<std::string_view> seen;
  seen.reserve(models);
  for (std::size_t m = 0; m < models; ++m) {
    out.model_ids_.push_back(ids.str());
    if (!seen.insert(out.model_ids_.back()).second)
      h.fail("model id '" + out.model_ids_.back() + "' appears twice");
  }
  if (ids.at() != bytes[13]) h.fail("trailing bytes after the model ids");
  return out;
}

}  // namespace gmi
