#pragma once
// One factory per stage folder; make_stage() picks by name.
#include <memory>

#include "gmi/config.hpp"
#include "gmi/metric.hpp"
#include "gmi/workers/stage.hpp"

namespace gmi::workers {

std::unique_ptr<Stage> make_decode_stage(const Config& config);
std::unique_ptr<Stage> make_embed_stage(const Config& config);
std::unique_ptr<Stage> make_interrogate_stage(const Config& config);
std::unique_ptr<Stage> make_score_stage(const Config& config);
std::unique_ptr<Stage> make_spec_stage(const Config& config);
std::unique_ptr<Stage> make_learn_stage(const Config& config);

/// The metric.* learning options (dims, shrinkage, gamma_scale, min_models), validated.
MetricOptions metric_options(const Config& config);

}  // namespace gmi::workers
