#include "gmi/job_store.hpp"

#include <hiredis/hiredis.h>

#include <chrono>
#include <deque>

#include "gmi/error.hpp"

namespace gmi {

using nlohmann::json;

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

JobStore::JobStore(RedisLocation location, JobStoreOptions options)
    : redis_(std::move(location), 2000, 5000),
      options_(options),
      active_key_(redis_.key("jobs:active")),
      dead_key_(redis_.key("dead-letters")),
      events_key_(redis_.key("job-events")),
      maxlen_(std::to_string(options_.events_maxlen)) {}

namespace {

std::optional<IdempotencyRecord> parse_idempotency(const std::string& scope, const std::string& key,
                                                   const std::optional<std::string>& value) {
  if (!value) return std::nullopt;
  IdempotencyRecord rec{scope, key, "", ""};
  const auto space = value->find(' ');
  if (space == std::string::npos) {
    rec.job_id = *value;  // a record written before fingerprints: matches nothing
  } else {
    rec.fingerprint = value->substr(0, space);
    rec.job_id = value->substr(space + 1);
  }
  return rec;
}

}  // namespace

std::optional<IdempotencyRecord> JobStore::find_idempotent(const std::string& scope, const std::string& key) {
  return find_idempotent_many({{scope, key}}).front();
}

std::vector<std::optional<IdempotencyRecord>> JobStore::find_idempotent_many(
    const std::vector<std::pair<std::string, std::string>>& scoped_keys) {
  std::vector<std::string> keys;
  keys.reserve(scoped_keys.size());
  for (const auto& [scope, key] : scoped_keys) keys.push_back(redis_.key("idem:" + scope + ":" + key));
  std::vector<RedisConnection::Args> gets;
  for (const auto& k : keys) gets.push_back({"GET", k});
  auto replies = redis_.pipeline(gets);
  std::vector<std::optional<IdempotencyRecord>> out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out.push_back(parse_idempotency(scoped_keys[i].first, scoped_keys[i].second,
                                    RedisConnection::as_optional_string(replies[i].get(), "GET " + keys[i])));
  }
  return out;
}

void JobStore::create(const StoredJob& job, const IdempotencyRecord& idempotency) {
  create_many({&job}, {&idempotency});
}

void JobStore::create_many(const std::vector<const StoredJob*>& jobs,
                           const std::vector<const IdempotencyRecord*>& idempotency) {
  // Args holds views: every string it names must outlive the transaction (deques never
  // move what they hold).
  std::deque<std::string> text;
  const auto keep = [&text](std::string s) -> std::string_view { return text.emplace_back(std::move(s)); };
  const std::string ttl = std::to_string(options_.result_ttl_s);
  const std::string now = std::to_string(now_ms());
  std::vector<RedisConnection::Args> cmds;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const StoredJob& job = *jobs[j];
    const auto jk = keep(job_key(job.id)), ik = keep(input_key(job.id));
    cmds.push_back({"HSET", jk, "kind", job.kind, "state", "queued", "params",
                    keep(job.params.dump(-1, ' ', false, json::error_handler_t::replace)), "route",
                    keep(join_route(job.route)), "created_ms", keep(std::to_string(job.created_ms)), "attempts",
                    "0"});
    // The frames as views of the job's own slots (no copy), one HSET each, so that the
    // client library's buffer never holds more than one of them (RedisConnection::pipeline).
    std::size_t n = 0;
    for (const auto& slot : job.input.all()) {
      for (const auto& frame : slot.frames) cmds.push_back({"HSET", ik, keep("f" + std::to_string(n++)), frame});
    }
    cmds.push_back({"HSET", ik, "frames", keep(std::to_string(n)), "slots", keep(job.input.describe().dump())});
    cmds.push_back({"SADD", active_key_, job.id});
    const IdempotencyRecord* idem = j < idempotency.size() ? idempotency[j] : nullptr;
    if (idem != nullptr && !idem->key.empty()) {
      cmds.push_back({"SET", keep(redis_.key("idem:" + idem->scope + ":" + idem->key)),
                      keep(idem->fingerprint + " " + job.id), "EX", ttl});
    }
    if (options_.events_maxlen > 0) {
      cmds.push_back({"XADD", events_key_, "MAXLEN", "~", maxlen_, "*", "job", job.id, "event", "accepted",
                      "stage", "", "ms", now});
    }
  }
  std::vector<RedisReply> replies;
  redis_.transaction(cmds, replies);
}

std::uint64_t JobStore::reserve_upload_seqs(std::uint64_t n) {
  const std::string k = redis_.key("upload-counter");
  RedisReply r = redis_.command({"INCRBY", k, std::to_string(n)});
  return static_cast<std::uint64_t>(RedisConnection::as_integer(r.get(), "INCRBY " + k)) - n + 1;
}

std::vector<bool> JobStore::exist(const std::vector<std::string>& ids) {
  std::vector<std::string> keys;
  for (const auto& id : ids) keys.push_back(job_key(id));
  std::vector<RedisConnection::Args> cmds;
  for (const auto& k : keys) cmds.push_back({"EXISTS", k});
  auto replies = redis_.pipeline(cmds);
  std::vector<bool> out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out.push_back(RedisConnection::as_integer(replies[i].get(), "EXISTS " + keys[i]) == 1);
  }
  return out;
}

void JobStore::append_events(const std::vector<std::array<std::string, 3>>& events) {
  if (options_.events_maxlen <= 0 || events.empty()) return;
  const std::string now = std::to_string(now_ms());
  std::vector<RedisConnection::Args> cmds;
  for (const auto& e : events) {
    cmds.push_back({"XADD", events_key_, "MAXLEN", "~", maxlen_, "*", "job", e[0], "event", e[1], "stage", e[2],
                    "ms", now});
  }
  redis_.pipeline(cmds);
}

std::uint64_t JobStore::next_upload_seq() {
  const std::string k = redis_.key("upload-counter");
  RedisReply r = redis_.command({"INCR", k});
  return static_cast<std::uint64_t>(RedisConnection::as_integer(r.get(), "INCR " + k));
}

std::vector<std::string> JobStore::active_ids() {
  RedisReply r = redis_.command({"SMEMBERS", active_key_});
  return RedisConnection::as_string_array(r.get(), "SMEMBERS " + active_key_);
}

std::optional<StoredJob> JobStore::load(const std::string& id) {
  const std::string jk = job_key(id), ik = input_key(id);
  auto replies = redis_.pipeline({{"HMGET", jk, "kind", "params", "created_ms", "route"},
                                  {"HMGET", ik, "frames", "slots"}});
  auto fields = RedisConnection::as_string_array(replies[0].get(), "HMGET " + jk);
  auto input = RedisConnection::as_string_array(replies[1].get(), "HMGET " + ik);
  if (fields.size() != 4 || fields[0].empty() || input.size() != 2 || input[0].empty()) return std::nullopt;
  StoredJob job;
  job.id = id;
  job.kind = fields[0];
  job.params = json::parse(fields[1], nullptr, false);
  if (job.params.is_discarded()) job.params = json::object();
  try {
    job.created_ms = std::stoll(fields[2]);
  } catch (...) {
    job.created_ms = now_ms();
  }
  if (!fields[3].empty()) job.route = split_route(fields[3]);
  std::size_t n = 0;
  try {
    n = std::stoul(input[0]);
  } catch (...) {
    return std::nullopt;
  }
  std::vector<std::string> frames;
  if (n > 0) {
    RedisConnection::Args get{"HMGET", ik};
    std::vector<std::string> names;
    names.reserve(n);
    for (std::size_t i = 0; i < n; ++i) names.push_back("f" + std::to_string(i));
    for (const auto& name : names) get.push_back(name);
    RedisReply r = redis_.command(get);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != n) return std::nullopt;
    for (std::size_t i = 0; i < n; ++i) {
      if (r->element[i]->type != REDIS_REPLY_STRING) return std::nullopt;
      frames.emplace_back(r->element[i]->str, r->element[i]->len);
    }
  }
  // A record from before slots holds its image frames alone.
  json slots = input[1].empty() ? json::array({{{"name", wire::slot::kImages}, {"kind", "image_bytes"}, {"frames", n}}})
                                : json::parse(input[1], nullptr, false);
  if (slots.is_discarded() || wire::Slots::frames_in(slots) != n) return std::nullopt;
  try {
    job.input = wire::Slots::read(slots, frames, 0);
  } catch (const wire::SlotError&) {
    return std::nullopt;
  }
  return job;
}

void JobStore::forget(const std::string& id) {
  std::vector<RedisReply> keep;
  redis_.transaction({{"SREM", active_key_, id}, {"DEL", input_key(id)}}, keep);
}

// A job's end, atomically. Under maxmemory with noeviction Redis refuses every write of a
// MULTI once it is full (EXECABORT), so the DEL that would free the input never ran and
// nothing could end. This script frees first (the input, usually the largest key), then
// writes, and is flagged allow-oom so that its writes go through. `ended_ms` is written
// once (HSETNX): the script returns 1 for the first end of the job, 0 for a repeat.
constexpr const char* kEndScript = R"lua(#!lua flags=allow-oom
local dead = ARGV[6] == '1'
if dead then
  redis.call('EXPIRE', KEYS[3], ARGV[2])
else
  redis.call('DEL', KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'state', ARGV[3], 'error', ARGV[4], 'finished_ms', ARGV[5],
           'dead_letter', ARGV[6])
local first = redis.call('HSETNX', KEYS[2], 'ended_ms', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[7])
if dead then redis.call('ZADD', KEYS[5], ARGV[5], ARGV[7]) end
if first == 1 and ARGV[8] ~= '0' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'job', ARGV[7], 'event', ARGV[3],
             'stage', ARGV[9], 'ms', ARGV[5])
end
return first
)lua";

bool JobStore::end(const std::string& id, const json& job, bool dead_letter) {
  return end_many({End{id, &job, dead_letter}}).front();
}

std::vector<bool> JobStore::end_many(const std::vector<End>& ends) {
  std::deque<std::string> text;  // Args holds views
  const auto keep = [&text](std::string s) -> std::string_view { return text.emplace_back(std::move(s)); };
  std::vector<RedisConnection::Args> cmds;
  for (const auto& e : ends) {
    const json& job = *e.job;
    cmds.push_back({"EVAL", kEndScript, "6", keep(result_key(e.id)), keep(job_key(e.id)), keep(input_key(e.id)),
                    active_key_, dead_key_, events_key_, keep(job.dump(-1, ' ', false, json::error_handler_t::replace)),
                    keep(std::to_string(e.dead_letter ? options_.dead_letter_ttl_s : options_.result_ttl_s)),
                    keep(job.value("state", "failed")), keep(job.value("error", "")),
                    keep(std::to_string(job.value("finished_ms", now_ms()))), e.dead_letter ? "1" : "0", e.id,
                    maxlen_, keep(job.value("failed_stage", ""))});
  }
  auto replies = cmds.size() == 1 ? std::vector<RedisReply>{} : redis_.pipeline(cmds);
  if (cmds.size() == 1) replies.push_back(redis_.command(cmds.front()));
  std::vector<bool> first;
  for (auto& r : replies) first.push_back(RedisConnection::as_integer(r.get(), "EVAL end") == 1);
  return first;
}

std::optional<json> JobStore::ended(const std::string& id) {
  const std::string rk = result_key(id);
  RedisReply r = redis_.command({"GET", rk});
  auto text = RedisConnection::as_optional_string(r.get(), "GET " + rk);
  if (!text) return std::nullopt;
  json j = json::parse(*text, nullptr, false);
  if (j.is_discarded()) throw IoError("redis: " + rk + " does not hold JSON");
  return j;
}

std::optional<json> JobStore::record(const std::string& id) {
  const std::string jk = job_key(id);
  RedisReply r = redis_.command({"HMGET", jk, "kind", "state", "created_ms", "attempts", "route"});
  auto f = RedisConnection::as_string_array(r.get(), "HMGET " + jk);
  if (f.size() != 5 || f[0].empty()) return std::nullopt;
  json j{{"job_id", id}, {"kind", f[0]}, {"state", f[1].empty() ? "queued" : f[1]}};
  if (!f[4].empty()) j["route"] = split_route(f[4]);
  try {
    j["created_ms"] = std::stoll(f[2]);
  } catch (...) {
  }
  return j;
}

std::vector<std::string> JobStore::dead_letters(std::size_t limit) {
  RedisReply r = redis_.command({"ZRANGE", dead_key_, "0", std::to_string(limit - 1)});
  return RedisConnection::as_string_array(r.get(), "ZRANGE " + dead_key_);
}

bool JobStore::ping() {
  try {
    redis_.command({"PING"});
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace gmi
