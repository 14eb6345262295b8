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
// A scope shared by several threads (an ExplicitScope token active on several threads,
// work posted with wrap()) is one scope: its threads get the same value per name, so T
// must be safe for the concurrent use they make of it. Its threads may call get(),
// intern() and used() at once: every name any of them uses first is recorded once in
// used() (and so is closed by a clear); a value found stale or too old is closed and
// replaced once, by the thread that found it, while the scope's other threads getting
// that name wait and then get the replacement. What ends a value ends it for all of the
// scope's threads: a reference taken earlier, on any thread, must not be used after
// another thread's get() replaced it, or after clear_for_current_scope(), invalidate() or
// a TeardownGuard removed it. Call those three once the scope's other threads are done
// with the cache (as at the end of a request): overlapping them with the scope's other
// threads' calls on the same names is a race.
// Cost: get(name) hashes the name and probes a lock-free index, then does a registry hit;
// get(SessionName) skips the name (an interned handle from intern(), like folly's
// RequestToken); a name with validation or max_age reads the steady clock on each get.
// No get of an existing value takes a lock; one that runs the validate hook (or replaces
// the value) also claims the value with one atomic compare-and-swap. See
// benchmarks/session_cache_benchmark.cc.
// Misuse: get() with no active scope (ExplicitScope) throws ScopeError from the registry;
// a hook that re-enters the cache for the value being created, checked or replaced throws
// ScopeError (inside a validate hook, that counts as a failed check). A scopereg Fiber
// waiting for another thread of its scope to finish checking a value yields in a loop:
// alone on its thread, it polls until then.

#ifndef SCOPEREG_SESSION_CACHE_H_
#define SCOPEREG_SESSION_CACHE_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/base/thread_annotations.h"
#include "scopereg/error.h"
#include "scopereg/internal/context_state.h"
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
      internal::MutexLock lock(used_mu_);  // another thread of the scope may be adding
      for (Entry* e : *list) names.push_back(e->name());
    }
    return names;
  }

  // Closes and removes every value the calling scope used, in reverse order of first use.
  // Never stops half-way; returns OK or a status naming every failure.
  absl::Status clear_for_current_scope() {
    Failures failures;
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
  // clear_for_current_scope(). Never throws: failures go to the cache's error reporter
  // (with no memory left to describe them, a line on stderr says so; every value is still
  // torn down and closed).
  class TeardownGuard {
   public:
    explicit TeardownGuard(SessionCache& cache)
        : cache_(cache), exceptions_(std::uncaught_exceptions()) {}
    TeardownGuard(const TeardownGuard&) = delete;
    TeardownGuard& operator=(const TeardownGuard&) = delete;
    ~TeardownGuard() {
      const bool success = !failed_ && std::uncaught_exceptions() == exceptions_;
      Failures failures;
      cache_.clear_used(failures, &success);
      cache_.report(failures);
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
  // Not absl::flat_hash_map: Debian's Abseil (20220623) leaves one corrupt when the
  // allocation for its growth throws; a name added with no memory left must fail cleanly.
  using Index = std::unordered_map<std::string_view, Entry*>;

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

  // One scope's value of one name, with its bookkeeping: a T built in place (T need not be
  // movable), or, for a pooled name, a lease on a pooled T.
  //
  // The Slot lives as long as the scope's registry entry; recycling a stale value replaces
  // the value inside it. Replacing the Slot itself (registry clear + create) would free it
  // under the other threads of a shared scope that are checking it at that moment.
  //
  // Only the thread that claims the slot (refresh(): makes `seq_` odd) checks, closes or
  // replaces the value; the scope's other threads wait for it, so a stale value is closed
  // once and everyone gets its replacement. The hit path (quick()) takes no claim: it reads
  // value_, created_ and checked_ between two reads of `seq_`, as a seqlock reader, so that
  // it never pairs the value of one generation with the timestamps of another (a new
  // checked_ with the old value would pass it off as checked). lease_, storage_ and
  // closed_ are touched only under the claim, on construction, or by the operations that
  // end the value (close(), mark_broken(), the destructor), which the file comment says
  // not to overlap with the scope's other threads.
  class Slot {
   public:
    // Throws what the factory (or the pool, or the cap) throws: nothing is stored.
    explicit Slot(Entry* entry) : entry_(entry) { make(); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() {
      if (value_.load(std::memory_order_relaxed) != nullptr) drop();
    }

    // Only for names without checks: their value is never replaced, so it is always there.
    T& value() { return *value_.load(std::memory_order_relaxed); }
    // The value, or null after a replacement whose factory threw (until the next get).
    T* find() { return value_.load(std::memory_order_relaxed); }

    // The value if nothing is due: no other thread is checking or replacing it, it is not
    // too old, and no validation is due. Null sends the caller to refresh(). Inline and
    // lock-free: it is the hit path of a name with checks.
    T* quick() const {
      const std::uint32_t seq = seq_.load(std::memory_order_acquire);
      if (seq & 1) return nullptr;  // claimed: being checked or replaced
      // Acquire loads, matched by release stores: whatever they read from a claim that
      // began after `seq` was read, the second read of seq_ below sees that claim.
      T* const value = value_.load(std::memory_order_acquire);
      if (value == nullptr) return nullptr;
      const Clock::time_point now = Clock::now();
      if (too_old(now, created_.load(std::memory_order_acquire)) ||
          validation_due(now, checked_.load(std::memory_order_acquire))) {
        return nullptr;
      }
      // Ordered after the acquire loads above.
      if (seq_.load(std::memory_order_relaxed) != seq) return nullptr;
      return value;
    }

    // The slow path of a name with checks: claims the slot (waiting while another thread
    // of the scope holds it), then validates the value, or closes and replaces it when it
    // is stale, too old, or missing. Throws what the factory throws (the slot is then
    // empty, and the next get retries), and ScopeError when a hook re-enters get() for
    // the value it is checking or making (it would wait for itself).
    [[gnu::noinline]] T& refresh() {
      const void* const self = internal::current_context_id();
      std::uint32_t seq = seq_.load(std::memory_order_acquire);
      std::uint32_t claimed = 0;  // the odd value of seq_ our claim holds
      for (;;) {
        if ((seq & 1) == 0) {
          note_claimant();
          if (seq_.compare_exchange_weak(seq, seq + 1, std::memory_order_acq_rel)) {
            claimed = seq + 1;
            break;
          }
          continue;  // `seq` now holds the current value
        }
        if (claim_lost_in_fork()) {
          // A forked child: the holder was a thread that is gone, and never lets go. The
          // value is checked (or made) afresh by whoever takes the claim over.
          note_claimant();
          if (seq_.compare_exchange_strong(seq, seq + 2, std::memory_order_acq_rel)) {
            claimed = seq + 2;
            break;
          }
          continue;
        }
        if (owner_.load(std::memory_order_relaxed) == self) {
          throw ScopeError("scopereg: SessionCache session '" + entry_->name() +
                           "': a hook (factory, validate or close) called get() for the "
                           "value it is checking or making; it would wait for itself");
        }
        // Inside a scopereg Fiber, yield: the holder may be a fiber of this thread whose
        // factory yields, and a blocked thread would never resume it.
        if (internal::can_yield()) {
          internal::yield_now();
        } else {
          seq_.wait(seq, std::memory_order_acquire);
        }
        if (T* value = quick()) return *value;  // checked or replaced by the other thread
        seq = seq_.load(std::memory_order_acquire);
      }
      owner_.store(self, std::memory_order_relaxed);
      Claim claim(this, claimed + 1);  // released also when the factory throws
      const Clock::time_point now = Clock::now();
      T* const value = value_.load(std::memory_order_relaxed);
      if (value != nullptr && !too_old(now, created_.load(std::memory_order_relaxed))) {
        if (!validation_due(now, checked_.load(std::memory_order_relaxed))) {
          return *value;  // checked by another thread while this one waited
        }
        if (passes_validation(*value)) {
          checked_.store(now, std::memory_order_release);
          return *value;
        }
      }
      if (value != nullptr) retire();
      make();
      return *value_.load(std::memory_order_relaxed);
    }

    // Runs the close hook once; false (with `error`) if it threw. A pooled value is not
    // closed: it goes back to its pool when dropped. True when there is no value.
    bool close(std::string* error) {
      T* const value = value_.load(std::memory_order_relaxed);
      if (value == nullptr) return true;
      closed_ = true;
      if (lease_) return true;
      return entry_->close_value(*value, error);
    }
    // The value must not be reused: a pooled one is closed by its pool on return.
    void mark_broken() {
      if (lease_) lease_.invalidate();
    }

   private:
    // Who is about to claim the slot, written before the claim's compare-and-swap (which
    // publishes it): a thread that sees the claim sees these, or newer ones of a live
    // thread that tried at the same time.
    void note_claimant() {
      owner_thread_.store(internal::current_thread_serial(), std::memory_order_relaxed);
      owner_fork_.store(internal::g_fork_generation.load(std::memory_order_relaxed),
                        std::memory_order_relaxed);
    }
    // In a forked child: whether the claim was taken before the fork by a thread that is
    // gone (not the one that forked).
    bool claim_lost_in_fork() const {
      return owner_fork_.load(std::memory_order_relaxed) !=
                 internal::g_fork_generation.load(std::memory_order_relaxed) &&
             internal::thread_gone_in_child(owner_thread_.load(std::memory_order_relaxed));
    }

    // Releases the claim of refresh() and wakes the threads waiting for it.
    class Claim {
     public:
      Claim(Slot* slot, std::uint32_t next) : slot_(slot), next_(next) {}
      Claim(const Claim&) = delete;
      Claim& operator=(const Claim&) = delete;
      ~Claim() {
        slot_->owner_.store(nullptr, std::memory_order_relaxed);
        slot_->seq_.store(next_, std::memory_order_release);
        slot_->seq_.notify_all();  // no system call when no thread waits
      }

     private:
      Slot* const slot_;
      const std::uint32_t next_;  // even: free
    };

    bool too_old(Clock::time_point now, Clock::time_point created) const {
      const Options& o = entry_->options();
      return o.max_age != Clock::duration::zero() && now - created > o.max_age;
    }
    // validate_every = 0 means on every get; tested apart, as `now` may be a little older
    // than a check another thread has just recorded.
    bool validation_due(Clock::time_point now, Clock::time_point checked) const {
      const Options& o = entry_->options();
      return o.validate && (o.validate_every == Clock::duration::zero() ||
                            now - checked >= o.validate_every);
    }

    // Makes the value (value_ is null). The permit is taken first and given back if the
    // factory throws: a failed make leaves nothing.
    void make() {
      entry_->limiter().acquire(*entry_);
      T* value;
      try {
        if (const auto& pool = entry_->options().pool) {
          lease_ = pool->checkout();
          value = &*lease_;
        } else {
          value = ::new (static_cast<void*>(storage_)) T(entry_->options().factory());
        }
      } catch (...) {  // also a fiber's forced_unwind: rethrown
        entry_->limiter().release(*entry_);
        throw;
      }
      const Clock::time_point now = Clock::now();
      created_.store(now, std::memory_order_release);  // release: see quick()
      checked_.store(now, std::memory_order_release);
      closed_ = false;
      value_.store(value, std::memory_order_release);
    }

    // Ends the value (value_ is not null): the close hook unless close() ran it (a failure
    // goes to the error reporter), then destruction (a pooled value goes back to its pool),
    // then the permit.
    void drop() {
      T* const value = value_.load(std::memory_order_relaxed);
      if (!closed_ && !lease_) {
        std::string error;
        if (!entry_->close_value(*value, &error)) {
          entry_->cache().report_failure(*entry_, ": close failed: ", error);
        }
      }
      value_.store(nullptr, std::memory_order_release);
      if (lease_) {
        lease_.release();  // reset_on_return, then kept or closed
      } else {
        value->~T();
      }
      entry_->limiter().release(*entry_);
    }

    // Closes a stale value through its hook (a failure is reported) and drops it.
    void retire() {
      mark_broken();
      std::string error;
      if (!close(&error)) {
        entry_->cache().report_failure(*entry_, ": close of a stale value failed: ", error);
      }
      drop();
    }

    bool passes_validation(T& value) {
      try {
        return entry_->options().validate(value);
      } catch (...) {
        internal::rethrow_if_unwinding();
        return false;
      }
    }

    Entry* const entry_;
    std::atomic<std::uint32_t> seq_{0};        // odd while a thread holds the claim
    std::atomic<const void*> owner_{nullptr};  // its context (to detect a hook re-entering)
    std::atomic<std::uint64_t> owner_thread_{0};  // its thread (fork: gone or not)
    std::atomic<std::uint32_t> owner_fork_{0};    // the fork generation it claimed in
    std::atomic<T*> value_{nullptr};
    std::atomic<Clock::time_point> created_{};
    std::atomic<Clock::time_point> checked_{};
    typename Pool<T>::Lease lease_;
    alignas(T) unsigned char storage_[sizeof(T)];
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
      if (!checks_) [[likely]] return slot.value();
      if (T* value = slot.quick()) [[likely]] return *value;
      return slot.refresh();
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
      T* value = slot == nullptr ? nullptr : slot->find();
      if (value == nullptr || !options_.teardown) return true;
      try {
        options_.teardown(*value, success);
        return true;
      } catch (...) {
        internal::rethrow_if_unwinding();
        slot->mark_broken();  // a pooled object in an unknown state is not reused
        internal::describe_current_exception_to(error);
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
        internal::describe_current_exception_to(error);
        return false;
      }
    }

    std::int64_t live() const { return registry_.size(); }

   private:
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

  // Takes `entry` only once nothing can fail: on failure (out of memory) it stays with the
  // caller, destroyed after mu_ is released (an Entry holds fork-safe mutexes, made and
  // destroyed with no scopereg lock held).
  Entry& publish_locked(std::unique_ptr<Entry>&& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const Index* old = index_.load(std::memory_order_relaxed);
    // Everything that can fail first (out of memory: nothing changed, nothing leaked).
    auto next = std::make_unique<Index>(*old);
    next->emplace(entry->name(), entry.get());
    entries_.reserve(entries_.size() + 1);
    retired_.reserve(retired_.size() + 1);
    entries_.push_back(std::move(entry));
    retired_.push_back(old);
    index_.store(next.release(), std::memory_order_release);
    return *entries_.back();
  }

  void note_used(Entry* entry) {
    // Fetched before locking: it may create the list, which takes the registry's locks
    // (used_mu_ is a leaf lock).
    UsedList& list = used_();
    // Threads sharing the scope may be making values of different names at once.
    internal::MutexLock lock(used_mu_);
    if (std::find(list.begin(), list.end(), entry) == list.end()) list.push_back(entry);
  }

  // Teardown hooks (when `success` is given), then close + remove, both in reverse order
  // of first use; every failure is collected, nothing stops the loop.
  // What a teardown or clear failed at. Never throws: a failure whose message cannot be
  // made for want of memory is counted instead (and reported as such).
  struct Failures {
    std::vector<std::string> messages;
    int undescribed = 0;

    void add(const Entry& entry, const char* what, const std::string& error) noexcept {
      try {
        messages.push_back(entry.name() + what + error);
      } catch (const std::bad_alloc&) {
        ++undescribed;
      }
    }
    bool empty() const noexcept { return messages.empty() && undescribed == 0; }
  };

  void clear_used(Failures& failures, const bool* success) {
    UsedList* list = nullptr;
    try {
      list = used_.find();
    } catch (const std::bad_alloc&) {
      // A ThreadScope (or fiber) scope is made on its first look-up: no memory for it
      // means no scope yet, so nothing was used in it (a TeardownGuard cannot throw).
      return;
    }
    if (list == nullptr) return;
    UsedList names;
    {
      internal::MutexLock lock(used_mu_);
      names.swap(*list);
    }
    std::string error;
    if (success != nullptr) {
      for (auto it = names.rbegin(); it != names.rend(); ++it) {
        if (!(*it)->teardown(*success, &error)) failures.add(**it, ": teardown failed: ", error);
      }
    }
    for (auto it = names.rbegin(); it != names.rend(); ++it) {
      if (!(*it)->close_and_remove(&error)) failures.add(**it, ": close failed: ", error);
    }
  }

  static absl::Status to_status(const Failures& failures) {
    if (failures.empty()) return absl::OkStatus();
    const std::vector<std::string>& messages = failures.messages;
    std::string message =
        std::to_string(messages.size() + failures.undescribed) + " failure(s): ";
    for (std::size_t i = 0; i < messages.size(); ++i) {
      message += (i ? "; " : "") + messages[i];
    }
    if (failures.undescribed > 0) {
      message += (messages.empty() ? "" : "; ") + std::to_string(failures.undescribed) +
                 " not described (out of memory)";
    }
    return absl::UnknownError(message);
  }

  // Reports `entry`'s failure `what` `error` to the error reporter (a value's end, which
  // cannot throw). Out of memory, one line goes to stderr instead: never std::bad_alloc.
  void report_failure(const Entry& entry, const char* what, const std::string& error) {
    try {
      report(absl::UnknownError(entry.name() + what + error));
    } catch (const std::bad_alloc&) {
      internal::report_without_memory("SessionCache", what);
    }
  }

  // Reports `failures` (if any) to the error reporter. Never throws: with no memory left
  // to build the report, one line goes to stderr instead.
  void report(const Failures& failures) {
    if (failures.empty()) return;
    try {
      report(to_status(failures));
    } catch (const std::bad_alloc&) {
      internal::report_without_memory("SessionCache", "a teardown or close failed");
    }
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
  // Guards every scope's UsedList in used_ (which the analysis cannot see): threads sharing
  // a scope append to one list. One lock for the cache, not one per scope, because it must
  // be a ForkSafeMutex (a shared scope lives on in a fork() child), and registering one per
  // scope would cost every scope a process-wide lock; it is taken only when a scope makes a
  // value, and by used() and clears, each time for a few instructions.
  mutable internal::ForkSafeMutex used_mu_;
  internal::ForkSafeMutex mu_;  // serialises adding names (a leaf lock)
  std::function<std::optional<Options>(std::string_view)> resolver_ ABSL_GUARDED_BY(mu_);
  std::atomic<const Index*> index_;
  std::vector<const Index*> retired_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);  // append only
};

}  // namespace scopereg

#endif  // SCOPEREG_SESSION_CACHE_H_
