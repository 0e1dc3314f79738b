// Named payload slots: the entries a header lists, what each kind needs, and the credit a
// task costs.
#include "gmi/slots.hpp"

#include <gtest/gtest.h>

#include "gmi/wire.hpp"

namespace gmi {
namespace {

using nlohmann::json;
using wire::Slot;
using wire::SlotError;
using wire::SlotKind;
using wire::Slots;

std::string read_error(const json& list, std::vector<std::string> frames) {
  try {
    Slots::read(list, frames, 0);
  } catch (const SlotError& e) {
    return e.what();
  }
  return "";
}

TEST(Slots, RoundTripThroughHeaderEntriesAndFrames) {
  Slots s;
  s.put(Slot{"images", SlotKind::kImageBytes, json::object(), {"jpeg-a", "jpeg-b"}});
  s.put(Slot{"pixels",
             SlotKind::kPixels,
             {{"images", {{{"index", 1}, {"width", 1}, {"height", 2}}}}},
             {std::string(6, 'p')}});
  RowMatrix m(1, 2);
  m << 0.5f, -1.0f;
  s.put(
      Slot{"image_embeddings", SlotKind::kRows, {{"rows", 1}, {"cols", 2}}, {wire::pack_rows(m)}});
  s.put(Slot{"captions", SlotKind::kText, json::object(), {"a cat"}});
  const json entries = s.describe();
  ASSERT_EQ(entries.size(), 4u);
  EXPECT_EQ(entries[1]["kind"], "pixels");
  EXPECT_EQ(entries[1]["frames"], 1);
  EXPECT_EQ(Slots::frames_in(entries), 5u);
  std::vector<std::string> frames{"other-task"};
  s.append_frames(frames);
  const Slots back = Slots::read(entries, frames, 1);
  EXPECT_EQ(back.describe(), entries);
  EXPECT_EQ(back.get("images", SlotKind::kImageBytes).frames[1], "jpeg-b");
  EXPECT_EQ(wire::unpack_rows(back.get("image_embeddings", SlotKind::kRows).frames[0], 1, 2), m);
  EXPECT_EQ(back.get("captions", SlotKind::kText).frames[0], "a cat");
}

TEST(Slots, PutReplacesByNameAndOnlyKeepsTheNamed) {
  Slots s;
  s.put(Slot{"captions", SlotKind::kText, json::object(), {"old"}});
  s.put(Slot{"pixels", SlotKind::kPixels, {{"images", json::array()}}, {}});
  Slots later;
  later.put(Slot{"captions", SlotKind::kText, json::object(), {"new"}});
  s.merge(std::move(later));
  EXPECT_EQ(s.all().size(), 2u);
  EXPECT_EQ(s.get("captions", SlotKind::kText).frames[0], "new");
  const std::vector<std::string> names{"pixels"};
  EXPECT_EQ(s.only(&names).all().size(), 1u);
  EXPECT_EQ(s.only(nullptr).all().size(), 2u);
  s.erase("pixels");
  EXPECT_EQ(s.find("pixels"), nullptr);
}

TEST(Slots, MissingOrOtherKindNamesTheSlot) {
  Slots s;
  s.put(Slot{"captions", SlotKind::kText, json::object(), {"x"}});
  try {
    s.get("pixels", SlotKind::kPixels);
    FAIL();
  } catch (const SlotError& e) {
    EXPECT_NE(std::string(e.what()).find("slot \"pixels\" is missing (the task carries: captions)"),
              std::string::npos)
        << e.what();
  }
  try {
    s.get("captions", SlotKind::kRows);
    FAIL();
  } catch (const SlotError& e) {
    EXPECT_NE(std::string(e.what()).find("slot \"captions\": expected kind rows, got text"),
              std::string::npos)
        << e.what();
  }
}

TEST(Slots, BadEntriesFailNamingTheSlot) {
  EXPECT_NE(read_error(json::array({{{"name", "depth"}, {"kind", "voxels"}, {"frames", 1}}}), {"x"})
                .find("slot \"depth\": unknown kind \"voxels\""),
            std::string::npos);
  EXPECT_NE(read_error(json::array({{{"name", "a"}, {"kind", "text"}, {"frames", 0}},
                                    {{"name", "a"}, {"kind", "text"}, {"frames", 0}}}),
                       {})
                .find("slot \"a\": named twice"),
            std::string::npos);
  EXPECT_NE(read_error(json::array({{{"kind", "text"}, {"frames", 0}}}), {}).find("slots[0]"),
            std::string::npos);
  // pixels: one {width, height} per frame, and frames of exactly width x height x 3 bytes.
  EXPECT_NE(
      read_error(json::array({{{"name", "pixels"}, {"kind", "pixels"}, {"frames", 1}}}), {"abc"})
          .find("slot \"pixels\": a pixels slot needs \"images\""),
      std::string::npos);
  EXPECT_NE(read_error(json::array({{{"name", "pixels"},
                                     {"kind", "pixels"},
                                     {"frames", 1},
                                     {"images", {{{"width", 2}, {"height", 2}}}}}}),
                       {"abc"})
                .find("frame 0 does not hold 2x2 RGB pixels"),
            std::string::npos);
  // rows: one frame of rows x cols float32.
  EXPECT_NE(
      read_error(
          json::array({{{"name", "x"}, {"kind", "rows"}, {"frames", 1}, {"rows", 1}, {"cols", 3}}}),
          {std::string(8, '\0')})
          .find("slot \"x\": a float32 frame of 8 bytes cannot hold 1 x 3 values"),
      std::string::npos);
  EXPECT_NE(
      read_error(json::array({{{"name", "x"}, {"kind", "rows"}, {"frames", 1}, {"cols", 3}}}), {""})
          .find("\"rows\""),
      std::string::npos);
  EXPECT_NE(read_error(json::array({{{"name", "x"}, {"kind", "text"}, {"frames", 2}}}), {"one"})
                .find("did not come"),
            std::string::npos);
}

TEST(Slots, TaskCostCountsTheCreditSlotsFrames) {
  Slots s;
  s.put(Slot{
      "pixels", SlotKind::kPixels, {{"images", json::array()}}, std::vector<std::string>(1000)});
  EXPECT_EQ(wire::task_cost(s, "pixels"), 1000);
  EXPECT_EQ(wire::task_cost(s, ""), 1);        // credit counts tasks
  EXPECT_EQ(wire::task_cost(s, "images"), 1);  // no such slot: one unit
  Slots empty_pixels;
  empty_pixels.put(Slot{"pixels", SlotKind::kPixels, {{"images", json::array()}}, {}});
  EXPECT_EQ(wire::task_cost(empty_pixels, "pixels"), 1);
}

TEST(Slots, ATaskLargerThanTheWholeCreditGoesAloneToAnIdleWorker) {
  EXPECT_EQ(wire::credit_charge(3, 64, false), 3);     // fits
  EXPECT_EQ(wire::credit_charge(64, 64, false), 64);   // exactly
  EXPECT_EQ(wire::credit_charge(65, 64, false), 0);    // the worker holds other work: wait
  EXPECT_EQ(wire::credit_charge(1000, 64, true), 64);  // idle: it goes, charged all the credit
  EXPECT_EQ(wire::credit_charge(1, 0, true), 0);       // no credit, nothing goes
}

}  // namespace
}  // namespace gmi
