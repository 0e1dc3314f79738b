#pragma once
/// gmi's one error family. Every error a caller can act on is one of these.
///
/// The split maps onto the decision a caller must make:
///   - InputError and its children: the request itself is bad; retrying it cannot help.
///   - IoError: the environment failed (disk, network, Redis); retrying may help.
/// Thread-safety: plain value types.
#include <stdexcept>
#include <string>

namespace gmi {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The caller's input is wrong (bad image, bad manifest, bad option). Not retryable.
class InputError : public Error {
 public:
  using Error::Error;
};

/// Why an image could not be decoded.
enum class DecodeFailure {
  kEmpty,        ///< zero bytes
  kUnsupported,  ///< not a format we decode (or not an image at all)
  kTruncated,    ///< the data ends before the image does
  kCorrupt,      ///< the data is damaged
  kTooLarge,     ///< byte size or pixel count over the configured limit
};

const char* to_string(DecodeFailure f);

/// An image could not be decoded; `failure()` says why.
class DecodeError : public InputError {
 public:
  DecodeError(DecodeFailure failure, const std::string& message)
      : InputError(message), failure_(failure) {}
  DecodeFailure failure() const { return failure_; }

 private:
  DecodeFailure failure_;
};

/// A spec file/blob is malformed, of an unknown format version, or fails its checksum.
class SpecFormatError : public InputError {
 public:
  using InputError::InputError;
};

/// A spec and a query (or two specs) were made by different encoders.
class EncoderMismatchError : public InputError {
 public:
  using InputError::InputError;
};

/// A model id that the store does not hold.
class NotFoundError : public InputError {
 public:
  using InputError::InputError;
};

/// Disk, network or server failure. Retryable.
class IoError : public Error {
 public:
  using Error::Error;
};

}  // namespace gmi
