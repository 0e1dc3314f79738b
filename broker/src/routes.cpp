#include "gmi/routes.hpp"

#include <algorithm>
#include <set>

#include "gmi/error.hpp"
#include "gmi/interrogator.hpp"

namespace gmi {

Route split_route(const std::string& text) {
  Route out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = text.find(',', start);
    std::string part =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const auto b = part.find_first_not_of(" \t");
    const auto e = part.find_last_not_of(" \t");
    out.push_back(b == std::string::npos ? std::string() : part.substr(b, e - b + 1));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

std::string join_route(const Route& route) {
  std::string out;
  for (const auto& s : route) out += (out.empty() ? "" : ",") + s;
  return out;
}

void validate_route(const std::string& key, const std::string& kind, const Route& route,
                    const std::string& interrogator) {
  auto bad = [&](const std::string& why) {
    throw InputError(key + " = \"" + join_route(route) + "\": " + why);
  };
  static const std::vector<std::string> known{"decode", "interrogate", "embed", "score", "spec"};
  std::set<std::string> seen;
  for (const auto& s : route) {
    if (s.empty()) bad("an empty stage name");
    if (std::find(known.begin(), known.end(), s) == known.end()) {
      bad("unknown stage \"" + s + "\" (known: decode, interrogate, embed, score, spec)");
    }
    if (!seen.insert(s).second) bad("stage \"" + s + "\" comes twice");
  }
  if (route.empty() || route.front() != "decode") bad("a route starts with decode");
  auto at = [&](const char* s) {
    return static_cast<long>(std::find(route.begin(), route.end(), s) - route.begin());
  };
  const long n = static_cast<long>(route.size());
  if (at("embed") == n) bad("a route needs embed");
  if (kind == "query") {
    if (route.back() != "score") bad("a query route ends in score");
    if (at("spec") != n) bad("spec is for uploads; a query route has none");
    const bool captioner = interrogator == "captioner";
    if (captioner) {
      if (at("interrogate") == n || at("interrogate") > at("embed")) {
        bad("the captioner interrogator (interrogate.interrogator) captions the decoded images, so "
            "the "
            "query route must run interrogate before embed: decode,interrogate,embed,score");
      }
    } else {
      interrogator_input(interrogator);  // InputError for an unknown interrogator
      if (at("interrogate") != n && at("interrogate") < at("embed")) {
        bad("the " + interrogator +
            " interrogator (interrogate.interrogator) works from the image embedding, "
            "so interrogate must come after embed: decode,embed,interrogate,score");
      }
    }
  } else if (kind == "upload") {
    if (route.back() != "spec") bad("an upload route ends in spec");
    if (at("score") != n) bad("score is for queries; an upload route has none");
    if (at("interrogate") != n) bad("an upload needs no interrogate");
  } else {
    bad("unknown job kind \"" + kind + "\"");
  }
}

}  // namespace gmi
