// Routes as data: parsing and the start-up checks of routes.query / routes.upload.
#include "gmi/routes.hpp"

#include <gtest/gtest.h>

#include "gmi/error.hpp"

namespace gmi {
namespace {

std::string route_error(const std::string& key, const std::string& kind, const std::string& route,
                        const std::string& interrogator = "neighbour") {
  try {
    validate_route(key, kind, split_route(route), interrogator);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Routes, SplitAndJoinRoundTrip) {
  EXPECT_EQ(split_route("decode, embed ,spec"), (Route{"decode", "embed", "spec"}));
  EXPECT_EQ(join_route(split_route("decode,embed,interrogate,score")),
            "decode,embed,interrogate,score");
  EXPECT_EQ(split_route(""), (Route{""}));
}

TEST(Routes, TheDefaultsAndTheCaptionerRouteAreValid) {
  EXPECT_EQ(route_error("routes.query", "query", "decode,embed,interrogate,score"), "");
  EXPECT_EQ(route_error("routes.query", "query", "decode,embed,interrogate,score", "ridge"), "");
  EXPECT_EQ(route_error("routes.query", "query", "decode,embed,interrogate,score", "prompt-bank"),
            "");
  EXPECT_EQ(route_error("routes.upload", "upload", "decode,embed,spec"), "");
  EXPECT_EQ(route_error("routes.query", "query", "decode,interrogate,embed,score", "captioner"),
            "");
  // A query route without interrogate scores without pseudo-prompts (scorers that need none).
  EXPECT_EQ(route_error("routes.query", "query", "decode,embed,score"), "");
}

TEST(Routes, ErrorsNameTheKeyAndTheRule) {
  std::string e = route_error("routes.query", "query", "decode,embed,rerank,score");
  EXPECT_NE(e.find("routes.query = \"decode,embed,rerank,score\""), std::string::npos) << e;
  EXPECT_NE(e.find("unknown stage \"rerank\""), std::string::npos) << e;
  EXPECT_NE(route_error("routes.query", "query", "embed,decode,interrogate,score")
                .find("starts with decode"),
            std::string::npos);
  EXPECT_NE(route_error("routes.query", "query", "decode,embed,interrogate").find("ends in score"),
            std::string::npos);
  EXPECT_NE(route_error("routes.upload", "upload", "decode,embed").find("routes.upload"),
            std::string::npos);
  EXPECT_NE(route_error("routes.upload", "upload", "decode,embed").find("ends in spec"),
            std::string::npos);
  EXPECT_NE(route_error("routes.upload", "upload", "decode,embed,score,spec")
                .find("score is for queries"),
            std::string::npos);
  EXPECT_NE(
      route_error("routes.query", "query", "decode,embed,spec,score").find("spec is for uploads"),
      std::string::npos);
  EXPECT_NE(route_error("routes.query", "query", "decode,embed,embed,score").find("comes twice"),
            std::string::npos);
  EXPECT_NE(route_error("routes.query", "query", "decode,interrogate,score").find("needs embed"),
            std::string::npos);
  EXPECT_NE(route_error("routes.query", "query", "decode,,embed,score").find("empty stage"),
            std::string::npos);
}

TEST(Routes, InterrogateSitsWhereItsInterrogatorNeedsIt) {
  // The captioner reads pixels: before embed, and it must be on the route.
  std::string e =
      route_error("routes.query", "query", "decode,embed,interrogate,score", "captioner");
  EXPECT_NE(e.find("decode,interrogate,embed,score"), std::string::npos) << e;
  EXPECT_NE(
      route_error("routes.query", "query", "decode,embed,score", "captioner").find("captioner"),
      std::string::npos);
  // The embedding-based ones read the image embedding: after embed.
  for (const char* name : {"neighbour", "ridge", "prompt-bank"}) {
    e = route_error("routes.query", "query", "decode,interrogate,embed,score", name);
    EXPECT_NE(e.find("after embed"), std::string::npos) << name << ": " << e;
  }
  EXPECT_NE(route_error("routes.query", "query", "decode,embed,interrogate,score", "oracle")
                .find("unknown interrogator"),
            std::string::npos);
}

}  // namespace
}  // namespace gmi
