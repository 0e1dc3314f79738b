#include "persister.hpp"

#include <chrono>
#include <map>
#include <set>

#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/wire.hpp"

namespace gmi::detail {

using nlohmann::json;

Persister::Persister(zmq::context_t& context, PersisterOptions options)
    : context_(context),
      options_(std::move(options)),
      wake_endpoint_("inproc://gmi-persister-" + wire::random_id()),
      wake_rx_(context, zmq::socket_type::pair) {
  if (options_.max_group < 1) options_.max_group = 1;
  wake_rx_.set(zmq::sockopt::linger, 0);
  wake_rx_.bind(wake_endpoint_);
  thread_ = std::thread([this] { loop(); });
}

Persister::~Persister() {
  {
    std::lock_guard lock(mutex_);
    quit_ = true;
    // The broker drained what it could (broker.drain_timeout_ms): what is left waits on a
    // Redis that does not answer. The jobs stay active there, and the next broker runs them.
    if (!requests_.empty()) {
      log::warn("stopping with requests Redis did not take; their jobs stay active for the next broker",
                {{"requests", requests_.size()}});
      requests_.clear();
    }
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Persister::post(PersistRequest request) {
  {
    std::lock_guard lock(mutex_);
    requests_.push_back(std::move(request));
  }
  cv_.notify_one();
}

std::vector<PersistDone> Persister::take() {
  zmq::message_t token;
  while (wake_rx_.recv(token, zmq::recv_flags::dontwait)) {
  }
  std::lock_guard lock(mutex_);
  std::vector<PersistDone> out;
  out.swap(completions_);
  return out;
}

std::size_t Persister::backlog() const {
  std::lock_guard lock(mutex_);
  return requests_.size() + in_progress_ + completions_.size();
}

std::string Persister::not_ready_reason() const {
  std::lock_guard lock(mutex_);
  return not_ready_;
}

bool Persister::connect() {
  if (store_) return true;
  try {
    store_.emplace(options_.location, options_.store);
    return true;
  } catch (const Error& e) {
    std::lock_guard lock(mutex_);
    not_ready_ = std::string("redis unreachable: ") + e.what();
    return false;
  }
}

void Persister::check_redis() {
  std::string why;
  if (!connect()) return;  // connect() said why
  if (!store_->ping()) why = "redis unreachable: no answer to PING at " + options_.location.endpoint();
  std::lock_guard lock(mutex_);
  not_ready_ = why;
}

void Persister::loop() {
  zmq::socket_t wake_tx(context_, zmq::socket_type::pair);
  wake_tx.set(zmq::sockopt::linger, 0);
  wake_tx.connect(wake_endpoint_);
  for (;;) {
    std::vector<PersistRequest> group;
    {
      std::unique_lock lock(mutex_);
      // Idle for a second: see that Redis still answers, so that readiness tells the truth
      // when nothing else would have found out.
      if (!cv_.wait_for(lock, std::chrono::seconds(1), [&] { return quit_ || !requests_.empty(); })) {
        lock.unlock();
        check_redis();
        continue;
      }
      if (requests_.empty()) return;  // quit, with everything posted served
      while (!requests_.empty() && group.size() < options_.max_group) {
        group.push_back(std::move(requests_.front()));
        requests_.pop_front();
      }
      in_progress_ = group.size();
    }
    std::vector<PersistDone> done;
    serve(group, done);
    {
      std::lock_guard lock(mutex_);
      for (auto& d : done) completions_.push_back(std::move(d));
      in_progress_ = 0;
    }
    wake_tx.send(zmq::str_buffer("done"), zmq::send_flags::dontwait);
  }
}

// Serves a group in order, running consecutive requests of one kind together: a creation
// never overtakes an end posted before it, nor the other way round.
void Persister::serve(std::vector<PersistRequest>& group, std::vector<PersistDone>& done) {
  std::size_t i = 0;
  while (i < group.size()) {
    const std::size_t kind = group[i].index();
    std::size_t j = i;
    while (j < group.size() && group[j].index() == kind) ++j;
    if (std::holds_alternative<CreateRequest>(group[i])) {
      std::vector<CreateRequest> creates;
      for (std::size_t k = i; k < j; ++k) creates.push_back(std::move(std::get<CreateRequest>(group[k])));
      create_group(creates, done);
    } else if (std::holds_alternative<EndRequest>(group[i])) {
      std::vector<EndRequest> ends;
      for (std::size_t k = i; k < j; ++k) ends.push_back(std::move(std::get<EndRequest>(group[k])));
      end_group(ends, done);
    } else if (std::holds_alternative<EventRequest>(group[i])) {
      std::vector<EventRequest> events;
      for (std::size_t k = i; k < j; ++k) events.push_back(std::move(std::get<EventRequest>(group[k])));
      events_group(events);
    } else {
      for (std::size_t k = i; k < j; ++k) {
        if (auto* read = std::get_if<ReadRequest>(&group[k])) {
          ReadDone d{std::move(*read), std::nullopt, ""};
          try {
            if (!connect()) throw IoError(not_ready_reason());
            d.job = store_->ended(d.request.id);
            if (!d.job) d.job = store_->record(d.request.id);
          } catch (const IoError& e) {
            d.error = e.what();
          }
          done.emplace_back(std::move(d));
        } else if (auto* rec = std::get_if<RecoverRequest>(&group[k])) {
          RecoverDone d;
          try {
            if (!connect()) throw IoError(not_ready_reason());
            const std::set<std::string> held(rec->held.begin(), rec->held.end());
            for (const auto& id : store_->active_ids()) {
              if (held.count(id) != 0) continue;
              auto stored = store_->load(id);
              if (!stored) {
                log::warn("dropping an active job whose record is gone", {{"job_id", id}});
                store_->forget(id);
                continue;
              }
              d.jobs.push_back(std::move(*stored));
            }
            d.ok = true;
            std::lock_guard lock(mutex_);
            not_ready_.clear();
          } catch (const IoError& e) {
            d.error = e.what();
          }
          done.emplace_back(std::move(d));
        }
      }
    }
    i = j;
  }
}

void Persister::create_group(std::vector<CreateRequest>& creates, std::vector<PersistDone>& done) {
  std::vector<CreateDone> out;
  for (auto& c : creates) out.push_back(CreateDone{std::move(c), CreateOutcome::kUnavailable, "", ""});
  const auto unavailable = [&](const std::vector<std::size_t>& which, const std::string& why) {
    for (auto i : which) {
      out[i].outcome = CreateOutcome::kUnavailable;
      out[i].error = "cannot record the job: " + why;
    }
  };
  std::vector<std::size_t> all;
  for (std::size_t i = 0; i < out.size(); ++i) all.push_back(i);
  if (!connect()) {
    unavailable(all, not_ready_reason());
    for (auto& d : out) done.emplace_back(std::move(d));
    return;
  }
  try {
    // 1. Idempotency: keys seen before (in Redis, or earlier in this group) name their job.
    std::vector<std::pair<std::string, std::string>> keys;
    std::vector<std::size_t> keyed;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto& idem = out[i].request.idem;
      if (idem.key.empty()) continue;
      keys.emplace_back(idem.scope, idem.key);
      keyed.push_back(i);
    }
    const auto found = keys.empty() ? std::vector<std::optional<IdempotencyRecord>>{}
                                    : store_->find_idempotent_many(keys);
    std::map<std::pair<std::string, std::string>, std::size_t> first_in_group;
    std::vector<std::size_t> to_create;
    std::vector<bool> resolved(out.size(), false);
    for (std::size_t k = 0; k < keyed.size(); ++k) {
      CreateDone& d = out[keyed[k]];
      std::optional<IdempotencyRecord> existing = found[k];
      if (!existing) {
        auto [it, inserted] = first_in_group.emplace(keys[k], keyed[k]);
        if (!inserted) {
          const CreateDone& first = out[it->second];
          existing = IdempotencyRecord{d.request.idem.scope, d.request.idem.key, first.request.idem.fingerprint,
                                       first.request.job.id};
        }
      }
      if (!existing) continue;
      resolved[keyed[k]] = true;
      if (existing->fingerprint != d.request.idem.fingerprint) {
        d.outcome = CreateOutcome::kConflict;
        d.error = "the idempotency key '" + d.request.idem.key + "' already named another " + d.request.job.kind +
                  " request (other images or parameters) within redis.result_ttl_s; use a new key for a new request";
      } else {
        d.outcome = CreateOutcome::kExisting;
        d.job_id = existing->job_id;
      }
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (!resolved[i]) to_create.push_back(i);
    }
    if (to_create.empty()) {
      for (auto& d : out) done.emplace_back(std::move(d));
      return;
    }
    // 2. Uploads are numbered in the order they are accepted (after the idempotency check,
    // so that a retry keeps its number): the spec stage fences its write with it.
    std::uint64_t uploads = 0;
    for (auto i : to_create) uploads += out[i].request.job.kind == "upload" ? 1 : 0;
    if (uploads > 0) {
      std::uint64_t seq = store_->reserve_upload_seqs(uploads);
      for (auto i : to_create) {
        if (out[i].request.job.kind == "upload") out[i].request.job.params["upload_seq"] = seq++;
      }
    }
    // 3. Every record of the group in one transaction.
    std::vector<const StoredJob*> jobs;
    std::vector<const IdempotencyRecord*> idems;
    for (auto i : to_create) {
      jobs.push_back(&out[i].request.job);
      idems.push_back(&out[i].request.idem);
    }
    try {
      store_->create_many(jobs, idems);
      for (auto i : to_create) out[i].outcome = CreateOutcome::kCreated;
    } catch (const RedisOutcomeUnknown& e) {
      // Sent, no answer: read back before telling the clients anything.
      std::vector<std::string> ids;
      for (auto i : to_create) ids.push_back(out[i].request.job.id);
      try {
        const auto there = store_->exist(ids);
        for (std::size_t k = 0; k < to_create.size(); ++k) {
          if (there[k]) {
            out[to_create[k]].outcome = CreateOutcome::kCreated;
            log::info("a job recorded despite a lost reply was accepted", {{"job_id", ids[k]}});
          } else {
            unavailable({to_create[k]}, e.what());
          }
        }
      } catch (const IoError&) {
        unavailable(to_create, std::string(e.what()) +
                                   "; and it cannot be read back (the job, if it was recorded, will be "
                                   "adopted within broker.reconcile_s)");
      }
    }
    std::lock_guard lock(mutex_);
    not_ready_.clear();
  } catch (const IoError& e) {
    std::vector<std::size_t> pending;
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (out[i].outcome == CreateOutcome::kUnavailable) pending.push_back(i);
    }
    unavailable(pending, e.what());
    if (dynamic_cast<const RedisUnreachable*>(&e) != nullptr) {
      std::lock_guard lock(mutex_);
      not_ready_ = std::string("redis unreachable: ") + e.what();
    }
  }
  for (auto& d : out) done.emplace_back(std::move(d));
}

void Persister::end_group(std::vector<EndRequest>& ends, std::vector<PersistDone>& done) {
  // Usually every end goes through: all of them in one round trip.
  if (ends.size() > 1 && connect()) {
    std::vector<JobStore::End> all;
    for (const auto& e : ends) all.push_back(JobStore::End{e.id, &e.end, e.dead_letter});
    try {
      const std::vector<bool> first = store_->end_many(all);
      for (std::size_t i = 0; i < ends.size(); ++i) done.emplace_back(EndDone{ends[i].id, true, true, !first[i], ""});
      std::lock_guard lock(mutex_);
      not_ready_.clear();
      return;
    } catch (const Error&) {
      // One was refused, or Redis went away: one by one, to know which (ends are idempotent).
    }
  }
  for (std::size_t i = 0; i < ends.size(); ++i) {
    const EndRequest& e = ends[i];
    EndDone d{e.id, false, true, false, ""};
    try {
      if (!connect()) throw RedisUnreachable(not_ready_reason());
      d.repeat = !store_->end(e.id, e.end, e.dead_letter);
      d.saved = true;
      std::lock_guard lock(mutex_);
      not_ready_.clear();
    } catch (const RedisUnreachable& ex) {
      d.reachable = false;
      d.error = ex.what();
      std::lock_guard lock(mutex_);
      not_ready_ = std::string("redis unreachable: ") + ex.what();
    } catch (const RedisNotApplied& ex) {
      d.error = ex.what();  // Redis answered and refused (e.g. out of memory): this one only
    } catch (const Error& ex) {
      d.reachable = false;
      d.error = ex.what();
    }
    // Redis is away: the rest of the group would only wait out the same timeout each.
    const bool away = !d.reachable;
    const std::string why = d.error;
    done.emplace_back(std::move(d));
    if (away) {
      for (std::size_t k = i + 1; k < ends.size(); ++k) done.emplace_back(EndDone{ends[k].id, false, false, false, why});
      return;
    }
  }
}

void Persister::events_group(const std::vector<EventRequest>& events) {
  if (!connect()) return;  // best effort: the record and the end carry what must not be lost
  std::vector<std::array<std::string, 3>> rows;
  for (const auto& e : events) rows.push_back({e.id, e.event, e.stage});
  try {
    store_->append_events(rows);
  } catch (const IoError& e) {
    log::warn("cannot append job events", {{"events", rows.size()}, {"error", e.what()}});
  }
}

}  // namespace gmi::detail
