#include "gmi/workers/shard_snapshot.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "gmi/error.hpp"
#include "gmi/files.hpp"

namespace gmi::workers {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int kManifestFormat = 1;

std::string random_run() {
  std::random_device device;
  std::ostringstream out;
  out << std::hex << ((static_cast<std::uint64_t>(device()) << 32) ^ device() ^ static_cast<std::uint64_t>(::getpid()));
  return out.str();
}

}  // namespace

ShardSnapshots::ShardSnapshots(std::string dir, int shard, int shards, SpecStorage storage, EncoderIdentity image,
                               EncoderIdentity text, bool verify)
    : dir_(std::move(dir)),
      shard_(shard),
      shards_(shards),
      storage_(storage),
      image_(std::move(image)),
      text_(std::move(text)),
      verify_(verify),
      run_(random_run()) {
  prefix_ = "shard-" + std::to_string(shard_) + "-of-" + std::to_string(shards_);
  manifest_ = (fs::path(dir_) / (prefix_ + ".json")).string();
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw IoError("score.snapshot_dir " + dir_ + ": cannot create: " + ec.message());
}

namespace {

json read_manifest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return nullptr;
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw SpecFormatError("shard manifest " + path + " is damaged: " + e.what());
  }
}

}  // namespace

std::optional<ShardPosition> ShardSnapshots::position() const {
  const json m = read_manifest(manifest_);
  if (m.is_null()) return std::nullopt;
  const auto bad = [&](const std::string& what) { return SpecFormatError("shard manifest " + manifest_ + ": " + what); };
  try {
    if (m.at("format").get<int>() != kManifestFormat) throw bad("format " + m.at("format").dump() + " is not this build's");
    if (m.at("shard").get<int>() != shard_ || m.at("shards").get<int>() != shards_)
      throw bad("it is of shard " + m.at("shard").dump() + " of " + m.at("shards").dump());
    if (m.at("storage").get<std::string>() != to_string(storage_))
      throw bad("its segments store " + m.at("storage").get<std::string>() + ", this worker " + to_string(storage_));
    if (m.at("image_encoder").get<std::string>() != image_.str() || m.at("text_encoder").get<std::string>() != text_.str())
      throw bad("it was made with encoders " + m.at("image_encoder").get<std::string>() + " and " +
                m.at("text_encoder").get<std::string>() + ", this worker serves " + image_.str() + " and " + text_.str());
    ShardPosition p;
    p.cursor = m.at("cursor").get<std::string>();
    p.generation = m.at("generation").get<std::uint64_t>();
    p.metric_version = m.at("metric_version").get<std::uint64_t>();
    p.metric_checksum = m.at("metric_checksum").get<std::string>();
    return p;
  } catch (const json::exception& e) {
    throw bad(e.what());
  }
}

ShardSnapshots::Restored ShardSnapshots::restore(const std::shared_ptr<const Metric>& metric) {
  const json m = read_manifest(manifest_);
  if (m.is_null()) throw IoError("shard manifest " + manifest_ + " is gone");
  Restored out;
  SpecIndex::OpenOptions open;
  open.map_points = true;
  open.verify = verify_;
  std::vector<std::pair<std::weak_ptr<const SpecIndex>, std::string>> on_disk;
  try {
    for (const json& seg : m.at("segments")) {
      const std::string file = seg.at("file").get<std::string>();
      if (file.find('/') != std::string::npos || file.rfind(prefix_ + "-", 0) != 0)
        throw SpecFormatError("shard manifest " + manifest_ + ": segment file '" + file + "' is not this shard's");
      auto index = std::make_shared<const SpecIndex>(SpecIndex::open((fs::path(dir_) / file).string(), metric, open));
      std::vector<bool> dead(index->size(), false);
      for (const json& row : seg.at("dead")) {
        const auto r = row.get<std::size_t>();
        if (r >= dead.size())
          throw SpecFormatError("shard manifest " + manifest_ + ": tombstone row " + std::to_string(r) + " of " +
                                file + " is past its " + std::to_string(dead.size()) + " models");
        dead[r] = true;
      }
      on_disk.emplace_back(index, file);
      out.segments.emplace_back(std::move(index), std::move(dead));
    }
  } catch (const json::exception& e) {
    throw SpecFormatError("shard manifest " + manifest_ + ": " + e.what());
  }
  on_disk_ = std::move(on_disk);
  return out;
}

ShardSnapshots::Written ShardSnapshots::write(const SegmentedIndex& hub, const ShardPosition& position) {
  Written out;
  json segments = json::array();
  std::vector<std::pair<std::weak_ptr<const SpecIndex>, std::string>> on_disk;
  std::set<std::string> named;
  for (const Segment& seg : hub.segments()) {
    if (!seg.index || seg.index->size() == 0) continue;
    std::string file;
    for (const auto& [weak, name] : on_disk_)  // the same index (by ownership), written before
      if (!weak.owner_before(seg.index) && !seg.index.owner_before(weak) && !weak.expired()) file = name;
    if (file.empty()) {
      file = prefix_ + "-" + run_ + "-" + std::to_string(++serial_) + ".gmisnap";
      seg.index->save((fs::path(dir_) / file).string());
      ++out.files;
      out.bytes += fs::file_size(fs::path(dir_) / file);
    }
    json dead = json::array();
    if (seg.dead)
      for (std::size_t row = 0; row < seg.dead->size(); ++row)
        if ((*seg.dead)[row]) dead.push_back(row);
    segments.push_back({{"file", file}, {"models", seg.index->size()}, {"dead", std::move(dead)}});
    on_disk.emplace_back(seg.index, file);
    named.insert(file);
  }
  const json manifest{{"format", kManifestFormat},
                      {"shard", shard_},
                      {"shards", shards_},
                      {"storage", to_string(storage_)},
                      {"image_encoder", image_.str()},
                      {"text_encoder", text_.str()},
                      {"cursor", position.cursor},
                      {"generation", position.generation},
                      {"metric_version", position.metric_version},
                      {"metric_checksum", position.metric_checksum},
                      {"models", hub.size()},
                      {"segments", std::move(segments)}};
  const std::string text = manifest.dump(1);
  write_file_atomically(manifest_, text.data(), text.size());
  on_disk_ = std::move(on_disk);
  // Only now may the files the manifest no longer names go (this shard's, and leftovers of
  // an interrupted write).
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    const bool ours = name.rfind(prefix_ + "-", 0) == 0 || name.rfind("." + prefix_ + "-", 0) == 0;
    if (!ours || named.count(name)) continue;
    std::error_code rm;
    if (fs::remove(entry.path(), rm)) ++out.removed;
  }
  return out;
}

}  // namespace gmi::workers
