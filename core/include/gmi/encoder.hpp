#pragma once
/// Encoders map images (G) and prompts (T) to L2-normalised vectors.
///
/// Every encoder has an identity; a spec records the identities of the encoders that
/// made it and is never scored against a query embedded by different ones.
/// Thread-safety: encode() is const and safe to call from several threads.
#include <memory>
#include <string>
#include <vector>

#include "gmi/image.hpp"
#include "gmi/linalg.hpp"

namespace gmi {

/// Who made an embedding: two embeddings are comparable iff their identities are equal.
struct EncoderIdentity {
  std::string name;
  std::string version;
  int dim = 0;
  double default_gamma = 1.0;  ///< kernel width suited to this feature space

  bool operator==(const EncoderIdentity& o) const {
    return name == o.name && version == o.version && dim == o.dim;
  }
  /// "name/version/dim", for messages and logs.
  std::string str() const;
};

class ImageEncoder {
 public:
  virtual ~ImageEncoder() = default;
  virtual const EncoderIdentity& identity() const = 0;
  /// The shorter side the encoder wants; decoders may DCT-scale toward it.
  virtual int input_min_side() const = 0;
  /// One row per image, each row L2-normalised.
  virtual RowMatrix encode(const std::vector<Image>& images) const = 0;
};

class TextEncoder {
 public:
  virtual ~TextEncoder() = default;
  virtual const EncoderIdentity& identity() const = 0;
  /// One row per text, each row L2-normalised (an empty text maps to the zero vector).
  virtual RowMatrix encode(const std::vector<std::string>& texts) const = 0;
};

/// An image-to-text interrogator network: one caption per image (a captioning module's
/// token ids, decoded by its tokenizer). The caption is then embedded by the text encoder.
class Captioner {
 public:
  virtual ~Captioner() = default;
  virtual const EncoderIdentity& identity() const = 0;  ///< dim is 0
  /// The shorter side the captioner wants; decoders may DCT-scale toward it.
  virtual int input_min_side() const = 0;
  /// One caption per image, in order (possibly empty).
  virtual std::vector<std::string> caption(const std::vector<Image>& images) const = 0;
};

/// The built-in, deterministic, CPU-only style descriptor (no weights needed).
std::unique_ptr<ImageEncoder> make_builtin_image_encoder();
/// The built-in hashed word / character n-gram prompt embedding.
std::unique_ptr<TextEncoder> make_builtin_text_encoder();

/// A part of a composite encoder and its share of the row's squared norm.
struct WeightedEncoder {
  std::shared_ptr<const ImageEncoder> encoder;
  double weight = 1.0;
};

/// Concatenates its parts' rows, part i scaled to norm sqrt(w_i / sum w), so the row stays
/// L2-normalised. `identity.dim` must equal the sum of the parts' dims. The input side is
/// the largest of the parts'.
std::unique_ptr<ImageEncoder> make_composite_image_encoder(EncoderIdentity identity,
                                                           std::vector<WeightedEncoder> parts);

// Encoders by name, card or "auto": gmi/encoder_registry.hpp.

}  // namespace gmi
