// The embed path against the bare model, in one run: images/s of make_image_encoder()'s
// encode() on decoded uint8 pixels (preprocessing as the card says, batching, forward,
// reduction, copy back) and of the TorchScript forward alone on a batch already on the
// device. Also the agreement of CPU-fp32 and device rows (min cosine) when the device is
// not the CPU.
//
//   bench_embed --card CARD.json [--device cuda] [--batch 256] [--seconds 5] [--json]
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "gmi/encoder_registry.hpp"
#include "gmi/torch_encoders.hpp"

using namespace gmi;

int main(int argc, char** argv) {
  CLI::App app{"Embed-path throughput against the bare TorchScript forward, in the same run"};
  std::string card_path, device = "cpu";
  int batch = 256, side = 256, threads = 0;
  double seconds = 5;
  bool json_out = false, fp32 = false;
  app.add_option("--card", card_path, "a TorchScript image encoder's card")->required();
  app.add_option("--device", device, "cpu | cuda | cuda:N")->capture_default_str();
  app.add_option("--batch", batch, "images per forward")->capture_default_str();
  app.add_option("--side", side, "side of the decoded test images (before the card's geometry)")->capture_default_str();
  app.add_option("--seconds", seconds, "time per measurement")->capture_default_str();
  app.add_option("--threads", threads, "CPU intra-op threads (0: LibTorch's default)");
  app.add_flag("--fp32", fp32, "no half precision on CUDA");
  app.add_flag("--json", json_out, "one JSON line");
  CLI11_PARSE(app, argc, argv);
  try {
    const EncoderCard card = load_encoder_card(card_path);
    EncoderRuntime rt;
    rt.device = device;
    rt.max_batch = batch;
    rt.fp16 = !fp32;
    rt.threads = threads;
    auto enc = make_image_encoder(card_path, rt);
    std::mt19937 rng(1);
    std::vector<Image> images(static_cast<std::size_t>(batch));
    for (auto& im : images) {
      im.width = im.height = side;
      im.rgb.resize(static_cast<std::size_t>(side) * side * 3);
      for (auto& v : im.rgb) v = static_cast<std::uint8_t>(rng() & 255);
    }
    enc->encode(images);  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    long done = 0;
    double elapsed = 0;
    do {
      enc->encode(images);
      done += batch;
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (elapsed < seconds);
    const double path = done / elapsed;
    TorchOptions to;
    to.device = device;
    to.fp16 = !fp32;
    to.threads = threads;
    const double bare = bare_forward_images_per_s(card, to, batch, seconds);
    nlohmann::json j = {{"encoder", enc->identity().str()}, {"device", device}, {"batch", batch},
                        {"fp16", device != "cpu" && !fp32}, {"embed_path_images_per_s", path},
                        {"bare_forward_images_per_s", bare}, {"ratio", path / bare},
                        {"torch", torch_description()}};
    if (device != "cpu") {
      EncoderRuntime cpu = rt;
      cpu.device = "cpu";
      const std::vector<Image> some(images.begin(), images.begin() + std::min<std::ptrdiff_t>(32, batch));
      const RowMatrix a = make_image_encoder(card_path, cpu)->encode(some);
      const RowMatrix b = enc->encode(some);
      double worst = 1;
      for (Eigen::Index i = 0; i < a.rows(); ++i) worst = std::min<double>(worst, a.row(i).dot(b.row(i)));
      j["min_cosine_cpu_fp32_vs_device"] = worst;
    }
    if (json_out) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%-28s %s on %s, batch %d%s\n", "encoder", j["encoder"].get<std::string>().c_str(), device.c_str(),
                  batch, j["fp16"].get<bool>() ? ", fp16" : "");
      std::printf("%-28s %10.1f images/s\n", "embed path", path);
      std::printf("%-28s %10.1f images/s\n", "bare forward", bare);
      std::printf("%-28s %10.3f\n", "embed path / bare", path / bare);
      if (j.contains("min_cosine_cpu_fp32_vs_device"))
        std::printf("%-28s %10.5f\n", "min cos(cpu fp32, device)", j["min_cosine_cpu_fp32_vs_device"].get<double>());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_embed: %s\n", e.what());
    return 2;
  }
  return 0;
}
