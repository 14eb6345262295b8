// The slot backend's process-wide part: the table of registry indices and the list of
// live scopes, both under the process mutex (registry_record.h), in never-destroyed
// storage.

#include "scopereg/internal/scope_state.h"

#include <cassert>

#include "scopereg/error.h"
#include "scopereg/thread_scope.h"

namespace scopereg::internal {
namespace {

constexpr int kMaxRounds = 8;    // after this, creation in a dying scope throws
constexpr int kHardRounds = 16;  // after this, end() stops (keyed leftovers stay owned)

struct Slots {
  ScopeState* scopes ABSL_GUARDED_BY(g_process_mutex) = nullptr;
  std::vector<SlotRegistry*> registries ABSL_GUARDED_BY(g_process_mutex);  // by index
  std::vector<std::uint32_t> free_indices ABSL_GUARDED_BY(g_process_mutex);
};

Slots& slots() {
  static Slots* const s = new Slots;  // never destroyed, on purpose
  return *s;
}

}  // namespace

// ---- SlotRegistry -------------------------------------------------------------------

SlotRegistry::SlotRegistry() {
  install_fork_handlers();
  Slots& s = slots();
  MutexLock lock(g_process_mutex);
  if (!s.free_indices.empty()) {
    index_ = s.free_indices.back();
    s.free_indices.pop_back();
    s.registries[index_] = this;
  } else {
    constexpr std::uint64_t kLimit = kFirstChunkSlots * ((std::uint64_t{1} << kMaxChunks) - 1);
    if (s.registries.size() >= kLimit) {
      throw ScopeError("scopereg: too many registries alive at once; destroy some first");
    }
    index_ = static_cast<std::uint32_t>(s.registries.size());
    s.registries.push_back(this);
  }
  slot_ = slot_id_for(index_);
}

SlotRegistry::~SlotRegistry() {
  Slots& s = slots();
  std::vector<NodeBase*> nodes;
  {
    MutexLock lock(g_process_mutex);
    for (ScopeState* scope = s.scopes; scope != nullptr; scope = scope->next_) {
      MutexLock scope_lock(scope->mu_);
      if (NodeBase* n = scope->load(slot_)) {
        scope->store(slot_, nullptr);
        nodes.push_back(n);
      }
    }
  }
  retire(nodes);
  {
    MutexLock lock(g_process_mutex);
    s.registries[index_] = nullptr;
    s.free_indices.push_back(index_);
  }
  for (NodeBase* n : nodes) delete n;
}

void SlotRegistry::for_each(absl::FunctionRef<void(ScopeToken, NodeBase*)> visit) const {
  MutexLock lock(g_process_mutex);
  for (ScopeState* scope = slots().scopes; scope != nullptr; scope = scope->next_) {
    MutexLock scope_lock(scope->mu_);
    if (NodeBase* n = scope->load(slot_)) visit(scope->token_, n);
  }
}

// ---- ScopeState: emptying ------------------------------------------------------------

template <typename F>
void ScopeState::take_values(F&& take) {
  Slots& s = slots();
  for (int c = 0; c < kMaxChunks; ++c) {
    std::atomic<NodeBase*>* chunk = chunks_[c].load(std::memory_order_relaxed);
    if (chunk == nullptr) continue;
    const std::uint32_t n = kFirstChunkSlots << c;
    const std::uint32_t base = kFirstChunkSlots * ((1u << c) - 1);
    for (std::uint32_t o = 0; o < n; ++o) {
      NodeBase* node = chunk[o].load(std::memory_order_relaxed);
      if (node == nullptr) continue;
      chunk[o].store(nullptr, std::memory_order_relaxed);
      SlotRegistry* reg = s.registries[base + o];
      if (reg != nullptr) reg->live_.fetch_sub(1, std::memory_order_relaxed);
      take(reg, node);
    }
  }
}

// ---- fork ---------------------------------------------------------------------------

void lock_scopes_for_fork() {
  for (ScopeState* scope = slots().scopes; scope != nullptr; scope = scope->next_) {
    scope->mu_.lock();
  }
}

void unlock_scopes_after_fork() {
  for (ScopeState* scope = slots().scopes; scope != nullptr; scope = scope->next_) {
    scope->mu_.unlock();
  }
}

void abandon_other_threads_in_child() noexcept {
  Slots& s = slots();
  ScopeState* const mine = t_thread_state;
  MutexLock lock(g_process_mutex);
  // Registries that lived on the stacks of threads that are gone: their values are
  // abandoned in every scope and their index is never reused.
  for (std::uint32_t index = 0; index < s.registries.size(); ++index) {
    SlotRegistry* reg = s.registries[index];
    if (reg == nullptr) continue;
    reg->destroying_ = 0;  // nobody is destroying anything now
    if (!on_dead_stack(reg->stack_owner_)) continue;
    const SlotId slot = slot_id_for(index);
    for (ScopeState* scope = s.scopes; scope != nullptr; scope = scope->next_) {
      MutexLock scope_lock(scope->mu_);
      scope->store(slot, nullptr);
    }
    s.registries[index] = nullptr;
  }
  for (ScopeState* scope = s.scopes; scope != nullptr;) {
    ScopeState* const next = scope->next_;
    if (scope->token_.kind() == ScopeKind::kThread && scope != mine) {
      {
        MutexLock scope_lock(scope->mu_);
        scope->closing_ = true;
        scope->take_values([](SlotRegistry*, NodeBase*) {});  // abandoned, not destroyed
      }
      abandon_everywhere(TokenRef::of(scope->token_));
      if (scope->prev_ != nullptr) scope->prev_->next_ = next; else s.scopes = next;
      if (next != nullptr) next->prev_ = scope->prev_;
      scope->ended_ = true;  // the ScopeState itself is left: its thread's exit never comes
    }
    scope = next;
  }
}

// ---- ScopeState ---------------------------------------------------------------------

ScopeState::ScopeState(ScopeKind kind) : ScopeState(new_scope_token(kind)) {}

ScopeState::ScopeState(ScopeToken token) : token_(token) {
  install_fork_handlers();
  Slots& s = slots();
  MutexLock lock(g_process_mutex);
  next_ = s.scopes;
  if (s.scopes != nullptr) s.scopes->prev_ = this;
  s.scopes = this;
}

ScopeState::~ScopeState() {
  for (auto& chunk : chunks_) delete[] chunk.load(std::memory_order_relaxed);
}

void ScopeState::store(SlotId slot, NodeBase* node) {
  std::atomic<NodeBase*>* chunk = chunks_[slot.chunk].load(std::memory_order_relaxed);
  if (chunk == nullptr) {
    if (node == nullptr) return;
    chunk = new std::atomic<NodeBase*>[kFirstChunkSlots << slot.chunk]();
    chunks_[slot.chunk].store(chunk, std::memory_order_release);
  }
  chunk[slot.offset].store(node, std::memory_order_release);
}

void ScopeState::collect_round(bool last) {
  {
    MutexLock lock(mu_);
    if (last) closing_ = true;
    take_values([this](SlotRegistry* reg, NodeBase* node) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      assert(reg != nullptr);  // a registry clears its slots before it goes
      dying_.add(reg, node);   // under the process mutex, held by the caller
    });
  }
  collect_ended(TokenRef::of(token_), dying_);
}

void ScopeState::end() noexcept {
  Slots& s = slots();
  for (int round = 0;; ++round) {
    {
      MutexLock lock(g_process_mutex);
      if (round < kHardRounds) collect_round(round >= kMaxRounds);
      if (dying_.empty()) {
        {
          MutexLock scope_lock(mu_);
          closing_ = true;
        }
        if (prev_ != nullptr) prev_->next_ = next_; else s.scopes = next_;
        if (next_ != nullptr) next_->prev_ = prev_;
        ended_ = true;
        return;
      }
    }
    dying_.destroy_all();
  }
}

}  // namespace scopereg::internal
