#pragma once
// A ZAP handler (ZeroMQ RFC 27) for the broker's CURVE sockets: a connecting peer is let in
// only if its public key is in an allow-list, the key files of one directory (what
// `gmi keygen` writes: KEY holds "public ..." and "secret ...", KEY.pub only "public ...").
// The list is read at start and again on request (SIGHUP), as zmq's zauth does.
// Thread-safety: request_reload() and allowed() from any thread; the handler runs on its own.
#include <atomic>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include <zmq.hpp>

namespace gmi::detail {

class ZapAuthenticator {
 public:
  /// Binds inproc://zeromq.zap.01 on `context` (before any CURVE socket accepts a peer)
  /// and starts serving. Throws InputError when the directory holds no usable key.
  ZapAuthenticator(zmq::context_t& context, std::filesystem::path dir);
  ~ZapAuthenticator();
  ZapAuthenticator(const ZapAuthenticator&) = delete;
  ZapAuthenticator& operator=(const ZapAuthenticator&) = delete;

  /// Re-read the directory (on the handler's thread, within a fraction of a second).
  void request_reload() { reload_ = true; }
  std::size_t allowed() const;

 private:
  std::set<std::string> read_keys() const;
  void loop();
  void answer(const std::vector<zmq::message_t>& request);

  std::filesystem::path dir_;
  zmq::socket_t socket_;
  mutable std::mutex mutex_;
  std::set<std::string> keys_;  // Z85 public keys
  std::atomic<bool> stop_{false}, reload_{false};
  std::thread thread_;
};

}  // namespace gmi::detail
