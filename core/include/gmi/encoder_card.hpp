#pragma once
/// Encoder cards: the small JSON file that describes an encoder (schemas/encoder-card.md).
///
/// A card names the encoder's identity, its input geometry and normalisation, how the
/// module's outputs become one row, and its files with their sha256. Reading a card loads
/// no weights, so the processes that need only an identity or a geometry (decode, score,
/// interrogate, gateway) read cards and nothing else.
/// Thread-safety: plain value types; the functions are reentrant.
#include <filesystem>
#include <string>
#include <vector>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"

namespace gmi {

/// How an image becomes the module's size x size input.
struct InputGeometry {
  enum class Resize { kShorterSide, kNone };
  enum class Filter { kBicubic, kBilinear };
  int size = 224;                ///< the module sees size x size pixels
  Resize resize = Resize::kShorterSide;  ///< kNone: centre crop at the decoded resolution
  Filter filter = Filter::kBicubic;
  int min_side = 224;            ///< shorter side the decoder keeps (>= size)
  float scale = 255.f;           ///< input = (pixel / scale - mean) / std
  float mean[3] = {0.f, 0.f, 0.f};
  float std[3] = {1.f, 1.f, 1.f};
};

/// One tensor the module returns, and how it becomes part of the row.
struct CardOutput {
  enum class Reduce { kNone, kGramUpper, kMeanStd };
  std::string name;
  int channels = 0;   ///< expected channel count (0 for kNone: any width)
  Reduce reduce = Reduce::kNone;
  double weight = 1.0;  ///< the block's share of the squared norm of the row
  double power = 1.0;   ///< signed power applied to each value before the block is normalised

  /// Length of this output's part of the row.
  int width() const;
};

struct CardFile {
  std::string role;            ///< module | vocab | ...
  std::filesystem::path path;  ///< absolute (resolved against the card's folder)
  std::string sha256;          ///< 64 lower-case hex digits
};

/// A composite card's part: another encoder ("builtin" or a card path) and its weight.
struct CardPart {
  std::string encoder;
  double weight = 1.0;
};

struct EncoderCard {
  std::filesystem::path path;  ///< the card file itself
  std::string name;
  std::string version;
  std::string modality;        ///< image | text | captioner
  std::string backend;         ///< builtin | torchscript | composite
  int dim = 0;
  double default_gamma = 1.0;
  InputGeometry input;         ///< image and captioner cards
  int context = 77;            ///< text cards: ids per text
  std::string tokenizer;       ///< text cards: "clip-bpe"
  std::vector<CardOutput> outputs;
  std::vector<CardFile> files;
  std::vector<CardPart> parts;

  EncoderIdentity identity() const;
  /// The file with this role; throws InputError naming the card when there is none.
  const CardFile& file(const std::string& role) const;
};

/// Reads and validates a card. Throws InputError naming the file and the field.
EncoderCard load_encoder_card(const std::filesystem::path& path);

/// Checks that every file of the card exists and has its sha256. Throws InputError
/// ("encoder card X: file Y: sha256 mismatch ...", "... missing").
void verify_card_files(const EncoderCard& card);

/// The sha256 of a file, as 64 lower-case hex digits. Throws IoError.
std::string sha256_file(const std::filesystem::path& path);

/// The card's geometry applied to one image: a size x size RGB image, resized and
/// centre-cropped exactly as the card says (PIL-style antialiased bicubic or bilinear).
Image prepare_image(const Image& image, const InputGeometry& geometry);

/// Antialiased separable resampling to exactly width x height, as PIL's resize does
/// (bicubic a = -0.5, or bilinear (triangle)); the support widens when shrinking.
Image resample(const Image& image, int width, int height, InputGeometry::Filter filter);
/// The w x h window at (x0, y0) of resample(image, width, height, filter): the same pixels,
/// at the window's cost.
Image resample_window(const Image& image, int width, int height, int x0, int y0, int w, int h,
                      InputGeometry::Filter filter);

}  // namespace gmi
