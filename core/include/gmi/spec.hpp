#pragma once
/// A model's specification: everything METHOD.md lists, plus its on-disk format.
///
/// Format "gmispec" v1 (little-endian), described by schemas/spec.schema.json:
///   magic "GMISPEC\0" (8 bytes) | u32 format_version | u32 json_length |
///   json metadata (UTF-8) | zero padding to 8 bytes |
///   float32 arrays, in the order and at the offsets the metadata lists
///   (offsets relative to the start of the array section) |
///   u32 CRC-32 (IEEE) of every byte before it.
/// Thread-safety: value type; free functions are reentrant.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/encoder.hpp"
#include "gmi/linalg.hpp"

namespace gmi {

inline constexpr std::uint32_t kSpecFormatVersion = 1;

struct Spec {
  std::string model_id;
  EncoderIdentity image_encoder;
  EncoderIdentity text_encoder;
  int n = 0;                   ///< samples the spec was fitted on
  double gamma = 1.0;
  double lambda = 1.0;
  double residual_mmd2 = 0.0;  ///< the spec's quality: lower is better
  RowMatrix zx;                ///< r x d
  RowMatrix zt;                ///< r x dt
  Eigen::VectorXf beta;        ///< r
  RowMatrix gram_x;            ///< r x r, k_x(zx_j, zx_l)
  Eigen::VectorXf mean_x;      ///< d, sample mean of the image embeddings
  double downloads = 0;        ///< popularity, for the popularity baseline
  std::string card;            ///< model card text, optional
  std::string created_at;      ///< ISO-8601 UTC
  nlohmann::json extra = nlohmann::json::object();  ///< free-form, kept verbatim

  int r() const { return static_cast<int>(beta.size()); }
};

/// Checks internal consistency (shapes, finite values, beta >= 0); throws SpecFormatError.
void validate(const Spec& spec);

std::vector<std::uint8_t> serialize_spec(const Spec& spec);
/// Throws SpecFormatError on bad magic, unknown version, checksum mismatch, bad shapes.
Spec parse_spec(const std::uint8_t* data, std::size_t size);
inline Spec parse_spec(const std::vector<std::uint8_t>& bytes) {
  return parse_spec(bytes.data(), bytes.size());
}

/// The JSON metadata alone (what `gmi spec inspect` and the HTTP API show).
nlohmann::json spec_metadata(const Spec& spec);

/// Model ids: 1..128 chars of [A-Za-z0-9._-], not starting with '.'. Throws InputError.
void validate_model_id(const std::string& id);

}  // namespace gmi
