#pragma once
// The pipeline's commands: serve, broker, worker, gateway (the service processes), query,
// upload, job (clients of a running broker), keygen and config.
#include <memory>

#include <CLI/CLI.hpp>

namespace gmi::cli {

class ServiceCommands {
 public:
  /// Registers the commands on `app`.
  explicit ServiceCommands(CLI::App& app);
  ~ServiceCommands();
  /// The exit code of the parsed command; -1 when none of these commands was parsed.
  /// Throws gmi errors for the caller's usual mapping (InputError 2, others 1).
  int run();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace gmi::cli
