#pragma once
// The text commands: `gmi text tokenize`, CLIP's BPE tokenizer on the command line.
#include <memory>

#include <CLI/CLI.hpp>

namespace gmi::cli {

class TextCommands {
 public:
  /// Registers the commands on `app`.
  explicit TextCommands(CLI::App& app);
  ~TextCommands();
  /// The exit code of the parsed command; -1 when none of these commands was parsed.
  /// Throws gmi errors for the caller's usual mapping (InputError 2, others 1).
  int run();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace gmi::cli
