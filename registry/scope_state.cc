// The slot backend's process-wide part: the table of registry indices and the list of
// live scopes, both under the process mutex (registry_record.h), in never-destroyed
// storage.

#include "scopereg/internal/scope_state.h"

#include <cassert>

#include "scopereg/error.h"

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

// ---- ScopeState ---------------------------------------------------------------------

ScopeState::ScopeState(ScopeKind kind) : ScopeState(new_scope_token(kind)) {}

ScopeState::ScopeState(ScopeToken token) : token_(token) {
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
  Slots& s = slots();
  {
    MutexLock lock(mu_);
    if (last) closing_ = true;
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
        assert(reg != nullptr);
        reg->live_.fetch_sub(1, std::memory_order_relaxed);
        dying_.add(reg, node);
      }
    }
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
