// TorchScript image and text encoders. The only translation unit with torch headers
// besides its tests: they are slow to compile.
#include "gmi/torch_encoders.hpp"

#include <torch/script.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <mutex>

#include "gmi/clip_tokenizer.hpp"
#include "gmi/error.hpp"
#include "gmi/parallel.hpp"

namespace gmi {
namespace {

std::string torch_message(const c10::Error& e) { return e.what_without_backtrace(); }

bool is_oom(const c10::Error& e) {
  const std::string m = e.what_without_backtrace();
  return m.find("out of memory") != std::string::npos;
}

torch::Device parse_device(const std::string& device) {
  if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0) {
    throw InputError("device \"" + device + "\" is not cpu, cuda or cuda:N");
  }
  torch::Device d(torch::kCPU);
  try {
    d = torch::Device(device);
  } catch (const c10::Error& e) {
    throw InputError("device \"" + device + "\": " + torch_message(e));
  }
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) {
      throw InputError("device \"" + device + "\": this LibTorch sees no CUDA device (" +
                       torch_runtime_description() + ")");
    }
    if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count())) {
      throw InputError("device \"" + device + "\": only " + std::to_string(torch::cuda::device_count()) +
                       " CUDA device(s) visible");
    }
  }
  return d;
}

torch::jit::Module load_module(const EncoderCard& card, const torch::Device& device) {
  verify_card_files(card);
  const auto& file = card.file("module");
  try {
    torch::jit::Module m = torch::jit::load(file.path.string(), device);
    m.eval();
    return m;
  } catch (const c10::Error& e) {
    throw InputError("failed to load TorchScript module " + file.path.string() + " (card " + card.path.string() +
                     "): " + torch_message(e));
  }
}

std::vector<torch::Tensor> as_tensors(const c10::IValue& v, const std::string& what) {
  std::vector<torch::Tensor> out;
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) {
      if (!e.isTensor()) throw InputError(what + ": returns a tuple with a non-tensor element");
      out.push_back(e.toTensor());
    }
  } else if (v.isTensorList()) {
    for (const auto& t : v.toTensorVector()) out.push_back(t);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) {
      if (!e.isTensor()) throw InputError(what + ": returns a list with a non-tensor element");
      out.push_back(e.toTensor());
    }
  } else {
    throw InputError(what + ": returns " + v.tagKind() + ", not tensors");
  }
  return out;
}

torch::Tensor l2_rows(const torch::Tensor& x) {
  return x / x.norm(2, {1}, true).clamp_min(1e-12);
}

RowMatrix to_rows(const torch::Tensor& t) {
  const torch::Tensor c = t.to(torch::kCPU, torch::kFloat).contiguous();
  RowMatrix out(c.size(0), c.size(1));
  std::memcpy(out.data(), c.data_ptr<float>(), sizeof(float) * static_cast<std::size_t>(c.numel()));
  return out;
}

// Images [n] from `first`, prepared as the card says, in one uint8 NHWC host tensor (pinned
// when it goes to a CUDA device, so the copy overlaps the previous batch's compute).
torch::Tensor host_pixels(const std::vector<Image>& images, std::size_t first, std::size_t n, const InputGeometry& g,
                          const torch::Device& device) {
  const int s = g.size;
  torch::Tensor host = torch::empty({static_cast<long>(n), s, s, 3}, torch::kUInt8);
  if (device.is_cuda()) host = host.pin_memory();
  auto* dst = host.data_ptr<std::uint8_t>();
  // Images already at the card's geometry (the decode stage prepares them) are a copy.
  std::mutex failed_mutex;
  std::exception_ptr failed;
  parallel_for(n, n >= 16 ? 0 : 1, [&](std::size_t i) {
    try {
      const Image& im = images[first + i];
      if (im.rgb.size() != static_cast<std::size_t>(im.width) * im.height * 3 || im.width <= 0) {
        throw InputError("image " + std::to_string(first + i) + " of the batch is empty or malformed");
      }
      const Image prepared = (im.width == s && im.height == s) ? Image{} : prepare_image(im, g);
      const Image& p = prepared.width > 0 ? prepared : im;
      std::memcpy(dst + i * static_cast<std::size_t>(s) * s * 3, p.rgb.data(), p.rgb.size());
    } catch (...) {
      std::lock_guard lock(failed_mutex);
      if (!failed) failed = std::current_exception();
    }
  });
  if (failed) std::rethrow_exception(failed);
  return host;
}

// uint8 NHWC on the host -> the module's float NCHW input on the device.
torch::Tensor normalised(const torch::Tensor& host_u8, const InputGeometry& g, const torch::Device& device, bool half,
                         const torch::Tensor& mean, const torch::Tensor& inv_std) {
  torch::Tensor x = host_u8.to(device, /*non_blocking=*/true).permute({0, 3, 1, 2});
  x = x.to(torch::kFloat).div_(g.scale).sub_(mean).mul_(inv_std);
  return half ? x.to(torch::kHalf) : x;
}

torch::Tensor channel_tensor(const float v[3], const torch::Device& device) {
  return torch::tensor({v[0], v[1], v[2]}).view({1, 3, 1, 1}).to(device);
}

// A card's module loaded on its device (half precision on CUDA when asked), with the
// lock that serialises its batches: what every TorchScript encoder holds.
struct LoadedModule {
  LoadedModule(EncoderCard card, const TorchOptions& options)
      : card_(std::move(card)), options_(options), device_(parse_device(options.device)) {
    module_ = load_module(card_, device_);
    half_ = device_.is_cuda() && options_.fp16;
    if (half_) module_.to(torch::kHalf);
  }
  EncoderCard card_;
  TorchOptions options_;
  torch::Device device_;
  bool half_ = false;
  mutable torch::jit::Module module_;
  mutable std::mutex mutex_;
};

class TorchImageEncoder final : public ImageEncoder, private LoadedModule {
 public:
  TorchImageEncoder(EncoderCard card, const TorchOptions& options)
      : LoadedModule(std::move(card), options) {
    if (options_.max_batch < 1) throw InputError("max_batch must be >= 1");
    if (options_.threads > 0) torch::set_num_threads(options_.threads);
    const auto& g = card_.input;
    mean_ = channel_tensor(g.mean, device_);
    inv_std_ = 1.0 / channel_tensor(g.std, device_);
    double total = 0;
    for (const auto& o : card_.outputs) total += o.weight;
    for (const auto& o : card_.outputs) scale_.push_back(total > 0 ? std::sqrt(o.weight / total) : 0.0);
    probe();
  }

  const EncoderIdentity& identity() const override { return identity_; }
  int input_min_side() const override { return card_.input.min_side; }

  RowMatrix encode(const std::vector<Image>& images) const override {
    std::lock_guard lock(mutex_);
    RowMatrix out(static_cast<Eigen::Index>(images.size()), identity_.dim);
    c10::InferenceMode guard;
    std::size_t done = 0;
    int batch = options_.max_batch;
    auto pack = [&](std::size_t first) {
      const std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(batch), images.size() - first);
      return host_pixels(images, first, n, card_.input, device_);
    };
    // Two batches in flight: while the device computes batch k (its launches are
    // asynchronous on CUDA, its input copied from pinned memory), the host prepares k + 1.
    torch::Tensor host = images.empty() ? torch::Tensor() : pack(0);
    while (done < images.size()) {
      const auto n = static_cast<std::size_t>(host.size(0));
      try {
        const torch::Tensor rows = forward(host);
        torch::Tensor next;
        if (done + n < images.size()) next = pack(done + n);
        out.middleRows(static_cast<Eigen::Index>(done), static_cast<Eigen::Index>(n)) = to_rows(rows);
        done += n;
        host = next;
      } catch (const c10::Error& e) {
        if (device_.is_cuda() && is_oom(e) && n > 1) {
          batch = std::max(1, static_cast<int>(n) / 2);  // retry this part with half the batch
          host = pack(done);
          continue;
        }
        throw Error("encoder " + identity_.str() + ": forward failed: " + torch_message(e));
      }
    }
    return out;
  }

 private:
  torch::Tensor forward(const torch::Tensor& host_u8) const {
    std::vector<c10::IValue> inputs{normalised(host_u8, card_.input, device_, half_, mean_, inv_std_)};
    const auto outputs = as_tensors(const_cast<torch::jit::Module&>(module_).forward(inputs),
                                    card_.file("module").path.string());
    std::vector<torch::Tensor> parts;
    for (std::size_t k = 0; k < card_.outputs.size(); ++k) {
      torch::Tensor r = reduce(outputs[k].to(torch::kFloat), card_.outputs[k]);
      if (card_.outputs[k].power != 1.0) r = r.sign() * r.abs().pow(card_.outputs[k].power);
      parts.push_back(l2_rows(r) * scale_[k]);
    }
    return l2_rows(torch::cat(parts, 1));
  }

  static torch::Tensor reduce(const torch::Tensor& t, const CardOutput& o) {
    switch (o.reduce) {
      case CardOutput::Reduce::kNone:
        return t.flatten(1);
      case CardOutput::Reduce::kGramUpper: {
        const torch::Tensor f = t.flatten(2);  // N, C, HW
        const torch::Tensor g = torch::bmm(f, f.transpose(1, 2)) / static_cast<double>(f.size(2));
        const torch::Tensor idx = torch::triu_indices(o.channels, o.channels, 0, torch::TensorOptions().device(t.device()));
        return g.index({torch::indexing::Slice(), idx[0], idx[1]});
      }
      case CardOutput::Reduce::kMeanStd: {
        const torch::Tensor f = t.flatten(2);
        return torch::cat({f.mean(2), f.std(2, /*unbiased=*/false)}, 1);
      }
    }
    return t;
  }

  // One probe batch: the outputs must be what the card says.
  void probe() {
    const std::string file = card_.file("module").path.string();
    const int s = card_.input.size;
    std::vector<torch::Tensor> outputs;
    try {
      c10::InferenceMode guard;
      torch::Tensor x = torch::zeros({1, 3, s, s}, torch::TensorOptions().device(device_));
      if (half_) x = x.to(torch::kHalf);
      std::vector<c10::IValue> inputs{x};
      outputs = as_tensors(module_.forward(inputs), file);
    } catch (const c10::Error& e) {
      throw InputError("TorchScript module " + file + " fails on a 1x3x" + std::to_string(s) + "x" +
                       std::to_string(s) + " input: " + torch_message(e));
    }
    if (outputs.size() != card_.outputs.size()) {
      throw InputError("TorchScript module " + file + " returns " + std::to_string(outputs.size()) +
                       " tensor(s) but card " + card_.path.string() + " lists " +
                       std::to_string(card_.outputs.size()) + " outputs");
    }
    int dim = 0;
    for (std::size_t k = 0; k < outputs.size(); ++k) {
      const auto& o = card_.outputs[k];
      const auto& t = outputs[k];
      const std::string what = "TorchScript module " + file + ": output " + std::to_string(k) + " (" + o.name + ")";
      if (o.reduce == CardOutput::Reduce::kNone) {
        if (t.dim() != 2) throw InputError(what + " has shape " + shape(t) + ", expected [N, D]");
        if (o.channels > 0 && t.size(1) != o.channels) {
          throw InputError(what + " has " + std::to_string(t.size(1)) + " columns, the card says " +
                           std::to_string(o.channels));
        }
        dim += static_cast<int>(t.size(1));
      } else {
        if (t.dim() != 4) throw InputError(what + " has shape " + shape(t) + ", expected [N, C, H, W]");
        if (t.size(1) != o.channels) {
          throw InputError(what + " has " + std::to_string(t.size(1)) + " channels, the card says " +
                           std::to_string(o.channels));
        }
        dim += o.width();
      }
    }
    if (dim != card_.dim) {
      throw InputError("TorchScript module " + file + " makes rows of " + std::to_string(dim) +
                       " but card " + card_.path.string() + " says dim " + std::to_string(card_.dim));
    }
    identity_ = card_.identity();
  }

  static std::string shape(const torch::Tensor& t) {
    std::string s = "[";
    for (int i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
    return s + "]";
  }

  torch::Tensor mean_, inv_std_;
  std::vector<double> scale_;
  EncoderIdentity identity_;
};

class TorchTextEncoder final : public TextEncoder, private LoadedModule {
 public:
  TorchTextEncoder(EncoderCard card, const TorchOptions& options)
      : LoadedModule(std::move(card), options) {
    const auto& vocab = card_.file("vocab");
    tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_file(vocab.path.string()));
    identity_ = card_.identity();
    // Probe: one text must give one row of the card's dim.
    const std::string file = card_.file("module").path.string();
    torch::Tensor y;
    try {
      y = run({tokenizer_->encode_with_specials("a photo", card_.context)});
    } catch (const c10::Error& e) {
      throw InputError("TorchScript module " + file + " fails on a 1x" + std::to_string(card_.context) +
                       " id tensor: " + torch_message(e));
    }
    if (y.dim() != 2 || y.size(1) != card_.dim) {
      throw InputError("TorchScript module " + file + " returns shape [" + std::to_string(y.size(0)) +
                       (y.dim() > 1 ? ", " + std::to_string(y.size(1)) : std::string()) + "] but card " +
                       card_.path.string() + " says dim " + std::to_string(card_.dim));
    }
  }

  const EncoderIdentity& identity() const override { return identity_; }

  RowMatrix encode(const std::vector<std::string>& texts) const override {
    std::lock_guard lock(mutex_);
    RowMatrix out = RowMatrix::Zero(static_cast<Eigen::Index>(texts.size()), identity_.dim);
    std::vector<std::vector<int>> ids;
    std::vector<Eigen::Index> rows;
    for (std::size_t i = 0; i < texts.size(); ++i) {
      if (texts[i].find_first_not_of(" \t\r\n") == std::string::npos) continue;  // empty: zero row
      ids.push_back(tokenizer_->encode_with_specials(texts[i], card_.context));
      rows.push_back(static_cast<Eigen::Index>(i));
    }
    const std::size_t step = static_cast<std::size_t>(std::max(1, options_.max_batch));
    for (std::size_t at = 0; at < ids.size(); at += step) {
      std::vector<std::vector<int>> part(ids.begin() + static_cast<long>(at),
                                         ids.begin() + static_cast<long>(std::min(ids.size(), at + step)));
      RowMatrix y;
      try {
        y = to_rows(l2_rows(run(part).to(torch::kFloat)));
      } catch (const c10::Error& e) {
        throw Error("encoder " + identity_.str() + ": forward failed: " + torch_message(e));
      }
      for (std::size_t k = 0; k < part.size(); ++k) out.row(rows[at + k]) = y.row(static_cast<Eigen::Index>(k));
    }
    return out;
  }

 private:
  torch::Tensor run(const std::vector<std::vector<int>>& ids) const {
    c10::InferenceMode guard;
    torch::Tensor t = torch::zeros({static_cast<long>(ids.size()), card_.context}, torch::kLong);
    auto acc = t.accessor<long, 2>();
    for (std::size_t i = 0; i < ids.size(); ++i) {
      for (std::size_t j = 0; j < ids[i].size() && j < static_cast<std::size_t>(card_.context); ++j) {
        acc[static_cast<long>(i)][static_cast<long>(j)] = ids[i][j];
      }
    }
    std::vector<c10::IValue> inputs{t.to(device_)};
    return module_.forward(inputs).toTensor();
  }

  std::unique_ptr<ClipTokenizer> tokenizer_;
  EncoderIdentity identity_;
};

class TorchCaptioner final : public Captioner, private LoadedModule {
 public:
  TorchCaptioner(EncoderCard card, const TorchOptions& options)
      : LoadedModule(std::move(card), options) {
    tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_file(card_.file("vocab").path.string()));
    mean_ = channel_tensor(card_.input.mean, device_);
    inv_std_ = 1.0 / channel_tensor(card_.input.std, device_);
    identity_ = card_.identity();
    Image probe;
    probe.width = probe.height = card_.input.size;
    probe.rgb.assign(static_cast<std::size_t>(probe.width) * probe.height * 3, 127);
    try {
      caption({probe});
    } catch (const c10::Error& e) {
      throw InputError("TorchScript captioner " + card_.file("module").path.string() + " fails on a probe image: " +
                       torch_message(e));
    }
  }

  const EncoderIdentity& identity() const override { return identity_; }
  int input_min_side() const override { return card_.input.min_side; }

  std::vector<std::string> caption(const std::vector<Image>& images) const override {
    std::lock_guard lock(mutex_);
    c10::InferenceMode guard;
    std::vector<std::string> out;
    const std::size_t step = static_cast<std::size_t>(std::max(1, options_.max_batch));
    for (std::size_t at = 0; at < images.size(); at += step) {
      const std::size_t n = std::min(step, images.size() - at);
      std::vector<c10::IValue> inputs{
          normalised(host_pixels(images, at, n, card_.input, device_), card_.input, device_, half_, mean_, inv_std_)};
      const c10::IValue y = module_.forward(inputs);
      if (!y.isTensor() || y.toTensor().dim() != 2 || y.toTensor().size(0) != static_cast<long>(n)) {
        throw InputError("TorchScript captioner " + card_.file("module").path.string() +
                         " must return token ids [N, L]");
      }
      const torch::Tensor ids = y.toTensor().to(torch::kCPU, torch::kLong).contiguous();
      for (long i = 0; i < ids.size(0); ++i) {
        std::vector<int> row;
        for (long j = 0; j < ids.size(1); ++j) {
          const long id = ids[i][j].item<long>();
          if (id == tokenizer_->end_id()) break;
          if (id > 0 && id < tokenizer_->vocab_size()) row.push_back(static_cast<int>(id));
        }
        out.push_back(tokenizer_->decode(row));
      }
    }
    return out;
  }

 private:
  std::unique_ptr<ClipTokenizer> tokenizer_;
  torch::Tensor mean_, inv_std_;
  EncoderIdentity identity_;
};

}  // namespace

std::unique_ptr<ImageEncoder> load_torchscript_image_encoder(const EncoderCard& card, const TorchOptions& options) {
  if (card.modality != "image" || card.backend != "torchscript") {
    throw InputError("encoder card " + card.path.string() + " is not a torchscript image card");
  }
  return std::make_unique<TorchImageEncoder>(card, options);
}

std::unique_ptr<TextEncoder> load_torchscript_text_encoder(const EncoderCard& card, const TorchOptions& options) {
  if (card.modality != "text" || card.backend != "torchscript") {
    throw InputError("encoder card " + card.path.string() + " is not a torchscript text card");
  }
  return std::make_unique<TorchTextEncoder>(card, options);
}

double bare_forward_images_per_s(const EncoderCard& card, const TorchOptions& options, int batch, double seconds) {
  const torch::Device device = parse_device(options.device);
  torch::jit::Module m = load_module(card, device);
  const bool half = device.is_cuda() && options.fp16;
  if (half) m.to(torch::kHalf);
  c10::InferenceMode guard;
  torch::Tensor x = torch::rand({batch, 3, card.input.size, card.input.size}, torch::TensorOptions().device(device));
  if (half) x = x.to(torch::kHalf);
  std::vector<c10::IValue> inputs{x};
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? -1 : device.index());
  };
  for (int i = 0; i < 3; ++i) m.forward(inputs);  // warm-up (cuDNN autotuning, allocator)
  sync();
  const auto t0 = std::chrono::steady_clock::now();
  long images = 0;
  double elapsed = 0;
  do {
    m.forward(inputs);
    images += batch;
    sync();
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (elapsed < seconds);
  return images / elapsed;
}

std::unique_ptr<Captioner> load_torchscript_captioner(const EncoderCard& card, const TorchOptions& options) {
  if (card.modality != "captioner" || card.backend != "torchscript") {
    throw InputError("encoder card " + card.path.string() + " is not a torchscript captioner card");
  }
  return std::make_unique<TorchCaptioner>(card, options);
}

std::string torch_runtime_description() {
  std::string s = "LibTorch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                  "." + std::to_string(TORCH_VERSION_PATCH);
  s += torch::cuda::is_available() ? ", CUDA devices: " + std::to_string(torch::cuda::device_count())
                                   : ", CUDA available: no";
  return s;
}

}  // namespace gmi
