#pragma once
/// Job records, inputs and results in Redis: what makes a broker restart lose nothing.
///
/// Keys (prefix P from the Redis URI, default "gmi"):
///   P:job:ID          HASH    kind, state, route ("decode,embed,..."), attempts, params
///                             (JSON), error, created_ms, finished_ms, dead_letter; TTL once ended
///   P:job:ID:input    HASH    slots (JSON: the input slots' entries), frames (their count)
///                             and f0..fN (the frames); deleted when the job finishes, kept with
///                             the dead-letter TTL when it dies
///   P:result:ID       STRING  the job object as JSON (state finished or failed), TTL
///   P:jobs:active     SET     ids of jobs accepted and not yet ended (resumed at start)
///   P:dead-letters    ZSET    ids of jobs that kept failing, scored by time (ms)
///   P:idem:SCOPE:KEY  STRING  "FINGERPRINT JOB_ID": the request a client's key named, result TTL
///   P:job-events      STREAM  every state change of every job: job, event (accepted, stage,
///                             retry, finished, failed), stage, ms; capped near events_maxlen.
///                             "accepted" is written with the record and the end with the end
///                             script, only for a job's first end: one end event per job.
/// Every write that changes a job's state is one MULTI/EXEC transaction, and ending a job
/// is idempotent: writing the same end twice leaves the same keys.
/// Thread-safety: NOT thread-safe (one Redis connection); the broker's loop owns it.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/redis.hpp"
#include "gmi/routes.hpp"
#include "gmi/slots.hpp"

namespace gmi {

struct JobStoreOptions {
  int result_ttl_s = 86400;
  int dead_letter_ttl_s = 604800;
  long long events_maxlen = 1000000;  ///< P:job-events keeps about this many (0: no stream)
};

/// What a job needs to run again from its first stage.
struct StoredJob {
  std::string id;
  std::string kind;        ///< "query" | "upload"
  nlohmann::json params;   ///< the request's fields (top, scorer, prompt / model_id, prompts...)
  Route route;             ///< the stages it was accepted for (empty: a record from before routes)
  wire::Slots input;       ///< the input slots ("images")
  std::int64_t created_ms = 0;
};

/// A client's idempotency key, scoped (to the request's kind and the client's credential),
/// with the fingerprint of the request that first used it and the job that request made.
struct IdempotencyRecord {
  std::string scope;        ///< e.g. "query|key:3fa2..." (never empty when key is not)
  std::string key;          ///< the client's key; empty: no record
  std::string fingerprint;  ///< SHA-256 (hex) of the request's kind, parameters and frames
  std::string job_id;
};

/// P:job:ID:input, where a job's input slots are (its frames f0..fN): the job store writes
/// it, and a claim check names it for the worker that fetches the input.
inline std::string job_input_key(const RedisLocation& location, const std::string& id) {
  return location.prefix + ":job:" + id + ":input";
}

class JobStore {
 public:
  JobStore(RedisLocation location, JobStoreOptions options);

  /// Records a new job with its input and marks it active, atomically. A non-empty
  /// `idempotency.key` is recorded with it (P:idem:SCOPE:KEY -> fingerprint and job id, for
  /// the result TTL).
  void create(const StoredJob& job, const IdempotencyRecord& idempotency = {});
  /// Records several jobs in one MULTI/EXEC (one round trip); `idempotency[i]` goes with
  /// `jobs[i]`.
  void create_many(const std::vector<const StoredJob*>& jobs,
                   const std::vector<const IdempotencyRecord*>& idempotency);
  /// find_idempotent for several (scope, key) pairs, in one round trip.
  std::vector<std::optional<IdempotencyRecord>> find_idempotent_many(
      const std::vector<std::pair<std::string, std::string>>& scoped_keys);
  /// Reserves `n` consecutive upload numbers at once; returns the first.
  std::uint64_t reserve_upload_seqs(std::uint64_t n);
  /// Whether each job has a record (a read-back after an unknown outcome).
  std::vector<bool> exist(const std::vector<std::string>& ids);
  /// Appends events to P:job-events, pipelined: (job id, event, stage) each.
  void append_events(const std::vector<std::array<std::string, 3>>& events);
  /// The record a scoped idempotency key already has (its job_id and fingerprint), if any.
  std::optional<IdempotencyRecord> find_idempotent(const std::string& scope, const std::string& key);
  /// The next upload sequence (P:upload-counter, INCR): uploads are numbered in the order
  /// the broker accepts them, and the spec stage fences spec writes with the number.
  std::uint64_t next_upload_seq();
  /// Ids of jobs accepted and not ended.
  std::vector<std::string> active_ids();
  /// The job's record and input; nullopt when its keys are gone (then drop it from the
  /// active set with forget()).
  std::optional<StoredJob> load(const std::string& id);
  void forget(const std::string& id);

  /// Ends a job: `job` is the job object clients will read (state "finished" or "failed").
  /// dead_letter keeps the input for inspection and lists the id in P:dead-letters. One
  /// atomic script that frees the input before it writes (so it succeeds when Redis is at
  /// its memory limit) and marks the end once (P:job:ID ended_ms, HSETNX). Returns true
  /// for the job's first end, false when it had ended already (a repeat after an unknown
  /// outcome). Idempotent.
  bool end(const std::string& id, const nlohmann::json& job, bool dead_letter);
  struct End {
    std::string id;
    const nlohmann::json* job;
    bool dead_letter;
  };
  /// end() for several jobs, pipelined (one round trip); throws if any of them failed
  /// (then end them one by one to know which: an end is idempotent).
  std::vector<bool> end_many(const std::vector<End>& ends);

  /// The stored job object of an ended job, or nullopt if unknown/expired.
  std::optional<nlohmann::json> ended(const std::string& id);
  /// The record of a job that is accepted and not ended (for status after a restart).
  std::optional<nlohmann::json> record(const std::string& id);

  /// Ids in the dead-letter list, oldest first.
  std::vector<std::string> dead_letters(std::size_t limit = 100);

  bool ping();
  RedisConnection& redis() { return redis_; }

 private:
  std::string job_key(const std::string& id) const { return redis_.key("job:" + id); }
  std::string input_key(const std::string& id) const { return job_input_key(redis_.location(), id); }
  std::string result_key(const std::string& id) const { return redis_.key("result:" + id); }

  RedisConnection redis_;
  JobStoreOptions options_;
  std::string active_key_;
  std::string dead_key_;
  std::string events_key_;
  std::string maxlen_;
};

/// Milliseconds since the Unix epoch.
std::int64_t now_ms();

}  // namespace gmi
