#pragma once
/// A pipeline stage: one small interface whose work call takes a whole batch of tasks and
/// returns one result per task. A bad task becomes an error on that task alone, never on
/// its batch-mates; exceptions from the libraries underneath are caught at this edge and
/// turned into error results with the context a person needs.
/// The runtime (runtime.hpp) owns the sockets; a Stage never sees ZeroMQ.
/// Thread-safety: process() is called from one thread at a time (the worker's compute
/// thread); not_ready_reason() may be called from any thread.
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/config.hpp"
#include "gmi/slots.hpp"

namespace gmi::workers {

/// One unit of work as the broker sent it (see schemas/README.md, "What flows between stages").
struct StageTask {
  std::string id;
  std::string job_id;
  std::string kind;  ///< "query" | "upload" | "metric"
  int attempt = 1;
  int credit = 1;         ///< what the broker charged this task (tasks, or images for embed)
  nlohmann::json params;  ///< the job's request fields
  nlohmann::json meta;    ///< the metadata the stages before wrote (accumulated)
  wire::Slots slots;      ///< the named payloads the stages before wrote (those this stage reads)
};

struct StageResult {
  bool ok = true;
  std::string error;       ///< when !ok: what went wrong, for people
  bool retryable = false;  ///< when !ok: may another try succeed (I/O) or not (bad input)?
  nlohmann::json meta = nlohmann::json::object();  ///< merged into the job's meta
  wire::Slots slots;  ///< put into the job's slots (same names replaced)

  static StageResult failure(std::string error, bool retryable) {
    StageResult r;
    r.ok = false;
    r.error = std::move(error);
    r.retryable = retryable;
    return r;
  }
};

/// How the runtime should batch for a stage.
struct BatchPolicy {
  int max_batch = 16;   ///< work units per process() call (and credit asked from the broker)
  int max_wait_ms = 0;  ///< wait up to this long for a batch to fill; 0: run what is there
  /// What a unit is: "" = one task; a slot name = one frame of that slot ("pixels": credit
  /// and batches count images, so a 1000-image upload and a 1-image query weigh what they hold).
  std::string credit_slot;
};

class Stage {
 public:
  virtual ~Stage() = default;
  virtual std::string name() const = 0;
  virtual BatchPolicy batch_policy() const = 0;
  /// One result per task, in order. Should not throw; if it does, the runtime runs each
  /// task of the batch again alone, and an exception a task throws alone is its result:
  /// InputError or std::bad_alloc fail its job (not retryable), anything else is retried.
  virtual std::vector<StageResult> process(std::vector<StageTask>& batch) = 0;
  /// The slots this stage reads (the broker sends only these); empty: every slot.
  virtual std::vector<std::string> reads() const { return {}; }
  /// "" when the stage can take work; else why not (e.g. specs still loading).
  virtual std::string not_ready_reason() const { return {}; }
  /// The shard this worker serves (score); 0 of 1 elsewhere.
  virtual int shard() const { return 0; }
  virtual int shards() const { return 1; }
};

/// Builds the stage called `name` ("decode", "embed", "interrogate", "score", "spec",
/// "learn") from
/// the configuration (keys NAME.*, plus redis.uri for the stages that read specs).
/// InputError for an unknown name or an invalid setting, naming it.
std::unique_ptr<Stage> make_stage(const std::string& name, const Config& config);

/// The stage names, in pipeline order.
const std::vector<std::string>& stage_names();

}  // namespace gmi::workers
