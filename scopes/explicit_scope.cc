#include "scopereg/explicit_scope.h"

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

#include "scopereg/internal/fork.h"

namespace scopereg {
namespace internal {

class ScopeRecord;

namespace {

// One cache line of the token table: its lock, up to three live tokens' records with their
// hashes (a look-up compares hashes without touching other threads' records), and a chain
// of the records that did not fit.
struct alignas(64) Shard {
  struct Entry {
    std::size_t hash;
    ScopeRecord* record;
  };
  static constexpr std::uint32_t kInline = 3;
  Mutex mu;  // one word (mutex.h): the lock and its entries share one cache line
  std::uint32_t size ABSL_GUARDED_BY(mu) = 0;  // entries in use, from the front
  Entry entries[kInline] ABSL_GUARDED_BY(mu) = {};
  ScopeRecord* overflow ABSL_GUARDED_BY(mu) = nullptr;  // linked through ScopeRecord::next_
};
static_assert(sizeof(Shard) == 64, "a shard is one cache line");
// Enough lines that two threads' tokens rarely meet in one (128 KiB, made on first use).
constexpr std::size_t kShards = 2048;

}  // namespace

// One life of one application token's scope. Its table fields are guarded by the mutex of
// the shard its token hashes to. Records are recycled per thread (see RecordCache): a
// record's ScopeState stays linked in its domain between lives.
class ScopeRecord {
 public:
  ScopeRecord() = default;
  ScopeRecord(const ScopeRecord&) = delete;
  ScopeRecord& operator=(const ScopeRecord&) = delete;
  ~ScopeRecord() { drop_key(); }

  // Tells the analysis that `held`, the caller's locked shard, is this record's shard.
  void assert_shard(const Shard& held) const ABSL_ASSERT_EXCLUSIVE_LOCK(shard_->mu);

  void set_key(const TokenProbe& probe) {
    key_ = probe.make(key_buffer_, sizeof(key_buffer_), probe.value, probe.hash);
  }
  void drop_key() {
    if (key_ == reinterpret_cast<TokenKey*>(key_buffer_)) {
      key_->~TokenKey();
    } else {
      delete key_;
    }
    key_ = nullptr;
  }

  TokenKey* key_ = nullptr;
  alignas(16) unsigned char key_buffer_[64];
  Shard* shard_ = nullptr;
  // No token names this life's scope (copy_context): set before the record is shared.
  bool private_ = false;
  ScopeState state_{ScopeKind::kExplicit};
  // Increments from an existing reference may happen anywhere; every other change of refs_
  // happens under the shard's mutex, so "last reference gone" is decided exactly once.
  std::atomic<int> refs_{0};
  bool keep_ ABSL_GUARDED_BY(shard_->mu) = false;
  bool in_table_ ABSL_GUARDED_BY(shard_->mu) = true;
  ScopeRecord* next_ ABSL_GUARDED_BY(shard_->mu) = nullptr;  // the shard's overflow chain
};

namespace {

Shard* all_shards() {
  static Shard* const shards = new Shard[kShards];  // never destroyed, on purpose
  return shards;
}

// The remixed hash's top bits pick the shard (shard_index in token_ref.h).
Shard& shard_for(std::size_t hash) {
  static_assert(kShards == std::size_t{1} << 11);
  return all_shards()[shard_index(hash, 11)];
}

bool names(const ScopeRecord* record, const TokenProbe& probe) {
  return record->key_->type() == probe.type && record->key_->equals(probe.value);
}

ScopeRecord* find_locked(Shard& shard, const TokenProbe& probe)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
  for (std::uint32_t i = 0; i < shard.size; ++i) {
    const Shard::Entry& e = shard.entries[i];
    if (e.hash == probe.hash && names(e.record, probe)) return e.record;
  }
  for (ScopeRecord* r = shard.overflow; r != nullptr; r = r->next_) {
    r->assert_shard(shard);
    if (r->key_->hash() == probe.hash && names(r, probe)) return r;
  }
  return nullptr;
}

void insert_locked(Shard& shard, ScopeRecord* record) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
  record->assert_shard(shard);
  record->in_table_ = true;
  if (shard.size < Shard::kInline) {
    shard.entries[shard.size++] = Shard::Entry{record->key_->hash(), record};
    return;
  }
  record->next_ = shard.overflow;
  shard.overflow = record;
}

// Each thread keeps up to 16 ended records of its own domain for the next scopes it starts:
// a scope's life then allocates nothing but its values. Trivially destructible, so it is
// usable until the thread's very end; RecordCacheDrain frees it at thread exit.
struct RecordCache {
  static constexpr int kMax = 16;
  ScopeRecord* records[kMax];
  int size;
  bool drain_registered;
  bool exited;
  const Domain* domain;  // this thread's (this_thread_domain()), once asked
};
thread_local constinit RecordCache t_records{};

void destroy_record(ScopeRecord* record) noexcept {
  record->state_.leave_domain();
  delete record;
}

struct RecordCacheDrain {
  ~RecordCacheDrain() {
    RecordCache& cache = t_records;
    cache.exited = true;
    while (cache.size > 0) destroy_record(cache.records[--cache.size]);
  }
  void touch() {}
};
thread_local RecordCacheDrain t_records_drain;

// An ended record of this thread's, given a new life, or a new one.
ScopeRecord* take_record() {
  RecordCache& cache = t_records;
  if (cache.size == 0) return new ScopeRecord;
  ScopeRecord* record = cache.records[--cache.size];
  record->state_.reuse(new_scope_token(ScopeKind::kExplicit));
  return record;
}

void end_record(ScopeRecord* record) noexcept;

ScopeRecord* new_record(const TokenProbe& probe, Shard& shard) {
  ScopeRecord* record = take_record();
  try {
    record->set_key(probe);  // copies the user's token: may throw
  } catch (...) {
    end_record(record);  // no value, no key: back to this thread's cache
    throw;
  }
  record->shard_ = &shard;
  record->private_ = false;
  return record;
}

// A record whose scope ended (end_for_reuse) and that no one reaches any more.
void recycle_record(ScopeRecord* record) noexcept {
  record->drop_key();
  RecordCache& cache = t_records;
  if (cache.domain == nullptr) [[unlikely]] cache.domain = &this_thread_domain();
  if (cache.exited || cache.size == RecordCache::kMax ||
      !record->state_.in_domain(*cache.domain)) {
    destroy_record(record);
    return;
  }
  if (!cache.drain_registered) {
    t_records_drain.touch();  // constructs it: its destructor runs at thread exit
    cache.drain_registered = true;
  }
  record->refs_.store(0, std::memory_order_relaxed);
  cache.records[cache.size++] = record;
}

void unlink_locked(Shard& shard, ScopeRecord* record) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
  record->assert_shard(shard);
  record->in_table_ = false;
  for (std::uint32_t i = 0; i < shard.size; ++i) {
    if (shard.entries[i].record != record) continue;
    if (ScopeRecord* moved = shard.overflow) {  // keep the inline entries full
      moved->assert_shard(shard);
      shard.overflow = moved->next_;
      shard.entries[i] = Shard::Entry{moved->key_->hash(), moved};
    } else {
      shard.entries[i] = shard.entries[--shard.size];
    }
    return;
  }
  for (ScopeRecord** p = &shard.overflow; *p != nullptr; p = &(*p)->next_) {
    (*p)->assert_shard(shard);
    if (*p == record) {
      *p = record->next_;
      return;
    }
  }
}

void end_record(ScopeRecord* record) noexcept {
  // No guard, capture or table entry reaches the record now: nothing can add values.
  record->state_.end_for_reuse();
  recycle_record(record);
}

}  // namespace

void ScopeRecord::assert_shard([[maybe_unused]] const Shard& held) const {
  assert(&held == shard_);
}

ScopeRecord* new_private_record() {
  ScopeRecord* record = take_record();
  record->private_ = true;  // never in the table: release_record needs no shard lock
  record->refs_.store(1, std::memory_order_relaxed);
  return record;
}

ScopeRecord* acquire_record(const TokenProbe& probe, ScopeLifetime lifetime) {
  Shard& shard = shard_for(probe.hash);
  MutexLock lock(shard.mu);
  ScopeRecord* record = find_locked(shard, probe);
  if (record == nullptr) {
    // Made under the lock (usually a record from this thread's cache; the lock spins
    // before it sleeps, so a holder copying a long token delays others only briefly).
    record = new_record(probe, shard);
    record->assert_shard(shard);
    record->keep_ = false;
    insert_locked(shard, record);
    record->refs_.store(1, std::memory_order_relaxed);  // no one else reaches it yet
  } else {
    record->refs_.fetch_add(1, std::memory_order_relaxed);
  }
  record->assert_shard(shard);
  if (lifetime == ScopeLifetime::kUntilEnded) record->keep_ = true;
  return record;
}

void lock_explicit_table_for_fork() {
  for (std::size_t i = 0; i < kShards; ++i) all_shards()[i].mu.lock();
}

void unlock_explicit_table_after_fork() {
  for (std::size_t i = 0; i < kShards; ++i) all_shards()[i].mu.unlock();
}

void add_ref(ScopeRecord* record) noexcept {
  record->refs_.fetch_add(1, std::memory_order_relaxed);
}

void release_record(ScopeRecord* record) noexcept {
  // A count of 1 is the caller's reference alone: no one else can add one (add_ref needs a
  // reference; the table's look-ups are held off by the shard lock), so it need not be
  // written.
  if (record->private_) {  // never in the table: the last reference decides alone
    if (record->refs_.load(std::memory_order_acquire) == 1 ||
        record->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      end_record(record);
    }
    return;
  }
  Shard& shard = *record->shard_;
  {
    MutexLock lock(shard.mu);
    record->assert_shard(shard);
    if (record->refs_.load(std::memory_order_acquire) == 1) {
      record->refs_.store(0, std::memory_order_relaxed);  // end_token() reads it
    } else if (record->refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) {
      return;
    }
    if (record->in_table_) {
      if (record->keep_) return;  // kept until ExplicitScope::end()
      unlink_locked(shard, record);
    }
  }
  end_record(record);
}

ScopeState* state_of(ScopeRecord* record) noexcept { return &record->state_; }

void end_token(const TokenProbe& probe) {
  Shard& shard = shard_for(probe.hash);
  ScopeRecord* to_end = nullptr;
  {
    MutexLock lock(shard.mu);
    ScopeRecord* record = find_locked(shard, probe);
    if (record == nullptr) return;
    unlink_locked(shard, record);
    if (record->refs_.load(std::memory_order_acquire) == 0) to_end = record;
  }
  if (to_end != nullptr) end_record(to_end);
}

namespace {
// publish_task_top() (context_state.h) reading t_context by name: never through a call.
void publish_top_here() noexcept {
  if (TaskHead* task = t_context.task) [[unlikely]] {
    task->top.store(t_context.explicit_top, std::memory_order_relaxed);
  }
}
}  // namespace

void push_frame(ExplicitFrame* frame) noexcept {
  frame->prev = t_context.explicit_top;
  t_context.explicit_top = frame;
  publish_top_here();
}

namespace {

// Unlinks `frame` from the active-scope stack whose innermost frame is `top`; false when
// it is not on it.
bool unlink_frame(ExplicitFrame*& top, ExplicitFrame* frame) noexcept {
  for (ExplicitFrame** p = &top; *p != nullptr; p = &(*p)->prev) {
    if (*p == frame) {
      *p = frame->prev;
      return true;
    }
  }
  return false;
}

}  // namespace

void pop_frame(ExplicitFrame* frame, const void* owner, TaskHead* task) noexcept {
  if (task != nullptr && t_context.task != task) {
    // A guard of a coroutine task destroyed while the task is not running anywhere (its
    // frame destroyed while suspended): unlink it from the task's own stack.
    ExplicitFrame* top = task->top.load(std::memory_order_relaxed);
    if (unlink_frame(top, frame)) {
      task->top.store(top, std::memory_order_relaxed);
      return;
    }
    die_of_misuse(
        "a ScopeGuard of a coroutine task was destroyed while it was not on the task's "
        "active-scope stack");
  }
  // (A task's guard is the task's: it was checked above to be the running task.)
  if (task == nullptr && owner != current_context_id()) {
    die_of_misuse(
        "a ScopeGuard was destroyed on another thread, fiber or coroutine task than the one "
        "that created it; leave a guard where it was entered, use scopereg::wrap() to carry "
        "a scope to other threads, and give coroutines a TaskScope (coroutine_scope.h) so "
        "their guards follow them across co_await");
  }
  if (unlink_frame(t_context.explicit_top, frame)) {
    publish_top_here();
    return;
  }
  die_of_misuse(
      "a ScopeGuard was destroyed while it was not on its context's active-scope stack "
      "(was it created outside a wrapped callable and destroyed inside one?)");
}

}  // namespace internal

ScopeFunc ExplicitScope::func() {
  return [] {  // t_context by name: never through a call (context_state.h)
    internal::ScopeState* state = internal::frame_state(internal::t_context.explicit_top);
    return state != nullptr ? state->token() : ScopeToken();
  };
}

ScopeGuard::ScopeGuard(internal::ScopeRecord* record, bool inherit)
    : frame_{internal::state_of(record), record, nullptr},
      owner_(internal::current_context_id()),
      task_(internal::t_context.task) {
  internal::ExplicitFrame* const top = internal::t_context.explicit_top;
  if (inherit && top != nullptr && top->state != frame_.state) {
    try {
      frame_.state->share_from(*top->state);
    } catch (...) {  // no memory: the reference the caller took goes (no destructor runs)
      internal::release_record(record);
      throw;
    }
  }
  internal::push_frame(&frame_);
  if (internal::switch_hooks_active()) [[unlikely]] {
    internal::notify_switch(internal::frame_state(top), frame_.state);
  }
}

CapturedScope copy_context() {
  internal::ScopeRecord* record = internal::new_private_record();
  internal::ScopeState* state = internal::state_of(record);
  if (internal::ExplicitFrame* top = internal::t_context.explicit_top) {
    try {
      state->share_from(*top->state);
    } catch (...) {  // no memory: the new scope ends with what it had bound
      internal::release_record(record);
      throw;
    }
  }
  return CapturedScope::adopt(record);
}

CapturedScope CapturedScope::adopt(internal::ScopeRecord* record) noexcept {
  CapturedScope captured;
  // Written field by field into place (a whole frame built on the stack and copied in made
  // a 16-byte load of two 8-byte stores, which the store buffer cannot forward).
  internal::ExplicitFrame& frame = captured.frames_.emplace_back();
  frame.state = internal::state_of(record);
  frame.record = record;
  frame.prev = nullptr;  // the only frame
  return captured;
}

ScopeGuard::~ScopeGuard() {
  const bool was_current = internal::t_context.explicit_top == &frame_;
  internal::pop_frame(&frame_, owner_, task_);
  if (was_current && internal::switch_hooks_active()) [[unlikely]] {
    internal::ExplicitFrame* const top = internal::t_context.explicit_top;
    internal::notify_switch(frame_.state, internal::frame_state(top));
  }
  internal::release_record(frame_.record);
}

CapturedScope CapturedScope::current() {
  CapturedScope captured;
  for (internal::ExplicitFrame* f = internal::t_context.explicit_top; f != nullptr; f = f->prev) {
    captured.frames_.push_back(internal::ExplicitFrame{f->state, f->record, nullptr});
  }
  std::reverse(captured.frames_.begin(), captured.frames_.end());
  for (internal::ExplicitFrame& f : captured.frames_) internal::add_ref(f.record);
  captured.link();
  return captured;
}

CapturedScope::CapturedScope(CapturedScope&& other) noexcept
    : frames_(std::move(other.frames_)) {
  other.frames_.clear();
  link();
}

CapturedScope::CapturedScope(const CapturedScope& other) : frames_(other.frames_) {
  for (internal::ExplicitFrame& f : frames_) internal::add_ref(f.record);
  link();
}

CapturedScope& CapturedScope::operator=(const CapturedScope& other) {
  if (this != &other) {
    CapturedScope copy(other);
    *this = std::move(copy);
  }
  return *this;
}

CapturedScope& CapturedScope::operator=(CapturedScope&& other) noexcept {
  if (this != &other) {
    release();
    frames_ = std::move(other.frames_);
    other.frames_.clear();
    link();  // inline frames moved: their links point into `other`
  }
  return *this;
}

CapturedScope::~CapturedScope() { release(); }

void CapturedScope::link() noexcept {
  for (std::size_t i = 0; i < frames_.size(); ++i) {
    frames_[i].prev = i == 0 ? nullptr : &frames_[i - 1];
  }
}

void CapturedScope::release() noexcept {
  // Top first: inner scopes end before the scopes they were nested in.
  for (auto it = frames_.rbegin(); it != frames_.rend(); ++it) {
    internal::release_record(it->record);
  }
  frames_.clear();
}

}  // namespace scopereg
