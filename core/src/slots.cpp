// Named payload slots: their header entries, checks, and frames (see slots.hpp).
#include "gmi/slots.hpp"

#include <algorithm>
#include <set>

namespace gmi::wire {

using nlohmann::json;

namespace {

[[noreturn]] void bad_slot(const std::string& name, const std::string& what) {
  throw SlotError("slot \"" + name + "\": " + what);
}

std::size_t count_of(const json& v) {
  return v.is_number_unsigned() || (v.is_number_integer() && v.get<long long>() >= 0)
             ? v.get<std::size_t>()
             : 0;
}

// The kind's fields of one entry, checked against its frames.
void check_kind(const Slot& s) {
  switch (s.kind) {
    case SlotKind::kImageBytes:
    case SlotKind::kText:
      return;
    case SlotKind::kPixels: {
      const auto it = s.info.find("images");
      if (it == s.info.end() || !it->is_array())
        bad_slot(s.name, "a pixels slot needs \"images\" (an array)");
      if (it->size() != s.frames.size()) {
        bad_slot(s.name, "\"images\" lists " + std::to_string(it->size()) + " images but " +
                             std::to_string(s.frames.size()) + " frames came");
      }
      for (std::size_t i = 0; i < s.frames.size(); ++i) {
        const json& im = (*it)[i];
        const bool ok = im.is_object() && im.contains("width") && im.contains("height") &&
                        im["width"].is_number_integer() && im["height"].is_number_integer() &&
                        im["width"].get<long long>() > 0 && im["height"].get<long long>() > 0 &&
                        im["width"].get<long long>() <= 1 << 20 &&
                        im["height"].get<long long>() <= 1 << 20;
        if (!ok)
          bad_slot(s.name,
                   "images[" + std::to_string(i) + "] needs positive integer width and height");
        const std::size_t want = static_cast<std::size_t>(im["width"].get<long long>()) *
                                 static_cast<std::size_t>(im["height"].get<long long>()) * 3;
        if (want != s.frames[i].size()) {
          bad_slot(s.name, "frame " + std::to_string(i) + " does not hold " + im["width"].dump() +
                               "x" + im["height"].dump() + " RGB pixels");
        }
      }
      return;
    }
    case SlotKind::kRows: {
      for (const char* f : {"rows", "cols"}) {
        const auto it = s.info.find(f);
        if (it == s.info.end() || !it->is_number_integer() || it->get<long long>() < 0 ||
            it->get<long long>() > (1ll << 31)) {
          bad_slot(s.name, std::string("a rows slot needs \"") + f + "\" (a non-negative integer)");
        }
      }
      if (s.frames.size() != 1) {
        bad_slot(s.name, "a rows slot carries 1 frame, got " + std::to_string(s.frames.size()));
      }
      const std::size_t rows = s.info["rows"].get<std::size_t>(),
                        cols = s.info["cols"].get<std::size_t>();
      if (rows * cols * sizeof(float) != s.frames[0].size()) {
        bad_slot(s.name, "a float32 frame of " + std::to_string(s.frames[0].size()) +
                             " bytes cannot hold " + std::to_string(rows) + " x " +
                             std::to_string(cols) + " values");
      }
      if (s.info.contains("encoder") && !s.info["encoder"].is_object()) {
        bad_slot(s.name, "\"encoder\" must be an object {name, version, dim}");
      }
      return;
    }
  }
}

}  // namespace

std::string_view to_string(SlotKind kind) {
  switch (kind) {
    case SlotKind::kImageBytes:
      return "image_bytes";
    case SlotKind::kPixels:
      return "pixels";
    case SlotKind::kRows:
      return "rows";
    case SlotKind::kText:
      return "text";
  }
  return "?";
}

std::optional<SlotKind> parse_slot_kind(std::string_view text) {
  for (SlotKind k : {SlotKind::kImageBytes, SlotKind::kPixels, SlotKind::kRows, SlotKind::kText}) {
    if (to_string(k) == text) return k;
  }
  return std::nullopt;
}

Slot* Slots::find(const std::string& name) {
  for (auto& s : slots_) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

const Slot* Slots::find(const std::string& name) const {
  for (const auto& s : slots_) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

const Slot& Slots::get(const std::string& name, SlotKind kind) const {
  const Slot* s = find(name);
  if (s == nullptr) {
    std::string have;
    for (const auto& o : slots_) have += (have.empty() ? "" : ", ") + o.name;
    throw SlotError("slot \"" + name +
                    "\" is missing (the task carries: " + (have.empty() ? "none" : have) + ")");
  }
  if (s->kind != kind) {
    bad_slot(name, "expected kind " + std::string(to_string(kind)) + ", got " +
                       std::string(to_string(s->kind)));
  }
  return *s;
}

void Slots::put(Slot s) {
  for (auto& o : slots_) {
    if (o.name == s.name) {
      o = std::move(s);
      return;
    }
  }
  slots_.push_back(std::move(s));
}

void Slots::erase(const std::string& name) {
  slots_.erase(
      std::remove_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.name == name; }),
      slots_.end());
}

void Slots::merge(Slots other) {
  for (auto& s : other.slots_) put(std::move(s));
}

std::size_t Slots::frame_count() const {
  std::size_t n = 0;
  for (const auto& s : slots_) n += s.frames.size();
  return n;
}

std::size_t Slots::byte_count() const {
  std::size_t n = 0;
  for (const auto& s : slots_) {
    for (const auto& f : s.frames) n += f.size();
  }
  return n;
}

json Slots::describe() const {
  json list = json::array();
  for (const auto& s : slots_) {
    json e = s.info.is_object() ? s.info : json::object();
    e["name"] = s.name;
    e["kind"] = to_string(s.kind);
    e["frames"] = s.frames.size();
    list.push_back(std::move(e));
  }
  return list;
}

json Slots::describe_views(const std::vector<std::string>* names, std::vector<std::string_view>& out) const {
  json list = json::array();
  for (const auto& s : slots_) {
    if (names != nullptr && std::find(names->begin(), names->end(), s.name) == names->end()) continue;
    json e = s.info.is_object() ? s.info : json::object();
    e["name"] = s.name;
    e["kind"] = to_string(s.kind);
    e["frames"] = s.frames.size();
    list.push_back(std::move(e));
    for (const auto& f : s.frames) out.emplace_back(f);
  }
  return list;
}

Slots Slots::only(const std::vector<std::string>* names) const {
  if (names == nullptr) return *this;
  Slots out;
  for (const auto& s : slots_) {
    if (std::find(names->begin(), names->end(), s.name) != names->end()) out.slots_.push_back(s);
  }
  return out;
}

void Slots::append_frames(std::vector<std::string>& out) const {
  for (const auto& s : slots_) out.insert(out.end(), s.frames.begin(), s.frames.end());
}

void Slots::move_frames(std::vector<std::string>& out) {
  for (auto& s : slots_) {
    for (auto& f : s.frames) out.push_back(std::move(f));
    s.frames.clear();
  }
}

std::size_t Slots::frames_in(const json& list) {
  std::size_t n = 0;
  if (!list.is_array()) return 0;
  for (const auto& e : list) {
    if (e.is_object() && e.contains("frames")) n += count_of(e["frames"]);
  }
  return n;
}

Slots Slots::read(const json& list, std::vector<std::string>& frames, std::size_t first) {
  Slots out;
  if (!list.is_array()) throw SlotError("\"slots\" must be an array");
  std::set<std::string> names;
  std::size_t next = first;
  for (std::size_t i = 0; i < list.size(); ++i) {
    const json& e = list[i];
    const std::string label = "slots[" + std::to_string(i) + "]";
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string() ||
        e["name"].get_ref<const std::string&>().empty()) {
      throw SlotError(label + " needs a non-empty \"name\"");
    }
    Slot s;
    s.name = e["name"].get<std::string>();
    if (!names.insert(s.name).second) bad_slot(s.name, "named twice");
    const auto kind = e.contains("kind") && e["kind"].is_string()
                          ? parse_slot_kind(e["kind"].get_ref<const std::string&>())
                          : std::nullopt;
    if (!kind) {
      bad_slot(s.name, "unknown kind " +
                           (e.contains("kind") ? e["kind"].dump() : std::string("(none)")) +
                           " (expected image_bytes, pixels, rows or text)");
    }
    s.kind = *kind;
    const std::size_t n = e.contains("frames") ? count_of(e["frames"]) : 0;
    if (next + n > frames.size())
      bad_slot(s.name, "announces " + std::to_string(n) + " frames that did not come");
    for (std::size_t k = 0; k < n; ++k) s.frames.push_back(std::move(frames[next + k]));
    next += n;
    s.info = e;
    s.info.erase("name");
    s.info.erase("kind");
    s.info.erase("frames");
    check_kind(s);
    out.slots_.push_back(std::move(s));
  }
  return out;
}

int task_cost(const Slots& slots, const std::string& credit_slot) {
  if (credit_slot.empty()) return 1;
  const Slot* s = slots.find(credit_slot);
  if (s == nullptr) return 1;
  return static_cast<int>(std::clamp<std::size_t>(s->frames.size(), 1, 1 << 20));
}

int credit_charge(int cost, int credit, bool idle) {
  if (credit <= 0) return 0;
  if (cost <= credit) return cost;
  return idle ? credit : 0;
}

}  // namespace gmi::wire
