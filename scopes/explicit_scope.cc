#include "scopereg/explicit_scope.h"

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstdlib>

#include "absl/container/flat_hash_map.h"
#include "scopereg/internal/fork.h"

namespace scopereg {
namespace internal {

namespace {

struct alignas(64) Shard {
  Mutex mu;
  absl::flat_hash_map<std::pair<const void*, std::size_t>, ScopeRecord*> map
      ABSL_GUARDED_BY(mu);
};
constexpr std::size_t kShards = 64;

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
  ScopeRecord* next_ ABSL_GUARDED_BY(shard_->mu) = nullptr;  // same (type, hash) chain
};

namespace {

Shard* all_shards() {
  static Shard* const shards = new Shard[kShards];  // never destroyed, on purpose
  return shards;
}

Shard& shard_for(std::size_t hash) { return all_shards()[(hash >> 11) % kShards]; }

ScopeRecord* find_locked(Shard& shard, const TokenProbe& probe)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
  auto it = shard.map.find(std::make_pair(probe.type, probe.hash));
  if (it == shard.map.end()) return nullptr;
  for (ScopeRecord* r = it->second; r != nullptr; r = r->next_) {
    r->assert_shard(shard);
    if (r->key_->equals(probe.value)) return r;
  }
  return nullptr;
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

ScopeRecord* new_record(const TokenProbe& probe, Shard& shard) {
  ScopeRecord* record = take_record();
  record->set_key(probe);
  record->shard_ = &shard;
  record->private_ = false;
  return record;
}

// A record whose scope ended (end_for_reuse) and that no one reaches any more.
void recycle_record(ScopeRecord* record) noexcept {
  record->drop_key();
  RecordCache& cache = t_records;
  if (cache.exited || cache.size == RecordCache::kMax ||
      !record->state_.in_domain(this_thread_domain())) {
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
  auto it = shard.map.find(std::make_pair(record->key_->type(), record->key_->hash()));
  for (ScopeRecord** p = &it->second; *p != nullptr; p = &(*p)->next_) {
    (*p)->assert_shard(shard);
    if (*p == record) {
      *p = record->next_;
      break;
    }
  }
  if (it->second == nullptr) shard.map.erase(it);
  record->in_table_ = false;
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
    record = new_record(probe, shard);
    record->assert_shard(shard);
    record->keep_ = false;
    record->in_table_ = true;
    ScopeRecord*& head = shard.map[std::make_pair(probe.type, probe.hash)];
    record->next_ = head;
    head = record;
  }
  record->assert_shard(shard);
  record->refs_.fetch_add(1, std::memory_order_relaxed);
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
  if (record->private_) {  // never in the table: the last reference decides alone
    if (record->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) end_record(record);
    return;
  }
  Shard& shard = *record->shard_;
  {
    MutexLock lock(shard.mu);
    record->assert_shard(shard);
    if (record->refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
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

void push_frame(ExplicitFrame* frame) noexcept {
  frame->prev = t_context.explicit_top;
  t_context.explicit_top = frame;
  publish_task_top();
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
    publish_task_top();
    return;
  }
  die_of_misuse(
      "a ScopeGuard was destroyed while it was not on its context's active-scope stack "
      "(was it created outside a wrapped callable and destroyed inside one?)");
}

}  // namespace internal

ScopeFunc ExplicitScope::func() {
  return [] { return ExplicitScope::current(); };
}

ScopeGuard::ScopeGuard(internal::ScopeRecord* record, bool inherit)
    : frame_{internal::state_of(record), record, nullptr},
      owner_(internal::current_context_id()),
      task_(internal::t_context.task) {
  internal::ExplicitFrame* const top = internal::t_context.explicit_top;
  if (inherit && top != nullptr && top->state != frame_.state) {
    frame_.state->share_from(*top->state);
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
    state->share_from(*top->state);
  }
  return CapturedScope::adopt(record);
}

CapturedScope CapturedScope::adopt(internal::ScopeRecord* record) noexcept {
  CapturedScope captured;
  captured.frames_.push_back(internal::ExplicitFrame{internal::state_of(record), record, nullptr});
  captured.link();
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
