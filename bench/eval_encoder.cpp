// Measures an image encoder on an evaluation hub without fitting any spec: how well do
// plain first-moment (mean), full kernel-mean (MMD to all samples) and 1-nearest-sample
// rules identify the model behind each query? Used to choose the built-in descriptor.
//
//   eval_encoder --hub DIR [--threads N]
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>

#include <CLI/CLI.hpp>

#include "gmi/encoder.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/image.hpp"
#include "gmi/manifest.hpp"
#include "gmi/rkme.hpp"

namespace fs = std::filesystem;
using namespace gmi;

static RowMatrix embed_all(const ImageEncoder& enc, const std::vector<fs::path>& paths, int threads) {
  RowMatrix out(static_cast<Eigen::Index>(paths.size()), enc.identity().dim);
  std::atomic<size_t> next{0};
  DecodeOptions opt;
  opt.target_min_side = enc.input_min_side();
  auto work = [&] {
    for (size_t i; (i = next++) < paths.size();) {
      Image img = read_image_file(paths[i], opt);
      out.row(static_cast<Eigen::Index>(i)) = enc.encode({img}).row(0);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
  return out;
}

int main(int argc, char** argv) {
  CLI::App app{"Evaluate an image encoder on an evaluation hub (mean / kernel-mean / 1-NN rules)"};
  std::string hub;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--hub", hub, "hub directory made by scripts/make_hub.py")->required();
  app.add_option("--threads", threads, "embedding threads");
  std::string dump, encoder = "auto", encoder_dir;
  app.add_option("--encoder", encoder, "image encoder: auto, builtin, an installed name, or a card path")
      ->capture_default_str();
  app.add_option("--encoder-dir", encoder_dir, "folder of installed encoders");
  app.add_option("--dump", dump, "write embeddings to DIR (samples.f32, queries.f32, labels.json) for offline analysis");
  CLI11_PARSE(app, argc, argv);

  EncoderRuntime rt;
  rt.encoder_dir = encoder_dir;
  std::unique_ptr<ImageEncoder> enc;
  try {
    enc = make_image_encoder(encoder, rt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eval_encoder: %s\n", e.what());
    return 2;
  }
  std::vector<std::string> models;
  for (auto& d : fs::directory_iterator(fs::path(hub) / "models"))
    if (fs::exists(d.path() / "manifest.jsonl")) models.push_back(d.path().filename());
  std::sort(models.begin(), models.end());
  std::vector<fs::path> paths;
  std::vector<int> owner;
  for (size_t m = 0; m < models.size(); ++m) {
    Manifest man = read_manifest(fs::path(hub) / "models" / models[m] / "manifest.jsonl", true);
    for (auto& e : man.entries) {
      paths.push_back(e.image);
      owner.push_back(static_cast<int>(m));
    }
  }
  Manifest qs = read_manifest(fs::path(hub) / "queries.jsonl", false);
  std::vector<fs::path> qpaths;
  std::vector<int> truth;
  for (auto& e : qs.entries) {
    qpaths.push_back(e.image);
    auto it = std::find(models.begin(), models.end(), e.fields.value("model", ""));
    truth.push_back(static_cast<int>(it - models.begin()));
  }
  auto t0 = std::chrono::steady_clock::now();
  RowMatrix X = embed_all(*enc, paths, threads);
  RowMatrix Q = embed_all(*enc, qpaths, threads);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double gamma = median_heuristic_gamma(X);
  std::printf("encoder %s: %zu samples + %zu queries embedded in %.2fs (%.0f images/s), median-heuristic gamma %.3f\n",
              enc->identity().str().c_str(), paths.size(), qpaths.size(), secs,
              (paths.size() + qpaths.size()) / secs, gamma);

  const int M = static_cast<int>(models.size());
  if (!dump.empty()) {
    fs::create_directories(dump);
    std::ofstream(fs::path(dump) / "samples.f32", std::ios::binary)
        .write(reinterpret_cast<const char*>(X.data()), X.size() * sizeof(float));
    std::ofstream(fs::path(dump) / "queries.f32", std::ios::binary)
        .write(reinterpret_cast<const char*>(Q.data()), Q.size() * sizeof(float));
    nlohmann::json j = {{"dim", X.cols()}, {"owner", owner}, {"truth", truth}, {"models", models}};
    std::ofstream(fs::path(dump) / "labels.json") << j.dump();
  }
  RowMatrix means = RowMatrix::Zero(M, X.cols());
  std::vector<int> count(M, 0);
  for (Eigen::Index i = 0; i < X.rows(); ++i) {
    means.row(owner[i]) += X.row(i);
    count[owner[i]]++;
  }
  for (int m = 0; m < M; ++m) means.row(m) /= std::max(count[m], 1);
  // Self term of each model's kernel mean: (1/n^2) sum k(x_i, x_i').
  std::vector<double> self(M, 0);
  for (int m = 0; m < M; ++m) {
    std::vector<Eigen::Index> idx;
    for (Eigen::Index i = 0; i < X.rows(); ++i)
      if (owner[i] == m) idx.push_back(i);
    for (auto a : idx)
      for (auto b : idx) self[m] += std::exp(-gamma * (X.row(a) - X.row(b)).squaredNorm());
    self[m] /= static_cast<double>(idx.size()) * idx.size();
  }
  int hits[3][4] = {};
  for (Eigen::Index q = 0; q < Q.rows(); ++q) {
    std::vector<double> mean_s(M), mmd(M, 0), nn(M, -1);
    std::vector<double> cross(M, 0);
    for (int m = 0; m < M; ++m) mean_s[m] = -Q.row(q).dot(means.row(m)) / (means.row(m).norm() + 1e-12);
    for (Eigen::Index i = 0; i < X.rows(); ++i) {
      double k = std::exp(-gamma * (X.row(i) - Q.row(q)).squaredNorm());
      cross[owner[i]] += k / count[owner[i]];
      nn[owner[i]] = std::max(nn[owner[i]], k);
    }
    for (int m = 0; m < M; ++m) {
      mmd[m] = 1 - 2 * cross[m] + self[m];
      nn[m] = -nn[m];
    }
    const std::vector<double>* rules[3] = {&mean_s, &mmd, &nn};
    for (int r = 0; r < 3; ++r) {
      int better = 0;
      for (int m = 0; m < M; ++m) better += (*rules[r])[m] < (*rules[r])[truth[q]];
      for (int k = 0; k < 4; ++k) hits[r][k] += better <= k;
    }
  }
  const char* names[3] = {"mean", "kernel-mean", "1-nn"};
  std::printf("%-12s %6s %6s %6s %6s   (%lld queries, %d models)\n", "rule", "top1", "top2", "top3",
              "top4", static_cast<long long>(Q.rows()), M);
  for (int r = 0; r < 3; ++r)
    std::printf("%-12s %6.3f %6.3f %6.3f %6.3f\n", names[r], hits[r][0] / double(Q.rows()),
                hits[r][1] / double(Q.rows()), hits[r][2] / double(Q.rows()), hits[r][3] / double(Q.rows()));
  return 0;
}
