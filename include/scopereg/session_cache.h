// scopereg/session_cache.h
//
// SessionCache<T, Scope>: named per-scope sessions (one registry per configured name, e.g.
// one per database), with what applications write on top of a scoped registry done once:
// used-set tracking, clear_for_current_scope(), a teardown guard that commits or rolls
// back, validation and recycling of stale values, and a cap on live values per name.
//
//   scopereg::SessionCache<Db> sessions;
//   sessions.add("orders", {.factory = [] { return Db::open("orders.db"); },
//                           .close = [](Db& db) { db.close(); },
//                           .teardown = [](Db& db, bool ok) { ok ? db.commit() : db.rollback(); },
//                           .validate = [](Db& db) { return db.ping(); }});
//
//   void handle(const Request& r) {
//     scopereg::SessionCache<Db>::TeardownGuard done(sessions);  // commit/rollback + clear
//     sessions.get("orders").insert(r);
//   }
//
// Contract:
// * Names are registered up front with add(), or on first use through a resolver
//   (set_resolver) that returns the options for a name. An unknown name is a ScopeError
//   that lists the known names. A name's registry is created once; names are never removed.
// * get(name) returns the calling scope's value for that name, creating it lazily with the
//   name's factory (at most once per scope, never under a cache-wide lock).
// * used() lists the names the calling scope used, in first-use order. The record is itself
//   a per-scope value: it dies with the scope.
// * clear_for_current_scope() closes and removes every value the calling scope used, in
//   reverse order of first use, each through its close hook. A hook that throws does not
//   stop the others: every value is removed, and the returned absl::Status names every
//   failure ("orders: <what>"). Afterwards used() is empty and get() creates afresh.
//   Other scopes' values are untouched.
// * A value that dies without clear_for_current_scope() (its scope ended, or the cache was
//   destroyed) is closed through its hook too; a failure then goes to the error reporter.
// * Validation: with `validate`, a value is checked when taken (every get, or at most every
//   `validate_every`); with `max_age`, a value older than that is recycled. A value that
//   fails (false or throws) or is too old is closed through its hook (a failure is
//   reported) and re-created transparently, all inside get().
// * Pooled names: with `pool` (a scopereg::Pool<T>, pool.h), a scope's first get(name)
//   checks an object out of the pool, and the value's end -- clear_for_current_scope(),
//   a TeardownGuard (after the teardown hook), the scope's end, a failed validation --
//   checks it back in instead of destroying it. An object whose teardown hook threw, that
//   failed validation, or that invalidate(name) marked broken is discarded (closed by the
//   pool), never reused. The pool's limits replace `max_live`.
// * Invalidation: invalidate(name) drops the calling scope's value as broken ("server has
//   gone away"); the next get(name) makes or checks out a fresh one.
// * Cap: with `max_live` = N, at most N values of that name exist across all scopes; a get
//   that would create one more waits up to `acquire_timeout` for a value to be released
//   (any clear or scope end releases one), then throws ScopeError naming the name and cap.
//
// Thread safety: every member may be called concurrently from any scope, except that
// add()/set_resolver()/set_error_reporter() must not race with the destructor.
// Cost: get(name) hashes the name and probes a lock-free index, then does a registry hit;
// get(SessionName) skips the name (an interned handle from intern(), like folly's
// RequestToken); a name with validation reads the steady clock on each get. See
// benchmarks/session_cache_benchmark.cc.
// Misuse: get() with no active scope (ExplicitScope) throws ScopeError from the registry;
// a hook that re-enters the cache for the value being created throws ScopeError.

#ifndef SCOPEREG_SESSION_CACHE_H_
#define SCOPEREG_SESSION_CACHE_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/base/thread_annotations.h"
#include "scopereg/error.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/pool.h"
#include "scopereg/scoped_proxy.h"  // IWYU pragma: export (ScopedProxy was declared here first)
#include "scopereg/scoped_registry.h"

namespace scopereg {


template <typename T>
struct SessionOptions {
  std::function<T()> factory = {};                      // required, unless `pool` is set
  std::function<void(T&)> close = {};                   // before destruction; default: none
  std::function<void(T&, bool success)> teardown = {};  // at a TeardownGuard's end
  std::function<bool(T&)> validate = {};                // when taken; false means stale
  std::chrono::steady_clock::duration validate_every{0};  // 0: on every get
  std::chrono::steady_clock::duration max_age{0};         // 0: no limit
  std::size_t max_live = 0;                               // 0: no cap
  std::chrono::steady_clock::duration acquire_timeout = std::chrono::seconds(10);
  // Pooled name: values are checked out of this pool and checked back in when cleared or
  // when their scope ends (instead of being made by `factory` and destroyed). Then
  // `factory`, `close` and `max_live` must be left empty: the pool's connect, close and
  // limits apply.
  std::shared_ptr<Pool<T>> pool = {};
};

template <typename T, ScopeStrategy Scope = ThreadScope>
class SessionCache {
  class Entry;

 public:
  using Options = SessionOptions<T>;

  // An interned name: get(handle) skips hashing the name. Valid while the cache lives.
  class SessionName {
   public:
    T& operator()() const { return entry_->get(); }
    const std::string& name() const { return entry_->name(); }

   private:
    friend class SessionCache;
    explicit SessionName(Entry* entry) : entry_(entry) {}
    Entry* entry_;
  };

  explicit SessionCache(Scope scope = Scope())
      : scope_(scope),
        used_([] { return UsedList(); }, scope),
        index_(new Index()) {}
  SessionCache(const SessionCache&) = delete;
  SessionCache& operator=(const SessionCache&) = delete;

  // Destroys every name's values in every scope (closing each through its hook; failures
  // go to the error reporter).
  ~SessionCache() {
    entries_.clear();
    for (const Index* index : retired_) delete index;
    delete index_.load(std::memory_order_relaxed);
  }

  // Registers `name`. Throws ScopeError if the name exists or the factory is empty.
  void add(std::string name, Options options) {
    if (find_entry(name) == nullptr) {
      // Built outside the lock (it registers a registry: mu_ is a leaf lock).
      auto entry = make_entry(std::move(name), std::move(options));
      internal::MutexLock lock(mu_);
      if (find_entry(entry->name()) == nullptr) {
        publish_locked(std::move(entry));
        return;
      }
      name = entry->name();
    }
    throw ScopeError("scopereg: SessionCache::add: '" + name +
                     "' is already registered; each name is added once");
  }

  // Options for names not added up front, asked once per name on its first use; return
  // nullopt for a name that does not exist.
  void set_resolver(std::function<std::optional<Options>(std::string_view)> resolver) {
    internal::MutexLock lock(mu_);
    resolver_ = std::move(resolver);
  }

  // Where failures that cannot be returned go (a close hook failing at scope end, a
  // TeardownGuard's failures). Default: one line on stderr.
  void set_error_reporter(std::function<void(const absl::Status&)> reporter) {
    internal::MutexLock lock(reporter_mu_);
    reporter_ = std::move(reporter);
  }

  // The calling scope's value for `name`, created on first use (see the file comment).
  T& get(std::string_view name) { return entry_for(name).get(); }
  T& get(const SessionName& name) { return name.entry_->get(); }

  // The handle of `name` (resolving it if needed). Throws ScopeError for an unknown name.
  SessionName intern(std::string_view name) { return SessionName(&entry_for(name)); }

  // The names the calling scope used, in first-use order. Empty with no active scope.
  std::vector<std::string> used() const {
    std::vector<std::string> names;
    if (const UsedList* list = used_.find()) {
      for (Entry* e : *list) names.push_back(e->name());
    }
    return names;
  }

  // Closes and removes every value the calling scope used, in reverse order of first use.
  // Never stops half-way; returns OK or a status naming every failure.
  absl::Status clear_for_current_scope() {
    std::vector<std::string> failures;
    clear_used(failures, nullptr);
    return to_status(failures);
  }

  // Marks the calling scope's value for `name` broken (say, the database reported
  // "server has gone away"): it is removed now -- closed, or for a pooled name discarded by
  // its pool instead of reused -- and the scope's next get(name) makes or checks out a
  // fresh one. The name stays in used(). A no-op when the scope has no value for `name`.
  // Returns a status naming a close failure, if any. Throws ScopeError for an unknown name.
  absl::Status invalidate(std::string_view name) { return invalidate(intern(name)); }
  absl::Status invalidate(const SessionName& name) {
    std::string error;
    if (name.entry_->invalidate(&error)) return absl::OkStatus();
    return absl::UnknownError(name.name() + ": close failed: " + error);
  }

  // TeardownGuard
  //
  // The end of a unit of work (Flask's teardown_appcontext): on destruction, calls every
  // used name's teardown hook with whether the work succeeded (no exception escaped the
  // guard's scope, and fail() was not called), in reverse order of first use, then
  // clear_for_current_scope(). Never throws: failures go to the cache's error reporter.
  class TeardownGuard {
   public:
    explicit TeardownGuard(SessionCache& cache)
        : cache_(cache), exceptions_(std::uncaught_exceptions()) {}
    TeardownGuard(const TeardownGuard&) = delete;
    TeardownGuard& operator=(const TeardownGuard&) = delete;
    ~TeardownGuard() {
      const bool success = !failed_ && std::uncaught_exceptions() == exceptions_;
      std::vector<std::string> failures;
      cache_.clear_used(failures, &success);
      if (!failures.empty()) cache_.report(to_status(failures));
    }
    // Marks the work as failed: teardown hooks are told success = false.
    void fail() { failed_ = true; }

   private:
    SessionCache& cache_;
    const int exceptions_;
    bool failed_ = false;
  };

 private:
  using Clock = std::chrono::steady_clock;
  using UsedList = std::vector<Entry*>;
  using Index = absl::flat_hash_map<std::string_view, Entry*>;

  // Caps live values of one name.
  class Limiter {
   public:
    void acquire(const Entry& entry) {
      const Options& o = entry.options();
      if (o.max_live == 0) return;
      const auto deadline = Clock::now() + o.acquire_timeout;
      internal::MutexLock lock(mu_);
      while (live_ >= o.max_live) {
        if (cv_.wait_until(mu_, deadline) || live_ < o.max_live) continue;
        throw ScopeError("scopereg: SessionCache: '" + entry.name() + "' is at its cap of " +
                         std::to_string(o.max_live) +
                         " live values and none was released within the acquire_timeout; "
                         "release values sooner (clear_for_current_scope) or raise max_live");
      }
      ++live_;
    }
    void release(const Entry& entry) {
      if (entry.options().max_live == 0) return;
      internal::MutexLock lock(mu_);
      --live_;
      cv_.notify_one();  // under the mutex, as CondVar requires
    }

   private:
    internal::ForkSafeMutex mu_;
    internal::CondVar cv_;
    std::size_t live_ ABSL_GUARDED_BY(mu_) = 0;
  };

  // One value with its bookkeeping: a T built in place (T need not be movable), or, for a
  // pooled name, a lease on a pooled T.
  class Slot {
   public:
    explicit Slot(Entry* entry) : entry_(entry), permit_(entry) {
      if (const auto& pool = entry->options().pool) {
        lease_ = pool->checkout();
        value_ = &*lease_;
      } else {
        value_ = ::new (static_cast<void*>(storage_)) T(entry->options().factory());
      }
    }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() {
      if (!closed_ && !lease_) {
        std::string error;
        if (!entry_->close_value(*value_, &error)) {
          entry_->cache().report(absl::UnknownError(entry_->name() + ": close failed: " + error));
        }
      }
      if (!lease_) value_->~T();
      // A lease returns its object to the pool here (reset_on_return, then kept or closed).
    }

    T& value() { return *value_; }
    // Runs the close hook once; false (with `error`) if it threw. A pooled value is not
    // closed: it goes back to its pool when the Slot is destroyed.
    bool close(std::string* error) {
      closed_ = true;
      if (lease_) return true;
      return entry_->close_value(*value_, error);
    }
    // The value must not be reused: a pooled one is closed by its pool on return.
    void mark_broken() {
      if (lease_) lease_.invalidate();
    }
    bool stale() {
      const Options& o = entry_->options();
      const Clock::time_point now = Clock::now();
      if (o.max_age != Clock::duration::zero() && now - created_ > o.max_age) return true;
      if (!o.validate || now - checked_ < o.validate_every) return false;
      checked_ = now;
      try {
        return !o.validate(*value_);
      } catch (...) {
        internal::rethrow_if_unwinding();
        return true;
      }
    }

   private:
    struct Permit {
      explicit Permit(Entry* e) : entry(e) { e->limiter().acquire(*e); }
      ~Permit() { entry->limiter().release(*entry); }
      Entry* entry;
    };
    Entry* entry_;
    Permit permit_;  // before the value: released after it is destroyed, also if T() throws
    typename Pool<T>::Lease lease_;
    alignas(T) unsigned char storage_[sizeof(T)];
    T* value_ = nullptr;
    const Clock::time_point created_ = Clock::now();
    Clock::time_point checked_ = created_;
    bool closed_ = false;
  };

  class Entry {
   public:
    Entry(SessionCache* cache, std::string name, Options options)
        : cache_(cache),
          name_(std::move(name)),
          options_(std::move(options)),
          checks_(options_.validate != nullptr ||
                  options_.max_age != Clock::duration::zero()),
          registry_([this] { return make_slot(); }, cache->scope_,
                    "SessionCache session '" + name_ + "'") {}

    const std::string& name() const { return name_; }
    const Options& options() const { return options_; }
    SessionCache& cache() { return *cache_; }
    Limiter& limiter() { return limiter_; }

    // The hit is kept inline (a call here would double its cost); misses go out of line.
    [[gnu::always_inline]] T& get() {
      Slot& slot = registry_();
      if (!checks_ || !slot.stale()) [[likely]] return slot.value();
      return recycle(slot);
    }

    // Closes and removes the calling scope's value; false (with `error`) if close threw.
    bool close_and_remove(std::string* error) {
      Slot* slot = registry_.find();
      if (slot == nullptr) return true;
      const bool ok = slot->close(error);
      registry_.clear();
      return ok;
    }

    bool teardown(bool success, std::string* error) {
      Slot* slot = registry_.find();
      if (slot == nullptr || !options_.teardown) return true;
      try {
        options_.teardown(slot->value(), success);
        return true;
      } catch (...) {
        internal::rethrow_if_unwinding();
        *error = internal::describe_current_exception();
        slot->mark_broken();  // a pooled object in an unknown state is not reused
        return false;
      }
    }

    // Discards the calling scope's value as broken; false (with `error`) if close threw.
    bool invalidate(std::string* error) {
      Slot* slot = registry_.find();
      if (slot == nullptr) return true;
      slot->mark_broken();
      return close_and_remove(error);
    }

    bool close_value(T& value, std::string* error) {
      if (!options_.close) return true;
      try {
        options_.close(value);
        return true;
      } catch (...) {
        internal::rethrow_if_unwinding();
        *error = internal::describe_current_exception();
        return false;
      }
    }

    std::int64_t live() const { return registry_.size(); }

   private:
    [[gnu::noinline]] T& recycle(Slot& stale) {
      std::string error;
      stale.mark_broken();
      if (!stale.close(&error)) {
        cache_->report(absl::UnknownError(name_ + ": close of a stale value failed: " + error));
      }
      registry_.clear();
      return registry_().value();
    }

    Slot make_slot() {
      cache_->note_used(this);
      return Slot(this);
    }

    SessionCache* cache_;
    const std::string name_;
    const Options options_;
    const bool checks_;
    Limiter limiter_;
    ScopedRegistry<Slot, Scope> registry_;
  };

  // Lock-free look-up: the index is immutable once published; a new name publishes a
  // copy, and old copies are kept until the cache dies (names are few and never removed).
  Entry* find_entry(std::string_view name) const {
    const Index* index = index_.load(std::memory_order_acquire);
    auto it = index->find(name);
    return it == index->end() ? nullptr : it->second;
  }

  Entry& entry_for(std::string_view name) {
    if (Entry* e = find_entry(name)) [[likely]] return *e;
    return resolve(name);
  }

  [[gnu::noinline]] Entry& resolve(std::string_view name) {
    std::function<std::optional<Options>(std::string_view)> resolver;
    {
      internal::MutexLock lock(mu_);
      if (Entry* e = find_entry(name)) return *e;
      resolver = resolver_;
    }
    std::optional<Options> options;
    if (resolver) options = resolver(name);  // outside the lock: it may be slow
    std::unique_ptr<Entry> entry;
    if (options) entry = make_entry(std::string(name), std::move(*options));
    internal::MutexLock lock(mu_);
    if (Entry* e = find_entry(name)) return *e;  // resolved concurrently
    if (!entry) {
      std::string known;
      for (const auto& e : entries_) known += (known.empty() ? "" : ", ") + e->name();
      throw ScopeError("scopereg: SessionCache: unknown session name '" + std::string(name) +
                       "'; known names: " + (known.empty() ? "(none)" : known) +
                       ". Register it with add(), or set a resolver");
    }
    return publish_locked(std::move(entry));
  }

  std::unique_ptr<Entry> make_entry(std::string name, Options options) {
    if (options.pool) {
      if (options.factory || options.close || options.max_live != 0) {
        throw ScopeError("scopereg: SessionCache: '" + name +
                         "' has a pool: leave factory, close and max_live empty (the "
                         "pool's connect, close and limits apply)");
      }
    } else if (!options.factory) {
      throw ScopeError("scopereg: SessionCache: '" + name + "' needs a factory (or a pool)");
    }
    return std::make_unique<Entry>(this, std::move(name), std::move(options));
  }

  Entry& publish_locked(std::unique_ptr<Entry> entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const Index* old = index_.load(std::memory_order_relaxed);
    auto* next = new Index(*old);
    next->emplace(entry->name(), entry.get());
    entries_.push_back(std::move(entry));
    index_.store(next, std::memory_order_release);
    retired_.push_back(old);
    return *entries_.back();
  }

  void note_used(Entry* entry) {
    UsedList& list = used_();
    if (std::find(list.begin(), list.end(), entry) == list.end()) list.push_back(entry);
  }

  // Teardown hooks (when `success` is given), then close + remove, both in reverse order
  // of first use; every failure is collected, nothing stops the loop.
  void clear_used(std::vector<std::string>& failures, const bool* success) {
    UsedList* list = used_.find();
    if (list == nullptr) return;
    const UsedList names = std::move(*list);
    list->clear();
    std::string error;
    if (success != nullptr) {
      for (auto it = names.rbegin(); it != names.rend(); ++it) {
        if (!(*it)->teardown(*success, &error)) {
          failures.push_back((*it)->name() + ": teardown failed: " + error);
        }
      }
    }
    for (auto it = names.rbegin(); it != names.rend(); ++it) {
      if (!(*it)->close_and_remove(&error)) {
        failures.push_back((*it)->name() + ": close failed: " + error);
      }
    }
  }

  static absl::Status to_status(const std::vector<std::string>& failures) {
    if (failures.empty()) return absl::OkStatus();
    std::string message = std::to_string(failures.size()) + " failure(s): ";
    for (std::size_t i = 0; i < failures.size(); ++i) {
      message += (i ? "; " : "") + failures[i];
    }
    return absl::UnknownError(message);
  }

  void report(const absl::Status& status) {
    std::function<void(const absl::Status&)> reporter;
    {
      internal::MutexLock lock(reporter_mu_);
      reporter = reporter_;
    }
    internal::report_to(reporter, status);
  }


  internal::ForkSafeMutex reporter_mu_;
  std::function<void(const absl::Status&)> reporter_ ABSL_GUARDED_BY(reporter_mu_);
  Scope scope_;
  ScopedRegistry<UsedList, Scope> used_;
  internal::ForkSafeMutex mu_;  // serialises adding names (a leaf lock)
  std::function<std::optional<Options>(std::string_view)> resolver_ ABSL_GUARDED_BY(mu_);
  std::atomic<const Index*> index_;
  std::vector<const Index*> retired_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);  // append only
};

}  // namespace scopereg

#endif  // SCOPEREG_SESSION_CACHE_H_
