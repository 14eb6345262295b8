// scopereg/pool.h
//
// Pool<T>: a thread-safe pool of reusable objects -- database connections, mostly -- with
// the knobs of SQLAlchemy's QueuePool. A SessionCache name configured with a pool
// (SessionOptions::pool) checks an object out on a scope's first get() and checks it back
// in when the scope's value is cleared or the scope ends, instead of opening and closing
// one per scope.
//
//   auto pool = std::make_shared<scopereg::Pool<Db>>(scopereg::PoolOptions<Db>{
//       .connect = [] { return Db::open("orders.db"); },
//       .close = [](Db& db) { db.close(); },
//       .ping = [](Db& db) { return db.ping(); },           // pre_ping
//       .reset_on_return = [](Db& db) { db.rollback(); },  // an unfinished transaction
//       .pool_size = 8, .max_overflow = 4, .recycle = std::chrono::hours(1)});
//
//   {
//     scopereg::Pool<Db>::Lease db = pool->checkout();   // an idle Db, or a new one
//     db->query(...);
//     if (lost_connection) db.invalidate();              // "server has gone away"
//   }                                                     // back to the pool (or closed)
//
// Contract:
// * Limits: at most pool_size + max_overflow objects exist at once (idle + checked out).
//   At most pool_size idle objects are kept: an object returned to a full pool is closed
//   (an overflow object). A checkout with every object out waits up to `timeout` for a
//   return, then throws PoolTimeout naming the pool and its limits.
// * Checkout takes an idle object (LIFO by default: the most recently used, whose
//   connection is warmest; FIFO spreads use), closing and skipping objects older than
//   `recycle` and, with `ping`, objects whose ping returns false or throws (pre_ping); when
//   none is left it connects a new one. A failed ping costs a replacement, never an error.
// * Return (Lease destroyed or release()): `reset_on_return` and `on_checkin` run, then the
//   object is kept idle -- unless it was invalidated, a hook threw, it is older than
//   `recycle`, the pool is full, or dispose() ran since it was checked out: then it is
//   closed (`close` hook, then its destructor).
// * Hooks may throw. `connect` and `on_checkout` errors reach the caller of checkout()
//   (the object, if any, is closed; nothing leaks, limits stay exact). Errors of `on_wait`
//   and of hooks run at return or close go to `error_reporter` (default: one line on
//   stderr), never lost: with no memory left to build the report, a line naming the pool
//   and the hook goes to stderr, written without allocating.
// * dispose() closes every idle object now; objects checked out at that moment are closed
//   when returned. The pool stays usable.
// * Lifetime: a Lease keeps the pool's state alive; a Lease returned after the Pool was
//   destroyed closes its object. Destroying the Pool closes its idle objects (allocating
//   nothing: it finishes even with no memory left).
//
// Waiting: a checkout that must wait blocks its thread on a condition variable; inside a
// scopereg Fiber it yields instead (polling every resume until the deadline), so other
// fibers of the thread -- the ones that will return objects -- keep running. Boost.Fiber
// fibers and C++20 coroutines block their thread: size the pool for the number of
// concurrent scopes there, or keep timeouts short.
//
// Thread safety: every member may be called concurrently from any thread. A Lease is used
// by one thread at a time (moving it to another thread is fine).
// Misuse: dereferencing an empty Lease (moved from, or after release()) is undefined; test
// it with `if (lease)`. A hook that checks out of its own exhausted pool waits for itself
// until PoolTimeout. Pool calls from a signal handler are not supported.
// Cost: with the default LIFO order a return parks its object in a slot of its thread's
// and that thread's next checkout takes it back: a few atomic operations and no lock
// (about 32 ns for the pair on the project's machine); otherwise, or while a checkout
// waits, one mutex lock and a deque operation. Plus the hooks; the clock is read only
// with `recycle` set or when a checkout must wait; no reference count is touched (see
// benchmarks/pool_benchmark.cc). ~Pool waits for returns that are parking at that moment
// (a few instructions each), so that none reads the pool's state after it is gone.

#ifndef SCOPEREG_POOL_H_
#define SCOPEREG_POOL_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "scopereg/error.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/mutex.h"

namespace scopereg {

// Thrown by Pool::checkout() when no object came free within the timeout.
class PoolTimeout : public ScopeError {
 public:
  using ScopeError::ScopeError;
};

enum class PoolOrder { kLifo, kFifo };

template <typename T>
struct PoolOptions {
  using Clock = std::chrono::steady_clock;
  std::function<T()> connect = {};                    // required: makes a new object
  std::function<void(T&)> close = {};                 // before an object is destroyed
  std::function<bool(T&)> ping = {};                  // pre_ping: false or throw = dead
  std::function<void(T&)> reset_on_return = {};       // e.g. roll back what is unfinished
  std::function<void(T&)> on_checkout = {};
  std::function<void(T&)> on_checkin = {};
  std::size_t pool_size = 5;                          // idle objects kept
  std::size_t max_overflow = 10;                      // extra objects allowed out
  Clock::duration timeout = std::chrono::seconds(30);  // checkout wait
  Clock::duration recycle{0};                          // max age; 0: no limit
  PoolOrder order = PoolOrder::kLifo;
  std::string name = "pool";                           // in error messages
  std::function<void(const absl::Status&)> error_reporter = {};  // default: stderr
  // Default: steady_clock (tests). If it throws, the checkout reading it fails, as a
  // throwing `connect` would.
  std::function<Clock::time_point()> clock = {};
  // Called once by a checkout that had to wait, when it hands its object out, with how
  // long it waited (outside the lock). An error is reported; the checkout still succeeds.
  std::function<void(Clock::duration)> on_wait = {};
};

// Counters since the pool was made (a consistent snapshot).
struct PoolStats {
  std::size_t idle = 0;         // objects waiting in the pool
  std::size_t checked_out = 0;  // objects out now
  std::uint64_t connects = 0;   // objects made (connect succeeded)
  std::uint64_t closes = 0;     // objects closed (any reason)
  std::uint64_t checkouts = 0;
  std::uint64_t checkins = 0;
  std::uint64_t invalidated = 0;   // closed because invalidated or a hook failed
  std::uint64_t ping_failures = 0;
  std::uint64_t recycled = 0;      // closed for age
  std::uint64_t waits = 0;         // checkouts that had to wait
  std::uint64_t timeouts = 0;
  std::chrono::nanoseconds max_wait{0};
};

template <typename T>
class Pool {
  struct Item;
  struct State;

 public:
  using Options = PoolOptions<T>;
  using Clock = std::chrono::steady_clock;

  // A checked-out object. Move-only; returns its object to the pool when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept : item_(std::move(other.item_)) {}
    Lease& operator=(Lease&& other) noexcept {
      if (this != &other) {
        release();
        item_ = std::move(other.item_);
      }
      return *this;
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { release(); }

    T& operator*() const { return item_->value; }
    T* operator->() const { return &item_->value; }
    T& get() const { return item_->value; }
    explicit operator bool() const { return item_ != nullptr; }

    // Marks the object broken: it is closed instead of kept when returned.
    void invalidate() {
      if (item_) item_->broken = true;
    }
    // Returns the object now (a no-op on an empty lease).
    void release() noexcept {
      if (item_) State::checkin(std::move(item_));
    }

   private:
    friend class Pool;
    explicit Lease(std::unique_ptr<Item> item) : item_(std::move(item)) {}
    std::unique_ptr<Item> item_;  // holds a reference to the pool's state
  };

  // Throws ScopeError if `connect` is empty or pool_size + max_overflow is 0.
  explicit Pool(Options options) : state_(std::make_shared<State>(std::move(options))) {
    if (!state_->options.connect) {
      throw ScopeError("scopereg: Pool '" + state_->options.name +
                       "' needs a connect function; set PoolOptions::connect");
    }
    if (state_->options.pool_size + state_->options.max_overflow == 0) {
      throw ScopeError("scopereg: Pool '" + state_->options.name +
                       "' allows no object at all; set pool_size or max_overflow above 0");
    }
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  // Closes the idle objects; leases still out close theirs when returned.
  ~Pool() {
    state_->dispose(true);
    state_->wait_for_returns();  // the few instructions of returns parking right now
  }

  // Checks an object out (see the file comment). Throws PoolTimeout; whatever `connect`
  // or `on_checkout` throws.
  Lease checkout() { return Lease(state_->checkout(state_)); }

  // Closes every idle object; objects out now are closed when returned. The idle ones are
  // closed a few at a time, outside the pool's lock (nothing is allocated: ~Pool calls
  // this): until then a concurrent checkout may take one, which it closes, and makes a
  // new object instead. Each is closed once.
  // dispose(false) -- for a process forked from the pool's owner, as SQLAlchemy's
  // engine.dispose(close=False) -- forgets them instead: idle objects and objects out now
  // are dropped without their close hook or destructor (their connections belong to the
  // parent process: closing them would end the parent's sessions). That memory is leaked on
  // purpose. The pool stays usable and makes new objects.
  void dispose(bool close = true) { state_->dispose(close); }

  PoolStats stats() const { return state_->stats(); }
  const Options& options() const { return state_->options; }

 private:
  // One pooled object. It keeps the pool's state alive while it exists (a lease returned
  // after the Pool's destruction still finds it), without reference-count traffic per
  // checkout: the reference moves with the item.
  struct Item {
    template <typename F>
    Item(F& connect, Clock::time_point now, std::uint64_t gen, std::shared_ptr<State> s)
        : value(connect()), created(now), generation(gen), state(std::move(s)) {}
    T value;
    Clock::time_point created;  // set only when `recycle` is used
    std::uint64_t generation;
    std::shared_ptr<State> state;
    bool broken = false;
  };

  struct State {
    explicit State(Options o) : options(std::move(o)) {}

    Clock::time_point now() const { return options.clock ? options.clock() : Clock::now(); }
    // Reads the clock only when `recycle` is set.
    bool too_old(const Item& item) const {
      return options.recycle != Clock::duration::zero() && now() - item.created >= options.recycle;
    }
    // As too_old(), for a return (which cannot throw): a clock that throws there is
    // reported, and the object is closed as if it were too old.
    bool too_old_on_return(const Item& item) noexcept {
      try {
        return too_old(item);
      } catch (...) {
        internal::rethrow_if_unwinding();
        report_exception("clock failed on return (the object is closed): ");
        return true;
      }
    }

    // Whether a checked-out idle object needs work outside the lock before it is handed out.
    bool checks_on_checkout() const {
      return options.recycle != Clock::duration::zero() || options.ping || options.on_checkout;
    }

    // LIFO pools keep each thread's most recently returned object parked in a per-thread
    // slot (16 slots, by thread): a thread that returns an object and checks one out again
    // -- one request after the other -- touches no shared cache line. A parked object
    // counts as checked out in `out` and as idle in stats(); checkouts that would wait
    // take parked objects of other threads first, and returns go to the shared queue while
    // anyone waits.
    bool parking() const { return options.order == PoolOrder::kLifo; }
    struct alignas(64) Park {
      std::atomic<Item*> item{nullptr};
      std::atomic<std::uint64_t> checkouts{0};
      // Returns that parked here, and those inside park() right now (which may still
      // read the state after their object became someone else's: ~Pool waits for them),
      // in one word, so that a return pays one atomic for both:
      //   [fork tag: 16 bits][checkins: 32 bits][inside park(): 16 bits]
      // The tag is the fork generation (mutex.h): in a forked child, the count of returns
      // inside park() left by the parent's threads, which do not exist there, is ignored
      // and dropped at the next return. Check-ins past 2^32 move to `checkins_carried`,
      // under the pool's mutex (stats() reads both under it). The inside count assumes
      // fewer than 65,536 threads of one slot inside park()'s few instructions at once.
      std::atomic<std::uint64_t> returns{0};
      std::atomic<std::uint64_t> checkins_carried{0};

      static constexpr int kCheckinsShift = 16;
      static constexpr std::uint64_t kInside = (std::uint64_t{1} << kCheckinsShift) - 1;
      static constexpr std::uint64_t kCheckins = (std::uint64_t{1} << 32) - 1;
      static constexpr int kTagShift = 48;
      static std::uint64_t tag() {
        return std::uint64_t{internal::g_fork_generation.load(std::memory_order_relaxed) &
                             0xffff} << kTagShift;
      }
      static std::uint64_t inside_of(std::uint64_t seen, std::uint64_t now_tag) {
        return ((seen >> kTagShift) << kTagShift) == now_tag ? (seen & kInside) : 0;
      }
      // Counts a check-in and the caller as inside park(). When the check-in count is
      // full it carries it to `checkins_carried` if `may_carry` (the pool's mutex held),
      // else returns false, counting nothing.
      bool enter(bool may_carry) {
        const std::uint64_t now_tag = tag();
        std::uint64_t seen = returns.load(std::memory_order_relaxed);
        for (;;) {
          const std::uint64_t checkins = (seen >> kCheckinsShift) & kCheckins;
          const bool full = checkins == kCheckins;
          if (full && !may_carry) return false;
          const std::uint64_t next = now_tag | ((full ? 0 : checkins + 1) << kCheckinsShift) |
                                     (inside_of(seen, now_tag) + 1);
          if (returns.compare_exchange_weak(seen, next, std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
            if (full) checkins_carried.fetch_add(kCheckins + 1, std::memory_order_relaxed);
            return true;
          }
        }
      }
      void leave() { returns.fetch_sub(1, std::memory_order_seq_cst); }
      bool busy() const {
        const std::uint64_t seen = returns.load(std::memory_order_seq_cst);
        return inside_of(seen, tag()) != 0;
      }
      std::uint64_t checkins() const {
        const std::uint64_t seen = returns.load(std::memory_order_relaxed);
        return ((seen >> kCheckinsShift) & kCheckins) +
               checkins_carried.load(std::memory_order_relaxed);
      }
    };
    static constexpr std::size_t kParks = 16;
    static constexpr std::size_t kCloseBatch = 16;  // idle objects dispose() closes at a time
    Park& my_park() { return parks[internal::current_thread_serial() % kParks]; }

    // Counts a waiting checkout while it lives (returns do not park while anyone waits).
    struct WaiterMark {
      std::atomic<int>* waiters = nullptr;
      // Marks the checkout as waiting; true the first time. A checkout that retries (its
      // object failed its checks) and waits again is still one waiter.
      bool set(std::atomic<int>& w) {
        if (waiters != nullptr) return false;
        waiters = &w;
        w.fetch_add(1, std::memory_order_seq_cst);
        return true;
      }
      ~WaiterMark() {
        if (waiters != nullptr) waiters->fetch_sub(1, std::memory_order_seq_cst);
      }
    };

    std::unique_ptr<Item> checkout(const std::shared_ptr<State>& self) {
      const bool checks = checks_on_checkout();
      if (parking()) {
        Park& park = my_park();
        if (Item* parked = park.item.exchange(nullptr, std::memory_order_acquire)) {
          std::unique_ptr<Item> item(parked);
          if (item->generation == generation.load(std::memory_order_acquire)) {
            if (!checks) {
              park.checkouts.fetch_add(1, std::memory_order_relaxed);
              return item;
            }
            if (std::unique_ptr<Item> ok = check_idle(std::move(item))) return ok;
          } else {
            keep_or_close(std::move(item), false, true);  // parked before a dispose()
          }
        }
      }
      WaiterMark waiting;
      // Set by the first wait and kept by retries: one checkout waits at most `timeout` in
      // all. `woke` is read right after each wait, before anything is taken: a throwing
      // clock then leaves nothing to give back.
      bool waited = false;
      Clock::time_point start{}, deadline{}, woke{};
      for (;;) {
        std::unique_ptr<Item> item;
        bool make = false;
        bool stale = false;  // parked before a dispose()
        {
          internal::MutexLock lock(mu);
          for (;;) {
            if (!idle.empty()) {
              if (options.order == PoolOrder::kLifo) {
                item = std::move(idle.back());
                idle.pop_back();
              } else {
                item = std::move(idle.front());
                idle.pop_front();
              }
              ++out;
            } else if (Item* parked = parking() ? steal_parked() : nullptr) {
              // Objects other threads parked are idle too: take one before making one.
              item.reset(parked);  // counted in `out` already
            } else if (total < options.pool_size + options.max_overflow) {
              ++total;  // reserved for the object we are about to make
              ++out;
              make = true;
              break;
            } else if (parking() && waiting.set(waiters)) {
              // Marked as waiting: look at the slots again (see park()).
              if (Item* parked = steal_parked()) item.reset(parked);
            }
            if (item != nullptr) {
              // dispose() changes the generation under mu only: this answer stays true.
              stale = item->generation != generation.load(std::memory_order_relaxed);
              if (!checks && !stale) ++stat.checkouts;  // nothing can fail any more
              break;
            }
            if (!waited) {
              start = woke = now();
              deadline = start + options.timeout;
              waited = true;
              ++stat.waits;
            }
            if (woke >= deadline) {
              ++stat.timeouts;
              throw PoolTimeout(
                  "scopereg: Pool '" + options.name + "': no object came free within the " +
                  std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     options.timeout).count()) +
                  " ms timeout; all " + std::to_string(total.load()) + " objects (pool_size " +
                  std::to_string(options.pool_size) + " + max_overflow " +
                  std::to_string(options.max_overflow) +
                  ") are checked out. Return leases sooner, raise the limits or the "
                  "timeout");
            }
            wait_until(deadline);
            woke = now();
          }
          if (waited) note_wait(woke - start);
        }
        std::unique_ptr<Item> got;
        if (make) {
          got = connect_new(self);
        } else if (stale) {
          keep_or_close(std::move(item), false, true);
          continue;
        } else if (!checks) {
          got = std::move(item);
        } else if (!(got = check_idle(std::move(item)))) {
          continue;
        }
        if (waited && options.on_wait) {
          try {
            run_on_wait(woke - start);
          } catch (...) {  // only a fiber's unwinding gets here: return the object first
            checkin(std::move(got));
            throw;
          }
        }
        return got;
      }
    }

    // An idle object taken out: checks its age and, with pre_ping, that it still works,
    // and runs on_checkout. Null (the object discarded) when it failed a check.
    std::unique_ptr<Item> check_idle(std::unique_ptr<Item> item) {
      bool old = false, dead = false;
      try {
        old = too_old(*item);
        dead = !old && options.ping && !ping(*item);
      } catch (...) {  // a throwing clock, or a fiber unwound inside ping
        discard(std::move(item), &PoolStats::invalidated);
        throw;
      }
      if (old || dead) {
        discard(std::move(item), old ? &PoolStats::recycled : &PoolStats::ping_failures);
        return nullptr;
      }
      return after_checkout(std::move(item));
    }

    Item* steal_parked() {
      for (Park& park : parks) {
        if (park.item.load(std::memory_order_seq_cst) == nullptr) continue;
        if (Item* parked = park.item.exchange(nullptr, std::memory_order_seq_cst)) return parked;
      }
      return nullptr;
    }

    // Waits for a return. Requires mu. Inside a scopereg Fiber, yields instead.
    void wait_until(Clock::time_point deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      if (internal::can_yield()) {
        internal::yield_unlocked(mu);
        return;
      }
      if (options.clock) {  // a fake clock: poll, the real deadline means nothing
        cv.wait_until(mu, Clock::now() + std::chrono::milliseconds(1));
      } else {
        cv.wait_until(mu, deadline);
      }
    }

    void note_wait(Clock::duration waited) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      const auto d = std::chrono::duration_cast<std::chrono::nanoseconds>(waited);
      if (d > stat.max_wait) stat.max_wait = d;
    }

    // Runs on_wait for a checkout that holds its object already: an error is reported,
    // not thrown (it would lose the object, and the checkout succeeded).
    void run_on_wait(Clock::duration waited) {
      try {
        options.on_wait(waited);
      } catch (...) {
        internal::rethrow_if_unwinding();
        report_exception("on_wait failed (ignored): ");
      }
    }

    std::unique_ptr<Item> connect_new(const std::shared_ptr<State>& self) {
      std::unique_ptr<Item> item;
      try {
        // The clock is read here too: whatever throws gives the reserved place back.
        const Clock::time_point created =
            options.recycle != Clock::duration::zero() ? now() : Clock::time_point{};
        item = std::make_unique<Item>(options.connect, created,
                                      generation.load(std::memory_order_acquire), self);
      } catch (...) {
        internal::MutexLock lock(mu);
        --total;
        --out;
        cv.notify_one();
        throw;
      }
      {
        internal::MutexLock lock(mu);
        ++stat.connects;
      }
      return after_checkout(std::move(item));
    }

    std::unique_ptr<Item> after_checkout(std::unique_ptr<Item> item) {
      if (options.on_checkout) {
        try {
          options.on_checkout(item->value);
        } catch (...) {
          discard(std::move(item), &PoolStats::invalidated);
          throw;
        }
      }
      internal::MutexLock lock(mu);
      ++stat.checkouts;
      return item;
    }

    bool ping(Item& item) {
      try {
        return options.ping(item.value);
      } catch (...) {
        internal::rethrow_if_unwinding();
        return false;
      }
    }

    // Closes a checked-out object and frees its place; `reason` counts why, besides closes.
    void discard(std::unique_ptr<Item> item, std::uint64_t PoolStats::*reason) {
      if (item->generation < forget_below.load(std::memory_order_acquire)) {
        // dispose(false) ran meanwhile: it belongs to the parent process, not ours to close.
        keep_or_close(std::move(item), false, true);
        return;
      }
      close(std::move(item));  // its place stays taken until the close has finished
      internal::MutexLock lock(mu);
      --total;
      --out;
      ++(stat.*reason);
      ++stat.closes;
      cv.notify_one();
    }

    // Runs the close hook (a failure is reported), then destroys the object.
    void close(std::unique_ptr<Item> item) noexcept {
      if (options.close) {
        try {
          options.close(item->value);
        } catch (...) {
          internal::rethrow_if_unwinding();
          report_exception("close failed: ");
        }
      }
      item.reset();
    }

    static void checkin(std::unique_ptr<Item> item) noexcept {
      State& s = *item->state;
      if (item->generation < s.forget_below.load(std::memory_order_acquire)) {
        // dispose(false) ran: no hook may touch it (it belongs to the parent process).
        s.keep_or_close(std::move(item), false, false);
        return;
      }
      if (!item->broken && s.options.reset_on_return) s.run_return_hook(s.options.reset_on_return, *item, "reset_on_return");
      if (!item->broken && s.options.on_checkin) s.run_return_hook(s.options.on_checkin, *item, "on_checkin");
      const bool old = s.too_old_on_return(*item);
      if (s.parking() && !item->broken && !old &&
          s.total.load(std::memory_order_relaxed) <= s.options.pool_size) {
        s.park(std::move(item));
        return;
      }
      s.keep_or_close(std::move(item), old, false);
    }

    // Parks a returned object in this thread's slot, unless a checkout waits or dispose()
    // ran since it was checked out: then it goes through keep_or_close().
    //
    // Both are checked again after the exchange, each side storing before it looks at the
    // other's store (all seq_cst): a checkout marks itself waiting, then looks at the slots
    // (steal_parked); dispose() bumps the generation, then empties the slots. So either
    // they find our object there, or we see their mark and take back what the slot holds
    // (exchange: whoever gets an object owns it; a checkout hands one from before a
    // dispose() to keep_or_close() too: closed, counted once). Without the second look
    // a return that read the old generation could park after dispose() had emptied the
    // slots: never closed (after ~Pool, a cycle: the Item holds the state, the state the
    // Item), or closed by a later checkout.
    //
    // Once the object is parked, someone else may take and close it -- dispose() in ~Pool
    // does -- and that can drop the last reference to the state while we still look at
    // it: the slot counts us as inside meanwhile (enter()), and ~Pool waits for the count
    // (wait_for_returns()). We enter before reading the generation: a return ~Pool did
    // not wait for sees the generation dispose() bumped and does not park. What we hold
    // when we leave -- an object displaced from the slot or taken back -- keeps the state
    // alive by itself. enter() also counts the check-in: one atomic for both.
    void park(std::unique_ptr<Item> item) noexcept {
      Park& slot = my_park();
      const std::uint64_t gen = item->generation;
      if (!slot.enter(/*may_carry=*/false)) {
        internal::MutexLock lock(mu);
        slot.enter(/*may_carry=*/true);
      }
      if (gen != generation.load(std::memory_order_seq_cst) ||
          waiters.load(std::memory_order_seq_cst) != 0) {
        slot.leave();
        keep_or_close(std::move(item), false, true);  // its check-in counted by enter()
        return;
      }
      Item* displaced = slot.item.exchange(item.release(), std::memory_order_seq_cst);
      Item* back = nullptr;
      if (waiters.load(std::memory_order_seq_cst) != 0 ||
          generation.load(std::memory_order_seq_cst) != gen) {
        back = slot.item.exchange(nullptr, std::memory_order_seq_cst);
      }
      slot.leave();
      // Their check-ins were counted when they were parked.
      if (displaced != nullptr) keep_or_close(std::unique_ptr<Item>(displaced), false, true);
      if (back != nullptr) keep_or_close(std::unique_ptr<Item>(back), false, true);
    }

    // Keeps a returned object idle, or closes it (see the file comment), or -- of a
    // generation dispose(false) forgot -- frees its place without touching it. `counted`:
    // its check-in is counted already.
    void keep_or_close(std::unique_ptr<Item> item, bool old, bool counted) noexcept {
      std::shared_ptr<State> keep;  // outlives the lock: may be the last reference
      {
        internal::MutexLock lock(mu);
        --out;
        if (!counted) ++stat.checkins;
        if (item->generation < forget_below.load(std::memory_order_relaxed)) {
          --total;
          cv.notify_one();
          keep = std::move(item->state);
          (void)item.release();  // leaked on purpose: no close hook, no destructor
          return;
        }
        if (!item->broken && !old &&
            item->generation == generation.load(std::memory_order_relaxed) &&
            idle.size() < options.pool_size) {
          try {
            idle.push_back(std::move(item));  // (a new block every 64 objects)
            cv.notify_one();
            return;
          } catch (const std::bad_alloc&) {
            // No memory to keep it idle: closed below instead (a return cannot throw).
          }
        }
        ++stat.closes;
        if (item->broken) ++stat.invalidated;
        else if (old) ++stat.recycled;
      }
      // The item may hold the last reference to the state (the Pool is gone): keep it
      // alive until the close is done.
      keep = item->state;
      close(std::move(item));
      closed_one();  // counts against the limits until its close has finished
    }

    // An object finished closing: its place is free.
    void closed_one() {
      internal::MutexLock lock(mu);
      --total;
      cv.notify_one();
    }

    void run_return_hook(const std::function<void(T&)>& hook, Item& item, const char* what) noexcept {
      try {
        hook(item.value);
      } catch (...) {
        internal::rethrow_if_unwinding();
        item.broken = true;
        report_exception(what, " failed (the object is closed, not reused): ");
      }
    }

    // dispose(false)'s end of an object: its place is freed (by the caller), the object
    // itself never touched again (it belongs to the parent process).
    static void forget(std::unique_ptr<Item> item) {
      item->state.reset();   // not the last reference: the Pool holds one
      (void)item.release();  // leaked on purpose
    }

    void dispose(bool close_them) {
      // Fixed room only, nothing allocated: ~Pool calls this and cannot throw. (Not even a
      // std::deque to swap the idle objects into: libstdc++'s allocates when it is made.)
      std::array<std::unique_ptr<Item>, kParks> parked;
      std::size_t parked_count = 0;
      std::uint64_t next = 0;
      {
        internal::MutexLock lock(mu);
        next = generation.load(std::memory_order_relaxed) + 1;
        generation.store(next, std::memory_order_seq_cst);  // before the slots: see park()
        // One pass: a return that parks after it sees the new generation and takes its
        // object back (park()).
        for (Park& park : parks) {
          if (Item* item = park.item.exchange(nullptr, std::memory_order_seq_cst)) {
            parked[parked_count++].reset(item);
            --out;  // parked ones count as out: now idle
          }
        }
        if (!close_them) {
          forget_below.store(next, std::memory_order_release);
          total -= idle.size() + parked_count;
          for (auto& item : idle) forget(std::move(item));
          idle.clear();
          for (std::size_t i = 0; i < parked_count; ++i) forget(std::move(parked[i]));
          cv.notify_all();
          return;
        }
        stat.closes += parked_count;
      }
      for (std::size_t i = 0; i < parked_count; ++i) {
        close(std::move(parked[i]));
        closed_one();  // counts against the limits until its close has finished
      }
      // The idle objects, a batch at a time; only those of older generations (objects made
      // since may have come back meanwhile).
      for (;;) {
        std::array<std::unique_ptr<Item>, kCloseBatch> batch;
        std::size_t n = 0;
        {
          internal::MutexLock lock(mu);
          for (auto it = idle.begin(); it != idle.end() && n < batch.size();) {
            if ((*it)->generation < next) {
              batch[n++] = std::move(*it);
              it = idle.erase(it);
            } else {
              ++it;
            }
          }
          stat.closes += n;
        }
        for (std::size_t i = 0; i < n; ++i) {
          close(std::move(batch[i]));
          closed_one();
        }
        if (n < batch.size()) break;
      }
    }

    // For ~Pool, after dispose(): returns still inside park() are done with the state.
    void wait_for_returns() {
      for (const Park& slot : parks) {
        while (slot.busy()) std::this_thread::yield();
      }
    }

    PoolStats stats() {
      internal::MutexLock lock(mu);
      PoolStats s = stat;
      std::size_t parked = 0;
      for (Park& park : parks) {
        s.checkouts += park.checkouts.load(std::memory_order_relaxed);
        s.checkins += park.checkins();
        if (park.item.load(std::memory_order_acquire) != nullptr) ++parked;
      }
      s.idle = idle.size() + parked;
      s.checked_out = out - parked;
      return s;
    }

    // Reports the exception in flight (call from a catch block), after `what` and `more`.
    // Out of memory, one line goes to stderr instead: never std::bad_alloc. (A fiber's
    // unwinding from the reporter goes on: internal::report_to.)
    void report_exception(const char* what, const char* more = "") {
      try {
        internal::report_to(options.error_reporter,
                            absl::UnknownError("Pool '" + options.name + "': " + what + more +
                                               internal::describe_current_exception()));
      } catch (const std::bad_alloc&) {
        internal::report_without_memory(options.name, what, more);
      }
    }

    const Options options;
    internal::ForkSafeMutex mu;
    internal::CondVar cv;
    std::deque<std::unique_ptr<Item>> idle ABSL_GUARDED_BY(mu);
    // Objects that exist (idle + out). Changed only under mu; read without it by checkin
    // (whether the pool is within pool_size, so that a return may park).
    std::atomic<std::size_t> total{0};
    std::size_t out ABSL_GUARDED_BY(mu) = 0;
    // Bumped by dispose() under mu; read without it (objects of older ones are not reused).
    std::atomic<std::uint64_t> generation{0};
    std::atomic<std::uint64_t> forget_below{0};  // dispose(false): forget older generations
    std::atomic<int> waiters{0};
    Park parks[kParks];
    PoolStats stat ABSL_GUARDED_BY(mu);
  };

  std::shared_ptr<State> state_;
};

}  // namespace scopereg

#endif  // SCOPEREG_POOL_H_
