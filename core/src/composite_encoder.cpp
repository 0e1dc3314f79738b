// A composite image encoder: several encoders' rows side by side, each block weighted.
#include <cmath>
#include <numeric>

#include "gmi/encoder.hpp"
#include "gmi/error.hpp"

namespace gmi {
namespace {

class CompositeImageEncoder final : public ImageEncoder {
 public:
  CompositeImageEncoder(EncoderIdentity identity, std::vector<WeightedEncoder> parts)
      : identity_(std::move(identity)), parts_(std::move(parts)) {
    if (parts_.empty()) throw InputError("a composite encoder needs at least one part");
    double total = 0;
    int dim = 0;
    for (const auto& p : parts_) {
      if (!p.encoder) throw InputError("a composite encoder part is missing");
      if (!(p.weight >= 0)) throw InputError("a composite encoder weight must be >= 0");
      total += p.weight;
      dim += p.encoder->identity().dim;
      min_side_ = std::max(min_side_, p.encoder->input_min_side());
    }
    if (!(total > 0)) throw InputError("a composite encoder needs a positive weight");
    if (dim != identity_.dim) {
      throw InputError("composite encoder " + identity_.name + ": dim " + std::to_string(identity_.dim) +
                       " but its parts make " + std::to_string(dim));
    }
    for (const auto& p : parts_) scale_.push_back(static_cast<float>(std::sqrt(p.weight / total)));
  }

  const EncoderIdentity& identity() const override { return identity_; }
  int input_min_side() const override { return min_side_; }

  RowMatrix encode(const std::vector<Image>& images) const override {
    RowMatrix out(static_cast<Eigen::Index>(images.size()), identity_.dim);
    Eigen::Index col = 0;
    for (std::size_t k = 0; k < parts_.size(); ++k) {
      const RowMatrix x = parts_[k].encoder->encode(images);
      out.middleCols(col, x.cols()) = x * scale_[k];
      col += x.cols();
    }
    // Parts are unit rows, so rows are unit already unless a part returned a zero row.
    for (Eigen::Index i = 0; i < out.rows(); ++i) {
      const float n = out.row(i).norm();
      if (n > 0) out.row(i) /= n;
    }
    return out;
  }

 private:
  EncoderIdentity identity_;
  std::vector<WeightedEncoder> parts_;
  std::vector<float> scale_;
  int min_side_ = 0;
};

}  // namespace

std::unique_ptr<ImageEncoder> make_composite_image_encoder(EncoderIdentity identity,
                                                           std::vector<WeightedEncoder> parts) {
  return std::make_unique<CompositeImageEncoder>(std::move(identity), std::move(parts));
}

}  // namespace gmi
