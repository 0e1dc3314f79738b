#include "stages.hpp"

#include "gmi/error.hpp"
#include "gmi/wire.hpp"

namespace gmi::workers {

const std::vector<std::string>& stage_names() { return wire::stage_names(); }

std::unique_ptr<Stage> make_stage(const std::string& name, const Config& config) {
  if (name == "decode") return make_decode_stage(config);
  if (name == "embed") return make_embed_stage(config);
  if (name == "interrogate") return make_interrogate_stage(config);
  if (name == "score") return make_score_stage(config);
  if (name == "spec") return make_spec_stage(config);
  if (name == "learn") return make_learn_stage(config);
  throw InputError("unknown stage \"" + name + "\" (expected one of " + wire::stage_list() + ")");
}

}  // namespace gmi::workers
