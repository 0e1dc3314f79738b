#include "stages.hpp"

#include "gmi/error.hpp"

namespace gmi::workers {

const std::vector<std::string>& stage_names() {
  static const std::vector<std::string> names{"decode", "embed", "interrogate", "score", "spec"};
  return names;
}

std::unique_ptr<Stage> make_stage(const std::string& name, const Config& config) {
  if (name == "decode") return make_decode_stage(config);
  if (name == "embed") return make_embed_stage(config);
  if (name == "interrogate") return make_interrogate_stage(config);
  if (name == "score") return make_score_stage(config);
  if (name == "spec") return make_spec_stage(config);
  throw InputError("unknown stage \"" + name + "\" (expected decode, embed, interrogate, score or spec)");
}

}  // namespace gmi::workers
