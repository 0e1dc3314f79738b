#include "gmi/segments.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

#include "gmi/error.hpp"

namespace gmi {

namespace {

bool same_shape(const SpecIndex& a, const SpecIndex& b) {
  return a.image_encoder() == b.image_encoder() && a.text_encoder() == b.text_encoder() &&
         a.metric() == b.metric() && a.storage() == b.storage();
}

}  // namespace

SegmentedIndex::SegmentedIndex(std::shared_ptr<const SpecIndex> index) {
  if (!index) throw InputError("SegmentedIndex: no index");
  metric_ = index->metric();
  Segment s;
  s.index = std::move(index);
  s.id = 1;
  segments_.push_back(std::move(s));
  image_ = segments_.front().index->image_encoder();
  text_ = segments_.front().index->text_encoder();
  live_ = segments_.front().index->size();
}

SegmentedIndex::SegmentedIndex(std::vector<Segment> segments, std::shared_ptr<const Metric> metric)
    : segments_(std::move(segments)), metric_(std::move(metric)) {
  const SpecIndex* first = nullptr;
  for (const Segment& s : segments_) {
    if (!s.index) throw InputError("SegmentedIndex: a segment has no index");
    if (s.dead && s.dead->size() != s.index->size())
      throw InputError("SegmentedIndex: a segment's tombstones do not match its models");
    if (s.dead_count > s.index->size()) throw InputError("SegmentedIndex: more tombstones than models");
    live_ += s.live();
    dead_ += s.dead_count;
    if (s.index->size() == 0) continue;
    if (s.index->metric() != metric_) throw InputError("SegmentedIndex: a segment has another metric");
    if (!first) {
      first = s.index.get();
    } else if (!same_shape(*first, *s.index)) {
      throw InputError("SegmentedIndex: the segments differ in encoders, metric or storage");
    }
  }
  if (first) {
    image_ = first->image_encoder();
    text_ = first->text_encoder();
  }
}

std::size_t SegmentedIndex::sealed_segments() const {
  return static_cast<std::size_t>(
      std::count_if(segments_.begin(), segments_.end(), [](const Segment& s) { return !s.tail; }));
}

std::size_t SegmentedIndex::tail_size() const {
  std::size_t n = 0;
  for (const Segment& s : segments_)
    if (s.tail) n += s.live();
  return n;
}

std::size_t SegmentedIndex::memory_bytes() const {
  std::size_t bytes = 0;
  for (const Segment& s : segments_) bytes += s.index->memory_bytes() + (s.dead ? s.dead->size() / 8 : 0);
  return bytes;
}

std::size_t SegmentedIndex::mapped_bytes() const {
  std::size_t bytes = 0;
  for (const Segment& s : segments_) bytes += s.index->mapped_bytes();
  return bytes;
}

void SegmentedIndex::check_compatible(const EncoderIdentity& image, const EncoderIdentity& text) const {
  for (const Segment& s : segments_)
    if (s.index->size() > 0) return s.index->check_compatible(image, text);
}

const SpecIndex& SegmentedIndex::single() const {
  if (segments_.empty()) {
    static const SpecIndex empty;
    return empty;
  }
  if (segments_.size() != 1 || segments_.front().dead_count != 0)
    throw InputError("this hub is held in " + std::to_string(segments_.size()) +
                     " segments; one packed index was asked for");
  return *segments_.front().index;
}

std::vector<std::vector<RankedModel>> SegmentedIndex::rank_batch(const RowMatrix& xs, const RowMatrix& ts,
                                                                 const ScoreOptions& options,
                                                                 const SegmentSearch& search) const {
  const auto queries = static_cast<std::size_t>(xs.rows());
  std::vector<std::vector<RankedModel>> out(queries);
  const Segment* only = nullptr;
  std::size_t used = 0;
  for (const Segment& s : segments_)
    if (s.live() > 0) {
      only = &s;
      ++used;
    }
  if (used == 0) return out;
  auto rank_one = [&](const Segment& s) {
    const SpecIndex::TwoStage mine = segment_search(search.options, s);
    const bool staged = search.two_stage && !s.tail && has_exact_stage(options.scorer) &&
                        s.index->two_stage_ready(mine);
    return staged ? s.index->rank_batch_two_stage(xs, ts, options, mine, s.dead.get())
                  : s.index->rank_batch(xs, ts, options, s.dead.get());
  };
  if (used == 1) return rank_one(*only);
  // Every segment's own top-k holds the segment's share of the merged top-k: merge them.
  const bool asc = ascending(options.scorer);
  for (const Segment& s : segments_) {
    if (s.live() == 0) continue;
    auto part = rank_one(s);
    for (std::size_t q = 0; q < queries; ++q)
      out[q].insert(out[q].end(), std::make_move_iterator(part[q].begin()), std::make_move_iterator(part[q].end()));
  }
  const auto better = [asc](const RankedModel& a, const RankedModel& b) { return ranks_ahead(a, b, asc); };
  for (auto& list : out) {
    const std::size_t keep =
        options.top_k <= 0 ? list.size() : std::min(list.size(), static_cast<std::size_t>(options.top_k));
    std::partial_sort(list.begin(), list.begin() + static_cast<std::ptrdiff_t>(keep), list.end(), better);
    list.resize(keep);
  }
  return out;
}

std::size_t SegmentedIndex::prepare(const SegmentSearch& search) const {
  if (!search.two_stage) return 0;
  std::size_t bytes = 0;
  for (const Segment& s : segments_) {  // (a segment of no more than its candidates is scored exactly)
    const SpecIndex::TwoStage mine = segment_search(search.options, s);
    if (!s.tail && s.index->size() > mine.candidates) bytes += s.index->prepare_two_stage(mine);
  }
  return bytes;
}

SpecIndex::TwoStage SegmentedIndex::segment_search(const SpecIndex::TwoStage& whole, const Segment& s) const {
  SpecIndex::TwoStage mine = whole;
  if (live_ == 0 || s.live() >= live_) return mine;
  // A segment holds about its share of the models that rank ahead of the hub's top-k in each
  // stage; kSlack over that share, and never fewer than kLeast candidates.
  constexpr double kSlack = 1.5;
  constexpr std::size_t kLeast = 64;
  const double share = kSlack * static_cast<double>(s.live()) / static_cast<double>(live_);
  const auto scaled = [share](std::size_t n) { return static_cast<std::size_t>(std::ceil(share * static_cast<double>(n))); };
  mine.candidates = std::min(whole.candidates, std::max(kLeast, scaled(whole.candidates)));
  if (whole.coarse > 0) mine.coarse = std::min(whole.coarse, std::max(2 * mine.candidates, scaled(whole.coarse)));
  return mine;
}

SegmentBuilder::SegmentBuilder(std::shared_ptr<const Metric> metric, SpecSpace space, SpecStorage storage,
                               SegmentPolicy policy)
    : metric_(std::move(metric)), space_(space), storage_(storage), policy_(policy) {
  if (policy_.tail_max < 1) throw InputError("segments: the tail must hold at least one model");
  if (policy_.merge_factor < 2) throw InputError("segments: merge_factor must be at least 2");
  if (!(policy_.dead_fraction > 0 && policy_.dead_fraction <= 1))
    throw InputError("segments: dead_fraction must be in (0, 1]");
  if (policy_.segment_max < policy_.tail_max)
    throw InputError("segments: segment_max must be at least tail_max");
}

void SegmentBuilder::check_encoders(const EncoderIdentity& image, const EncoderIdentity& text) {
  if (!encoders_known_) {
    image_ = image;
    text_ = text;
    encoders_known_ = true;
    return;
  }
  if (!(image == image_) || !(text == text_))
    throw EncoderMismatchError("segments: a spec made with " + image.str() + " / " + text.str() +
                               " cannot join a shard of " + image_.str() + " / " + text_.str());
}

SegmentBuilder::Sealed* SegmentBuilder::find(std::uint64_t id) {
  for (Sealed& s : sealed_)
    if (s.id == id) return &s;
  return nullptr;
}

void SegmentBuilder::kill(const Location& where) {
  if (where.segment == kTail) return;  // the tail: see drop_from_tail
  Sealed* s = find(where.segment);
  if (!s) return;
  if (!s->dead) {
    s->dead = std::make_shared<std::vector<bool>>(s->index->size(), false);
  } else if (s->dead.use_count() > 1) {
    s->dead = std::make_shared<std::vector<bool>>(*s->dead);  // a snapshot still reads the old flags
  }
  if (!(*s->dead)[where.row]) {
    (*s->dead)[where.row] = true;
    ++s->dead_count;
  }
}

void SegmentBuilder::drop_from_tail(const std::string& id) {
  if (pending_.erase(id) == 0) tail_drop_[id] = true;  // else it never reached the packed tail
}

void SegmentBuilder::upsert(Spec spec) {
  // Checked first, so that a spec the tail could not hold is refused here, before any state
  // changes, and not when the tail is next packed.
  check_packable(spec, metric_.get(), space_);
  check_encoders(spec.image_encoder, spec.text_encoder);
  const auto it = locations_.find(spec.model_id);
  if (it != locations_.end()) {
    if (it->second.segment == kTail)
      drop_from_tail(spec.model_id);
    else
      kill(it->second);
  }
  locations_[spec.model_id] = Location{};
  std::string id = spec.model_id;
  pending_[std::move(id)] = std::move(spec);
}

void SegmentBuilder::remove(const std::string& id) {
  const auto it = locations_.find(id);
  if (it == locations_.end()) return;
  if (it->second.segment == kTail)
    drop_from_tail(id);
  else
    kill(it->second);
  locations_.erase(it);
}

std::uint64_t SegmentBuilder::add_sealed(std::shared_ptr<const SpecIndex> index, const std::vector<bool>* dead) {
  Sealed s;
  s.id = next_id_++;
  const auto& ids = index->model_ids();
  if (dead && dead->size() != ids.size())
    throw InputError("segments: " + std::to_string(dead->size()) + " tombstone flags for a segment of " +
                     std::to_string(ids.size()) + " models");
  for (std::size_t row = 0; row < ids.size(); ++row) {
    if (dead && (*dead)[row]) {
      if (!s.dead) s.dead = std::make_shared<std::vector<bool>>(ids.size(), false);
      (*s.dead)[row] = true;
      ++s.dead_count;
      continue;
    }
    const auto it = locations_.find(ids[row]);
    if (it != locations_.end()) {
      if (it->second.segment == kTail)
        drop_from_tail(ids[row]);
      else
        kill(it->second);
    }
    locations_[ids[row]] = Location{s.id, static_cast<std::uint32_t>(row)};
  }
  s.index = std::move(index);
  sealed_.push_back(std::move(s));
  return sealed_.back().id;
}

void SegmentBuilder::add_segment(std::shared_ptr<const SpecIndex> index, const std::vector<bool>* dead) {
  if (!index) throw InputError("segments: no index to add");
  if (index->size() == 0) return;
  if (index->metric() != metric_) throw InputError("segments: the added segment has another metric");
  if (index->storage() != storage_) throw InputError("segments: the added segment has another storage");
  check_encoders(index->image_encoder(), index->text_encoder());
  add_sealed(std::move(index), dead);
}

void SegmentBuilder::seal_tail() {
  std::shared_ptr<const SpecIndex> index = std::move(tail_index_);
  tail_index_.reset();
  Sealed s;
  s.id = next_id_++;
  const auto& ids = index->model_ids();
  for (std::size_t row = 0; row < ids.size(); ++row)
    locations_[ids[row]] = Location{s.id, static_cast<std::uint32_t>(row)};
  s.index = std::move(index);
  sealed_.push_back(std::move(s));
}

Segment SegmentBuilder::as_segment(const Sealed& s) {
  Segment out;
  out.index = s.index;
  out.dead = s.dead;
  out.dead_count = s.dead_count;
  out.id = s.id;
  return out;
}

SegmentedIndex SegmentBuilder::snapshot() {
  if (!pending_.empty() || !tail_drop_.empty()) {
    std::vector<Spec> specs;
    specs.reserve(pending_.size());
    for (auto& [id, spec] : pending_) specs.push_back(std::move(spec));
    pending_.clear();
    const SpecIndex fresh(std::move(specs), metric_, space_, storage_);
    std::vector<bool> dropped;
    std::vector<SpecIndex::Part> parts;
    if (tail_index_) {
      const auto& ids = tail_index_->model_ids();
      dropped.resize(ids.size());
      for (std::size_t row = 0; row < ids.size(); ++row) dropped[row] = tail_drop_.count(ids[row]) > 0;
      parts.push_back({tail_index_.get(), &dropped});
    }
    parts.push_back({&fresh, nullptr});
    SpecIndex tail = SpecIndex::merge(parts);
    tail_index_ = tail.size() ? std::make_shared<const SpecIndex>(std::move(tail)) : nullptr;
    tail_drop_.clear();
  }
  if (tail_index_ && tail_index_->size() >= policy_.tail_max) seal_tail();
  std::vector<Segment> segments;
  segments.reserve(sealed_.size() + 1);
  for (const Sealed& s : sealed_) segments.push_back(as_segment(s));
  if (tail_index_) {
    Segment t;
    t.index = tail_index_;
    t.tail = true;
    segments.push_back(std::move(t));
  }
  return SegmentedIndex(std::move(segments), metric_);
}

std::optional<SegmentBuilder::Compaction> SegmentBuilder::plan() const {
  // A segment mostly dead: rewrite it (the worst first).
  const Sealed* worst = nullptr;
  for (const Sealed& s : sealed_) {
    const double fraction = s.index->size() ? static_cast<double>(s.dead_count) / static_cast<double>(s.index->size()) : 0;
    if (s.dead_count > 0 && fraction > policy_.dead_fraction &&
        (!worst || s.dead_count * worst->index->size() > worst->dead_count * s.index->size()))
      worst = &s;
  }
  if (worst) {
    Compaction c;
    c.inputs.push_back(as_segment(*worst));
    c.live = worst->index->size() - worst->dead_count;
    return c;
  }
  // Size bands: band b holds live counts in [tail_max * f^b, tail_max * f^(b+1)).
  const auto band = [&](std::size_t live) {
    int b = 0;
    double edge = static_cast<double>(policy_.tail_max) * policy_.merge_factor;
    while (static_cast<double>(live) >= edge) {
      edge *= policy_.merge_factor;
      ++b;
    }
    return b;
  };
  std::map<int, std::vector<const Sealed*>> bands;
  for (const Sealed& s : sealed_) bands[band(s.index->size() - s.dead_count)].push_back(&s);
  for (auto& [b, members] : bands) {
    if (members.size() < static_cast<std::size_t>(policy_.merge_factor)) continue;
    std::sort(members.begin(), members.end(), [](const Sealed* x, const Sealed* y) {
      return x->index->size() - x->dead_count < y->index->size() - y->dead_count;
    });
    Compaction c;
    for (const Sealed* s : members) {
      const std::size_t live = s->index->size() - s->dead_count;
      if (c.inputs.size() == static_cast<std::size_t>(policy_.merge_factor) || c.live + live > policy_.segment_max) break;
      c.inputs.push_back(as_segment(*s));
      c.live += live;
    }
    if (c.inputs.size() >= 2) return c;
  }
  return std::nullopt;
}

SpecIndex SegmentBuilder::run(const Compaction& compaction) {
  std::vector<SpecIndex::Part> parts;
  parts.reserve(compaction.inputs.size());
  for (const Segment& s : compaction.inputs) parts.push_back({s.index.get(), s.dead.get()});
  return SpecIndex::merge(parts);
}

bool SegmentBuilder::install(const Compaction& compaction, std::shared_ptr<const SpecIndex> merged) {
  if (!merged) throw InputError("segments: no compacted index to install");
  std::vector<std::uint64_t> inputs;
  for (const Segment& s : compaction.inputs) {
    if (!find(s.id)) return false;
    inputs.push_back(s.id);
  }
  Sealed out;
  out.id = next_id_++;
  const auto& ids = merged->model_ids();
  for (std::size_t row = 0; row < ids.size(); ++row) {
    const auto it = locations_.find(ids[row]);
    const bool live = it != locations_.end() &&
                      std::find(inputs.begin(), inputs.end(), it->second.segment) != inputs.end();
    if (live) {
      it->second = Location{out.id, static_cast<std::uint32_t>(row)};
    } else {
      // Replaced or removed while the compaction ran.
      if (!out.dead) out.dead = std::make_shared<std::vector<bool>>(ids.size(), false);
      (*out.dead)[row] = true;
      ++out.dead_count;
    }
  }
  out.index = std::move(merged);
  const auto is_input = [&](const Sealed& s) { return std::find(inputs.begin(), inputs.end(), s.id) != inputs.end(); };
  if (out.index->size() == 0) {  // every model was dead: the inputs just go
    sealed_.erase(std::remove_if(sealed_.begin(), sealed_.end(), is_input), sealed_.end());
    return true;
  }
  const auto first = std::find_if(sealed_.begin(), sealed_.end(), [&](const Sealed& s) { return s.id == inputs.front(); });
  const auto at = first - sealed_.begin();
  sealed_.insert(sealed_.begin() + at, std::move(out));
  sealed_.erase(std::remove_if(sealed_.begin(), sealed_.end(), is_input), sealed_.end());
  return true;
}

}  // namespace gmi
