// gmi: build model specs and identify the model behind one image, on one machine.
//
//   gmi spec build   --model ID --manifest DIR/manifest.jsonl --store dir:SPECDIR
//   gmi spec inspect --store dir:SPECDIR [MODEL...]
//   gmi spec remove  --store dir:SPECDIR MODEL
//   gmi identify     --store dir:SPECDIR --top K [--scorer ...] [--json] IMAGE
//   gmi identify     --store dir:SPECDIR --top K --batch QUERIES.jsonl
//   gmi hub learn-metric --store dir:SPECDIR       (the hub-learned metric; identify uses it)
//
// Exit codes: 0 success, 1 environment failure (I/O, Redis), 2 bad input or usage.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "gmi/broker_client.hpp"
#include "gmi/encoder.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/image.hpp"
#include "gmi/manifest.hpp"
#include "gmi/parallel.hpp"
#include "gmi/pipeline.hpp"
#include "gmi/spec_store.hpp"
#include "progress.hpp"
#include "service.hpp"
#include "text_commands.hpp"

namespace {

using gmi::cli::ProgressBar;
using nlohmann::json;

constexpr const char* kVersion = "0.1.0";

struct CommonOptions {
  std::string store = "dir:specs";
  int threads = 0;
  std::string image_encoder = "auto";
  std::string text_encoder = "auto";
  gmi::EncoderRuntime runtime;
  std::string encoder_dir;
  bool load_encoder = false;
  gmi::EncoderRuntime encoders() const {
    gmi::EncoderRuntime rt = runtime;
    rt.encoder_dir = encoder_dir;
    return rt;
  }
};

/// One decoded-and-embedded batch: a row per usable input, an error per unusable one.
struct EmbeddedBatch {
  gmi::RowMatrix x;
  std::vector<int> row_of;          // input index -> row in x, or -1
  std::vector<std::string> errors;  // input index -> error ("" when fine)
};

EmbeddedBatch decode_and_embed(const std::vector<std::filesystem::path>& paths,
                               const gmi::ImageEncoder& encoder, int threads,
                               const gmi::DecodeOptions& base, const std::string& label) {
  const size_t n = paths.size();
  EmbeddedBatch out;
  out.errors.assign(n, "");
  out.row_of.assign(n, -1);
  gmi::RowMatrix all(static_cast<Eigen::Index>(n), encoder.identity().dim);
  std::vector<char> ok(n, 0);
  gmi::DecodeOptions opt = base;
  opt.target_min_side = encoder.input_min_side();
  ProgressBar bar(label, n);
  gmi::parallel_for(n, threads, [&](size_t i) {
    try {
      gmi::Image img = gmi::read_image_file(paths[i], opt);
      all.row(static_cast<Eigen::Index>(i)) = encoder.encode({img}).row(0);
      ok[i] = 1;
    } catch (const std::exception& e) {
      out.errors[i] = e.what();
    }
    bar.tick();
  });
  bar.finish();
  int rows = 0;
  for (size_t i = 0; i < n; ++i) rows += ok[i];
  out.x.resize(rows, all.cols());
  int r = 0;
  for (size_t i = 0; i < n; ++i)
    if (ok[i]) {
      out.row_of[i] = r;
      out.x.row(r++) = all.row(static_cast<Eigen::Index>(i));
    }
  return out;
}

void add_common(CLI::App* cmd, CommonOptions& c) {
  cmd->add_option("--store", c.store, "spec store: dir:PATH, redis://[USER@]HOST[:PORT][/DB][?prefix=P] or redis-cluster://[USER@]HOST:PORT[,HOST:PORT...][?prefix=P&partitions=K]")
      ->envname("GMI_STORE")
      ->capture_default_str();
  cmd->add_option("--threads", c.threads, "worker threads for decoding and embedding (0: all cores)")
      ->envname("GMI_THREADS");
}

void add_encoder_options(CLI::App* cmd, CommonOptions& c) {
  cmd->add_option("--encoder", c.image_encoder,
                  "image encoder: auto (the best installed), builtin, an installed name, or a card path")
      ->envname("GMI_ENCODER_IMAGE")
      ->capture_default_str();
  cmd->add_option("--text-encoder", c.text_encoder, "prompt encoder: auto, builtin, a name or a card path")
      ->envname("GMI_ENCODER_TEXT")
      ->capture_default_str();
  cmd->add_option("--encoder-dir", c.encoder_dir,
                  "folder of installed encoders (default: $GMI_ENCODER_DIR or ~/.local/share/gmi/encoders)")
      ->envname("GMI_ENCODER_DIR");
  cmd->add_option("--device", c.runtime.device, "where TorchScript encoders run: cpu, cuda, cuda:N")
      ->envname("GMI_EMBED_DEVICE")
      ->capture_default_str();
}

// ------------------------------------------------------------------ spec build

struct BuildArgs {
  std::string model, manifest, info_file, card, optimizer = "lbfgs";
  double downloads = -1;
  gmi::SpecBuildOptions fit;  // the defaults every spec-building path shares
  bool json_out = false, unconstrained = false;
};

int run_spec_build(const CommonOptions& c, const BuildArgs& a) {
  gmi::validate_model_id(a.model);
  gmi::Manifest man = gmi::read_manifest(a.manifest, /*require_prompt=*/true);
  for (const auto& issue : man.issues)
    std::fprintf(stderr, "gmi: %s:%d: %s (line skipped)\n", a.manifest.c_str(), issue.line,
                 issue.message.c_str());
  auto image_encoder = gmi::make_image_encoder(c.image_encoder, c.encoders());
  auto text_encoder = gmi::make_text_encoder(c.text_encoder, c.encoders());

  std::vector<std::filesystem::path> paths;
  for (const auto& e : man.entries) paths.push_back(e.image);
  EmbeddedBatch batch = decode_and_embed(paths, *image_encoder, c.threads, {}, "embedding");
  std::vector<std::string> prompts;
  int skipped = static_cast<int>(man.issues.size());
  for (size_t i = 0; i < man.entries.size(); ++i) {
    if (batch.row_of[i] < 0) {
      std::fprintf(stderr, "gmi: %s:%d: %s (sample skipped)\n", a.manifest.c_str(), man.entries[i].line,
                   batch.errors[i].c_str());
      ++skipped;
      continue;
    }
    prompts.push_back(man.entries[i].prompt);
  }
  gmi::RowMatrix t = text_encoder->encode(prompts);

  gmi::SpecBuildOptions opt = a.fit;
  opt.rkme.constrained = !a.unconstrained;
  opt.rkme.optimizer =
      a.optimizer == "gradient" ? gmi::RkmeOptimizer::kGradient : gmi::RkmeOptimizer::kLbfgs;
  if (!a.info_file.empty()) {
    std::ifstream in(a.info_file);
    if (!in) throw gmi::IoError("cannot open model info " + a.info_file);
    json info = json::parse(in, nullptr, false);
    if (!info.is_object()) throw gmi::InputError(a.info_file + ": not a JSON object");
    opt.downloads = info.value("downloads", 0.0);
    opt.card = info.value("card", std::string());
  }
  if (a.downloads >= 0) opt.downloads = a.downloads;
  if (!a.card.empty()) opt.card = a.card;

  ProgressBar bar("fitting", static_cast<size_t>(opt.rkme.max_iterations));
  gmi::Spec spec = gmi::build_spec_from_embeddings(a.model, batch.x, t, image_encoder->identity(),
                                                   text_encoder->identity(), opt,
                                                   [&](int, double) { bar.tick(); });
  bar.finish();
  spec.extra["skipped_samples"] = skipped;
  auto store = gmi::open_spec_store(c.store);
  store->put(spec);
  json meta = gmi::spec_metadata(spec);
  if (a.json_out) {
    std::cout << json{{"model", spec.model_id}, {"store", store->describe()}, {"spec", meta}}.dump() << "\n";
  } else {
    std::printf("built spec for '%s': n=%d r=%d gamma=%.4g lambda=%.4g residual MMD^2=%.3g (skipped %d)\n",
                spec.model_id.c_str(), spec.n, spec.r(), spec.gamma, spec.lambda, spec.residual_mmd2, skipped);
    std::printf("stored in %s\n", store->describe().c_str());
  }
  return 0;
}

// ------------------------------------------------------------------ spec inspect / remove

int run_spec_inspect(const CommonOptions& c, const std::vector<std::string>& models, bool json_out) {
  auto store = gmi::open_spec_store(c.store);
  std::vector<std::string> ids = models.empty() ? store->list() : models;
  json all = json::array();
  int missing = 0;
  if (!json_out)
    std::printf("%-28s %6s %4s %5s %5s %10s %12s  %s\n", "model", "n", "r", "d", "dt", "gamma", "residual",
                "encoder");
  for (const auto& id : ids) {
    auto spec = store->get(id);
    if (!spec) {
      std::fprintf(stderr, "gmi: no spec for model '%s' in %s\n", id.c_str(), store->describe().c_str());
      ++missing;
      continue;
    }
    if (json_out) {
      all.push_back(gmi::spec_metadata(*spec));
    } else {
      std::printf("%-28s %6d %4d %5d %5d %10.4g %12.4g  %s + %s\n", spec->model_id.c_str(), spec->n,
                  spec->r(), spec->image_encoder.dim, spec->text_encoder.dim, spec->gamma,
                  spec->residual_mmd2, spec->image_encoder.str().c_str(), spec->text_encoder.str().c_str());
    }
  }
  if (json_out) std::cout << json{{"specs", all}}.dump(2) << "\n";
  return missing ? 2 : 0;
}

// ------------------------------------------------------------------ identify

struct IdentifyArgs {
  std::string image, batch, scorer = "weighted", interrogator = "neighbour", prompt;
  std::string prompt_bank, captioner;
  int bank_top_k = 8;
  double bank_tau = 0.01;
  int top = 4;
  double tau = 0;
  bool json_out = false;
  std::string metric = "auto";
  gmi::MetricOptions metric_options;
  std::string search = "auto";
  std::size_t two_stage_from = gmi::IdentifyOptions{}.two_stage_from;
  gmi::SpecIndex::TwoStage two_stage{256, 0, 32, 4, 1024, 128, 32, 8192};  // as config/gmi.yaml's score.*
};

void add_metric_options(CLI::App* cmd, gmi::MetricOptions& o) {
  cmd->add_option("--metric-dims", o.dims, "metric: mapped dimension k (0: all d, plain whitening)")
      ->envname("GMI_METRIC_DIMS")->capture_default_str();
  cmd->add_option("--metric-shrinkage", o.shrinkage, "metric: shrinkage of the within-model scatter")
      ->envname("GMI_METRIC_SHRINKAGE")->capture_default_str();
  cmd->add_option("--metric-gamma-scale", o.gamma_scale, "metric: gamma = scale / median squared distance")
      ->envname("GMI_METRIC_GAMMA_SCALE")->capture_default_str();
}

// The captioner's caption of each usable query (row order of `b`), decoded at its own size.
std::vector<std::string> caption_queries(const CommonOptions& c, const IdentifyArgs& a,
                                         const std::vector<std::filesystem::path>& paths, const EmbeddedBatch& b) {
  if (a.captioner.empty()) throw gmi::InputError("--interrogator captioner needs --captioner CARD");
  auto captioner = gmi::make_captioner(a.captioner, c.encoders());
  gmi::DecodeOptions opt;
  opt.target_min_side = captioner->input_min_side();
  std::vector<gmi::Image> images;
  for (size_t i = 0; i < paths.size(); ++i) {
    if (b.row_of[i] >= 0) images.push_back(gmi::read_image_file(paths[i], opt));
  }
  return captioner->caption(images);
}

json results_json(const std::vector<gmi::RankedModel>& ranked) {
  json arr = json::array();
  for (size_t i = 0; i < ranked.size(); ++i)
    arr.push_back({{"rank", i + 1}, {"model", ranked[i].model}, {"score", ranked[i].score}});
  return arr;
}

std::unique_ptr<gmi::Identifier> load_identifier(const CommonOptions& c, const IdentifyArgs& a,
                                                 const gmi::EncoderIdentity& image_encoder) {
  auto store = gmi::open_spec_store(c.store);
  std::vector<gmi::Spec> specs;
  auto ids = store->list();
  ProgressBar bar("loading specs", ids.size());
  for (const auto& id : ids) {
    auto s = store->get(id);
    if (s) specs.push_back(std::move(*s));
    bar.tick();
  }
  bar.finish();
  if (specs.empty()) throw gmi::InputError("no specs in " + store->describe() + " (run `gmi spec build` first)");
  const gmi::MetricMode mode = gmi::parse_metric_mode(a.metric);
  std::optional<gmi::Metric> stored;
  if (mode == gmi::MetricMode::kAuto || mode == gmi::MetricMode::kStored) stored = store->get_metric();
  const bool had_stored = stored.has_value();
  auto metric = gmi::choose_metric(mode, std::move(stored), specs, a.metric_options);
  if (!metric)
    std::fprintf(stderr, "gmi: metric: none (the encoder's raw space)\n");
  else
    std::fprintf(stderr, "gmi: metric: %s%s, %d -> %d dims, learnt from %d models\n", metric->label().c_str(),
                 had_stored && mode != gmi::MetricMode::kLearn ? " (stored)" : " (learnt on the fly)",
                 metric->dim_in(), metric->dim_out(), metric->models);
  gmi::IdentifyOptions opt;
  opt.score.scorer = gmi::parse_scorer(a.scorer);
  opt.score.top_k = a.top;
  if (a.tau > 0) opt.score.tau = a.tau;
  opt.interrogator = a.interrogator;
  opt.search = gmi::parse_search(a.search);
  opt.two_stage_from = a.two_stage_from;
  opt.two_stage = a.two_stage;
  gmi::interrogator_input(a.interrogator);  // InputError naming the known ones
  std::shared_ptr<const gmi::TextEncoder> te = gmi::make_text_encoder(c.text_encoder, c.encoders());
  if (a.interrogator == "prompt-bank") {
    if (a.prompt_bank.empty()) throw gmi::InputError("--interrogator prompt-bank needs --prompt-bank FILE");
    if (te->identity().dim != image_encoder.dim) {
      throw gmi::InputError("--interrogator prompt-bank needs image and text encoders that share one space; the text "
                            "encoder " + te->identity().str() + " and the image encoder " + image_encoder.str() +
                            " have different dims");
    }
    opt.interrogator_instance =
        gmi::make_prompt_bank_interrogator(te->encode(gmi::read_prompt_bank(a.prompt_bank)), a.bank_top_k, a.bank_tau);
  }
  auto identifier = std::make_unique<gmi::Identifier>(std::move(specs), image_encoder, te->identity(), te, opt, metric);
  identifier->prepare_search();  // two-stage (a large hub, or --search two-stage): its summary now
  return identifier;
}

int run_identify(const CommonOptions& c, const IdentifyArgs& a) {
  if (a.image.empty() == a.batch.empty())
    throw gmi::InputError("give exactly one of IMAGE or --batch QUERIES.jsonl");
  auto encoder = gmi::make_image_encoder(c.image_encoder, c.encoders());
  auto identifier = load_identifier(c, a, encoder->identity());

  if (!a.image.empty()) {
    EmbeddedBatch b = decode_and_embed({a.image}, *encoder, 1, {}, "embedding");
    if (b.row_of[0] < 0) throw gmi::DecodeError(gmi::DecodeFailure::kCorrupt, b.errors[0]);
    std::string prompt = a.prompt;
    if (prompt.empty() && a.interrogator == "captioner") prompt = caption_queries(c, a, {a.image}, b).at(0);
    auto id = identifier->identify(b.x, {prompt});
    const auto& ranked = id[0].results;
    if (a.json_out) {
      std::cout << json{{"results", results_json(ranked)},
                        {"scorer", a.scorer},
                        {"metric", gmi::metric_stamp_json(identifier->metric().get())}}
                       .dump()
                << "\n";
    } else {
      std::printf("%4s  %-32s %12s\n", "rank", "model", a.scorer == "weighted" || a.scorer == "rkme"
                                                            ? "MMD^2" : "score");
      for (size_t i = 0; i < ranked.size(); ++i)
        std::printf("%4zu  %-32s %12.6f\n", i + 1, ranked[i].model.c_str(), ranked[i].score);
    }
    return 0;
  }

  // Batch: one JSON line out per line in, in order; a bad line gets an "error" field.
  gmi::Manifest man = gmi::read_manifest(a.batch, /*require_prompt=*/false);
  std::vector<std::filesystem::path> paths;
  std::vector<std::string> prompts;
  for (const auto& e : man.entries) {
    paths.push_back(e.image);
    prompts.push_back(a.prompt.empty() ? e.fields.value("query_prompt", std::string()) : a.prompt);
  }
  EmbeddedBatch b = decode_and_embed(paths, *encoder, c.threads, {}, "queries");
  std::vector<std::string> used_prompts;
  for (size_t i = 0; i < paths.size(); ++i)
    if (b.row_of[i] >= 0) used_prompts.push_back(prompts[i]);
  if (a.interrogator == "captioner") {
    const std::vector<std::string> captions = caption_queries(c, a, paths, b);
    for (size_t k = 0; k < used_prompts.size(); ++k) {
      if (used_prompts[k].empty()) used_prompts[k] = captions.at(k);
    }
  }
  auto ids = identifier->identify(b.x, used_prompts);

  // Interleave results and issues back into input line order.
  std::map<int, json> out;
  for (const auto& issue : man.issues) out[issue.line] = {{"line", issue.line}, {"error", issue.message}};
  // Output line N answers input line N: a blank line gets an error line too.
  for (int blank : man.blank_lines)
    out[blank] = {{"line", blank}, {"error", "blank line: no query"}};
  int failed = static_cast<int>(man.issues.size() + man.blank_lines.size());
  for (size_t i = 0; i < man.entries.size(); ++i) {
    json line = man.entries[i].fields;
    if (b.row_of[i] < 0) {
      line["error"] = b.errors[i];
      ++failed;
    } else {
      line["results"] = results_json(ids[static_cast<size_t>(b.row_of[i])].results);
      line["metric"] = gmi::metric_stamp_json(identifier->metric().get());
    }
    out[man.entries[i].line] = std::move(line);
  }
  for (auto& [line, j] : out) std::cout << j.dump() << "\n";
  std::fprintf(stderr, "gmi: %zu queries answered, %d failed\n", out.size() - failed, failed);
  return 0;
}

// ------------------------------------------------------------------ hub learn-metric / metric

struct HubArgs {
  gmi::MetricOptions options;
  bool json_out = false;
};

void print_metric(const gmi::Metric& m, const std::string& where, bool json_out) {
  json j = m.describe();
  j["store"] = where;
  if (json_out) {
    std::cout << j.dump() << "\n";
    return;
  }
  for (auto it = j.begin(); it != j.end(); ++it)
    std::printf("%-14s %s\n", it.key().c_str(),
                it.value().is_string() ? it.value().get<std::string>().c_str() : it.value().dump().c_str());
}

int run_learn_metric(const CommonOptions& c, const HubArgs& a) {
  auto store = gmi::open_spec_store(c.store);
  const gmi::EncoderIdentity encoder = gmi::image_encoder_info(c.image_encoder, c.encoders()).identity;
  std::unique_ptr<ProgressBar> bar;
  const auto report = gmi::learn_store_metric(*store, encoder, a.options, [&](std::size_t done, std::size_t total) {
    if (!bar) bar = std::make_unique<ProgressBar>("learning", total);
    bar->tick();
    (void)done;
  });
  if (bar) bar->finish();
  if (!a.json_out)
    std::printf("stored metric %s in %s: %d -> %d dims from %d models (%zu specs skipped) in %.2f s\n",
                report.metric.label().c_str(), store->describe().c_str(), report.metric.dim_in(),
                report.metric.dim_out(), report.metric.models, report.skipped, report.seconds);
  else {
    json j = report.metric.describe();
    j["store"] = store->describe();
    j["skipped"] = report.skipped;
    j["seconds"] = report.seconds;
    std::cout << j.dump() << "\n";
  }
  return 0;
}

int run_show_metric(const CommonOptions& c, const HubArgs& a) {
  auto store = gmi::open_spec_store(c.store);
  auto m = store->get_metric();
  if (!m) throw gmi::NotFoundError("no metric in " + store->describe() + " (gmi hub learn-metric)");
  print_metric(*m, store->describe(), a.json_out);
  return 0;
}

// ------------------------------------------------------------------ encoder show

int run_encoder_show(const CommonOptions& c, const std::string& name, bool json_out) {
  const gmi::EncoderRuntime rt = c.encoders();
  const gmi::ImageEncoderInfo info = gmi::image_encoder_info(name, rt);
  json j = {{"name", name},
            {"source", info.source},
            {"identity", info.identity.str()},
            {"dim", info.identity.dim},
            {"default_gamma", info.identity.default_gamma},
            {"min_side", info.min_side},
            {"encoder_dir", (rt.encoder_dir.empty() ? gmi::default_encoder_dir() : rt.encoder_dir).string()},
            {"torch", gmi::torch_description()}};
  if (c.load_encoder) {
    auto enc = gmi::make_image_encoder(name, rt);
    gmi::Image probe;
    probe.width = probe.height = std::max(64, info.min_side);
    probe.rgb.assign(static_cast<std::size_t>(probe.width) * probe.height * 3, 128);
    for (std::size_t i = 0; i < probe.rgb.size(); ++i) probe.rgb[i] = static_cast<std::uint8_t>((i * 37) % 251);
    const gmi::RowMatrix x = enc->encode({probe});
    j["loaded"] = enc->identity().str();
    j["probe_norm"] = x.row(0).norm();
  }
  if (json_out) {
    std::cout << j.dump() << "\n";
  } else {
    for (auto it = j.begin(); it != j.end(); ++it)
      std::printf("%-14s %s\n", it.key().c_str(), it.value().is_string() ? it.value().get<std::string>().c_str()
                                                                          : it.value().dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"gmi: find the generative model behind one image.\n"
               "Builds a specification (a reduced kernel mean embedding) per model and ranks\n"
               "every model of a hub against a query image."};
  app.set_version_flag("--version", kVersion);
  app.require_subcommand(1);
  CommonOptions common;

  auto* spec = app.add_subcommand("spec", "build, inspect and remove model specifications");
  spec->require_subcommand(1);

  BuildArgs build;
  auto* build_cmd = spec->add_subcommand("build", "build a model's spec from its sample images and prompts");
  build_cmd->add_option("--model", build.model, "model id ([A-Za-z0-9._-], up to 128 chars)")->required();
  build_cmd->add_option("--manifest", build.manifest,
                        "JSON-lines manifest: {\"image\": \"<path relative to it>\", \"prompt\": \"...\"}")
      ->required();
  build_cmd->add_option("--reduced-size,-r", build.fit.rkme.reduced_size, "reduced set size r")->capture_default_str();
  build_cmd->add_option("--gamma", build.fit.rkme.gamma, "kernel width (0: the image encoder's default)");
  build_cmd->add_option("--lambda", build.fit.rkme.lambda, "weight of the prompt in the joint space (<0: default)");
  build_cmd->add_option("--max-iterations", build.fit.rkme.max_iterations, "RKME fit iterations cap")->capture_default_str();
  build_cmd->add_option("--tolerance", build.fit.rkme.relative_tolerance,
                        "stop the fit when MMD^2 improves by less than this fraction in an iteration")
      ->capture_default_str();
  build_cmd
      ->add_option("--optimizer", build.optimizer,
                   "lbfgs (one quasi-Newton step per iteration) | gradient (three gradient steps)")
      ->check(CLI::IsMember({"lbfgs", "gradient"}))
      ->capture_default_str();
  build_cmd->add_option("--min-samples", build.fit.min_samples, "fail when fewer samples are usable")->capture_default_str();
  build_cmd->add_flag("--unconstrained", build.unconstrained, "closed-form beta instead of the simplex QP");
  build_cmd->add_option("--info", build.info_file, "JSON file with \"downloads\" and \"card\" for the model");
  build_cmd->add_option("--downloads", build.downloads, "download count (popularity baseline)");
  build_cmd->add_option("--card", build.card, "model card text");
  build_cmd->add_flag("--json", build.json_out, "print the result as JSON");
  add_common(build_cmd, common);
  add_encoder_options(build_cmd, common);

  std::vector<std::string> inspect_models;
  bool inspect_json = false;
  auto* inspect_cmd = spec->add_subcommand("inspect", "show specs' metadata and quality (all when no MODEL)");
  inspect_cmd->add_option("models", inspect_models, "model ids");
  inspect_cmd->add_flag("--json", inspect_json, "print JSON");
  add_common(inspect_cmd, common);

  std::string remove_model;
  auto* remove_cmd = spec->add_subcommand("remove", "remove a model's spec");
  remove_cmd->add_option("model", remove_model, "model id")->required();
  add_common(remove_cmd, common);

  IdentifyArgs ident;
  auto* identify_cmd = app.add_subcommand("identify", "rank the hub's models for a query image");
  identify_cmd->add_option("image", ident.image, "query image (JPEG or PNG)");
  identify_cmd->add_option("--batch", ident.batch,
                           "JSON-lines file of queries {\"image\": ...}; one JSON line out per line in");
  identify_cmd->add_option("--top,-k", ident.top, "how many models to list (0: all)")
      ->envname("GMI_TOP")->capture_default_str();
  identify_cmd->add_option("--scorer", ident.scorer, "weighted | rkme | mean | nearest | popularity")
      ->envname("GMI_SCORER")->capture_default_str();
  identify_cmd->add_option("--tau", ident.tau, "prompt-weight temperature of the weighted scorer");
  identify_cmd->add_option("--interrogator", ident.interrogator,
                           "pseudo-prompt source: neighbour | ridge | prompt-bank | captioner")
      ->envname("GMI_INTERROGATE_INTERROGATOR")->capture_default_str();
  identify_cmd->add_option("--prompt-bank", ident.prompt_bank, "prompt-bank: file of prompts, one per line")
      ->envname("GMI_INTERROGATE_PROMPT_BANK");
  identify_cmd->add_option("--bank-top-k", ident.bank_top_k, "prompt-bank: how many nearest prompts are mixed")
      ->envname("GMI_INTERROGATE_TOP_K")->capture_default_str();
  identify_cmd->add_option("--bank-tau", ident.bank_tau, "prompt-bank: softmax temperature")
      ->envname("GMI_INTERROGATE_BANK_TAU")->capture_default_str();
  identify_cmd->add_option("--captioner", ident.captioner, "captioner: the captioning module's card")
      ->envname("GMI_INTERROGATE_CAPTIONER");
  identify_cmd->add_option("--prompt", ident.prompt, "use this text as the query's prompt (skips the interrogator)");
  identify_cmd->add_flag("--json", ident.json_out, "print JSON: {\"results\": [{\"rank\", \"model\", \"score\"}]}");
  identify_cmd->add_option("--metric", ident.metric,
                           "auto (the store's metric, else one learnt from the loaded specs) | none | stored | learn")
      ->envname("GMI_METRIC")->capture_default_str();
  add_metric_options(identify_cmd, ident.metric_options);
  identify_cmd->add_option("--search", ident.search,
                           "exact | two-stage | auto (exact below --two-stage-from models)")
      ->envname("GMI_SCORE_SEARCH")->capture_default_str();
  identify_cmd->add_option("--two-stage-from", ident.two_stage_from, "auto: the hub size from which two-stage is used")
      ->envname("GMI_SCORE_TWO_STAGE_FROM")->capture_default_str();
  identify_cmd->add_option("--candidates", ident.two_stage.candidates, "two-stage: models per query scored exactly")
      ->envname("GMI_SCORE_CANDIDATES")->capture_default_str();
  identify_cmd->add_option("--clusters", ident.two_stage.clusters, "two-stage: groups each spec is summarised by")
      ->envname("GMI_SCORE_CLUSTERS")->capture_default_str();
  identify_cmd->add_option("--residual-dims", ident.two_stage.residual_dims,
                           "two-stage: directions of each point's offset from its group's mean (0: groups only)")
      ->envname("GMI_SCORE_RESIDUAL_DIMS")->capture_default_str();
  identify_cmd->add_option("--lists", ident.two_stage.lists, "two-stage: inverted-file cells (0: none)")
      ->envname("GMI_SCORE_LISTS")->capture_default_str();
  identify_cmd->add_option("--probe", ident.two_stage.probe, "two-stage: cells a query visits")
      ->envname("GMI_SCORE_PROBE")->capture_default_str();
  identify_cmd->add_option("--coarse", ident.two_stage.coarse,
                           "two-stage: models a coarse pass keeps per query for the summary estimate (0: none)")
      ->envname("GMI_SCORE_COARSE")->capture_default_str();
  add_common(identify_cmd, common);
  add_encoder_options(identify_cmd, common);

  std::string show_name = "auto";
  bool show_json = false;
  auto* encoder_cmd = app.add_subcommand("encoder", "show the installed encoders and which one `auto` picks");
  encoder_cmd->require_subcommand(1);
  auto* show_cmd = encoder_cmd->add_subcommand("show", "resolve an encoder name and print its identity");
  show_cmd->add_option("name", show_name, "auto, builtin, an installed name, or a card path")->capture_default_str();
  show_cmd->add_flag("--json", show_json, "print JSON");
  show_cmd->add_flag("--load", common.load_encoder, "also load the weights and run one probe image");
  add_encoder_options(show_cmd, common);

  auto* hub_cmd = app.add_subcommand("hub", "hub-wide artefacts: the learnt metric");
  hub_cmd->require_subcommand(1);
  HubArgs hub;
  auto* learn_cmd = hub_cmd->add_subcommand(
      "learn-metric", "learn the hub's metric from every spec in the store and store it as the next version");
  add_metric_options(learn_cmd, hub.options);
  learn_cmd->add_flag("--json", hub.json_out, "print JSON");
  add_common(learn_cmd, common);
  add_encoder_options(learn_cmd, common);
  auto* metric_cmd = hub_cmd->add_subcommand("metric", "show the store's metric");
  metric_cmd->add_flag("--json", hub.json_out, "print JSON");
  add_common(metric_cmd, common);
  auto* unmetric_cmd = hub_cmd->add_subcommand("remove-metric", "remove the store's metric");
  add_common(unmetric_cmd, common);

  gmi::cli::ServiceCommands service(app);
  gmi::cli::TextCommands text(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version are "errors" that exit 0; every usage error exits 2, as the
    // README says (CLI11's own codes are 100+).
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    if (int code = service.run(); code >= 0) return code;
    if (int code = text.run(); code >= 0) return code;
    if (build_cmd->parsed()) return run_spec_build(common, build);
    if (inspect_cmd->parsed()) return run_spec_inspect(common, inspect_models, inspect_json);
    if (remove_cmd->parsed()) {
      auto store = gmi::open_spec_store(common.store);
      if (!store->remove(remove_model)) throw gmi::NotFoundError("no spec for model '" + remove_model + "'");
      std::printf("removed '%s' from %s\n", remove_model.c_str(), store->describe().c_str());
      return 0;
    }
    if (identify_cmd->parsed()) return run_identify(common, ident);
    if (learn_cmd->parsed()) return run_learn_metric(common, hub);
    if (metric_cmd->parsed()) return run_show_metric(common, hub);
    if (unmetric_cmd->parsed()) {
      auto store = gmi::open_spec_store(common.store);
      if (!store->remove_metric()) throw gmi::NotFoundError("no metric in " + store->describe());
      std::printf("removed the metric of %s\n", store->describe().c_str());
      return 0;
    }
    if (show_cmd->parsed()) return run_encoder_show(common, show_name, show_json);
  } catch (const gmi::InputError& e) {
    std::fprintf(stderr, "gmi: error: %s\n", e.what());
    return 2;
  } catch (const gmi::BrokerRefusal& e) {
    // busy / unavailable: the environment (retry later); anything else is the request.
    std::fprintf(stderr, "gmi: error: %s\n", e.what());
    return e.retryable() ? 1 : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gmi: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
