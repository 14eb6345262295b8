// Process-wide state of scopereg: the list of live scopes, the table of registry indices,
// the ScopeToken-keyed registries that scope ends must reach, and the values being
// destroyed. It lives in never-destroyed storage in this one .cc file: no static
// destructor can run before a thread that exits late (DESIGN.md: folly#1969), and shared
// libraries see one copy (opentelemetry-cpp#1520).

#include "scopereg/internal/scope_state.h"

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "scopereg/error.h"

namespace scopereg::internal {
namespace {

constexpr int kMaxRounds = 8;    // after this, creation in a dying scope throws
constexpr int kHardRounds = 16;  // after this, end() stops (keyed leftovers stay owned)

struct Global {
  std::mutex mu;
  std::condition_variable cv;  // a RegistryRecord's destroying_ dropped to 0
  ScopeState* scopes = nullptr;
  DyingList* dying = nullptr;
  std::vector<SlotRegistry*> slots;  // by index, null when free
  std::vector<std::uint32_t> free_indices;
  std::vector<RegistryRecord*> subscribers;
};

Global& global() {
  static Global* const g = new Global;  // never destroyed, on purpose
  return *g;
}

constinit std::atomic<std::uint64_t> g_next_serial{1};
thread_local constinit char t_thread_context = 0;

}  // namespace

thread_local constinit const void* t_fiber_context = nullptr;

const void* current_context_id() noexcept {
  return t_fiber_context != nullptr ? t_fiber_context : &t_thread_context;
}

namespace {
constinit std::atomic<void (*)()> g_unwinding_check{nullptr};
}  // namespace

void rethrow_if_unwinding() {
  if (auto check = g_unwinding_check.load(std::memory_order_acquire)) check();
}

void set_unwinding_check(void (*check)()) noexcept {
  g_unwinding_check.store(check, std::memory_order_release);
}

void die_of_misuse(const char* what) noexcept {
  std::fprintf(stderr, "scopereg: fatal misuse: %s\n", what);
  std::abort();
}

void throw_factory_reentered() {
  throw ScopeError(
      "scopereg: a registry's factory re-entered the same registry in the same scope "
      "before returning; a factory must not use the value it is creating");
}

void throw_no_scope(const char* strategy) {
  throw ScopeError(std::string("scopereg: no active scope for ") + strategy +
                   ": enter one first (for ExplicitScope, hold a ScopeGuard; for a "
                   "ScopeFunc, return a non-null ScopeToken), or use find(), which "
                   "returns null instead of creating");
}

// ---- DyingList ----------------------------------------------------------------------

void DyingList::add(RegistryRecord* record, NodeBase* node) {
  Global& g = global();
  items_.push_back(Item{record, node, false});
  if (!registered_) {
    registered_ = true;
    prev_ = nullptr;
    next_ = g.dying;
    if (g.dying != nullptr) g.dying->prev_ = this;
    g.dying = this;
  }
}

void DyingList::destroy_all() noexcept {
  Global& g = global();
  RegistryRecord* finished = nullptr;  // the record of the value destroyed last round
  for (;;) {
    Item item{};
    {
      std::lock_guard<std::mutex> lock(g.mu);
      // One lock per value: report the previous destruction and take the next value.
      if (finished != nullptr && --finished->destroying_ == 0) g.cv.notify_all();
      auto it = std::find_if(items_.begin(), items_.end(),
                             [](const Item& i) { return !i.taken; });
      if (it == items_.end()) {
        items_.clear();
        if (registered_) {
          if (prev_ != nullptr) prev_->next_ = next_; else g.dying = next_;
          if (next_ != nullptr) next_->prev_ = prev_;
          registered_ = false;
        }
        return;
      }
      it->taken = true;
      item = *it;
      ++item.record->destroying_;
    }
    delete item.node;
    finished = item.record;
  }
}

// ---- RegistryRecord -----------------------------------------------------------------

void RegistryRecord::retire(std::vector<NodeBase*>& out) {
  Global& g = global();
  std::unique_lock<std::mutex> lock(g.mu);
  if (subscribed_) {
    std::erase(g.subscribers, this);
    subscribed_ = false;
  }
  for (DyingList* list = g.dying; list != nullptr; list = list->next_) {
    for (DyingList::Item& item : list->items_) {
      if (!item.taken && item.record == this) {
        item.taken = true;
        out.push_back(item.node);
      }
    }
  }
  g.cv.wait(lock, [this] { return destroying_ == 0; });
}

void RegistryRecord::subscribe_to_scope_ends() {
  Global& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  g.subscribers.push_back(this);
  subscribed_ = true;
}

// ---- SlotRegistry -------------------------------------------------------------------

SlotRegistry::SlotRegistry() {
  Global& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  if (!g.free_indices.empty()) {
    index_ = g.free_indices.back();
    g.free_indices.pop_back();
    g.slots[index_] = this;
  } else {
    constexpr std::uint64_t kLimit = kFirstChunkSlots * ((std::uint64_t{1} << kMaxChunks) - 1);
    if (g.slots.size() >= kLimit) {
      throw ScopeError("scopereg: too many registries alive at once; destroy some first");
    }
    index_ = static_cast<std::uint32_t>(g.slots.size());
    g.slots.push_back(this);
  }
  slot_ = slot_id_for(index_);
}

SlotRegistry::~SlotRegistry() {
  Global& g = global();
  std::vector<NodeBase*> nodes;
  {
    std::lock_guard<std::mutex> lock(g.mu);
    for (ScopeState* s = g.scopes; s != nullptr; s = s->next_) {
      std::lock_guard<std::mutex> scope_lock(s->mu_);
      if (NodeBase* n = s->load(slot_)) {
        s->store(slot_, nullptr);
        nodes.push_back(n);
      }
    }
  }
  retire(nodes);
  {
    std::lock_guard<std::mutex> lock(g.mu);
    g.slots[index_] = nullptr;
    g.free_indices.push_back(index_);
  }
  for (NodeBase* n : nodes) delete n;
}

void SlotRegistry::for_each(absl::FunctionRef<void(ScopeToken, NodeBase*)> visit) const {
  Global& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  for (ScopeState* s = g.scopes; s != nullptr; s = s->next_) {
    std::lock_guard<std::mutex> scope_lock(s->mu_);
    if (NodeBase* n = s->load(slot_)) visit(s->token_, n);
  }
}

// ---- ScopeState ---------------------------------------------------------------------

std::uint64_t next_scope_serial() noexcept {
  return g_next_serial.fetch_add(1, std::memory_order_relaxed);
}

ScopeState::ScopeState(ScopeKind kind) : ScopeState(ScopeToken(next_scope_serial(), kind)) {}

ScopeState::ScopeState(ScopeToken token) : token_(token) {
  Global& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  next_ = g.scopes;
  if (g.scopes != nullptr) g.scopes->prev_ = this;
  g.scopes = this;
}

ScopeState::~ScopeState() {
  assert(ended_ && "ScopeState destroyed without end()");
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

void ScopeState::wait_not_creating(std::unique_lock<std::mutex>& lock, std::uint32_t index,
                                   const void* context) {
  for (;;) {
    auto it = std::find_if(creating_.begin(), creating_.end(),
                           [index](const Creating& c) { return c.index == index; });
    if (it == creating_.end()) return;
    if (it->context == context) throw_factory_reentered();
    cv_.wait(lock);
  }
}

NodeBase* ScopeState::get_or_create(SlotRegistry& reg, absl::FunctionRef<NodeBase*()> make,
                                    bool* created) {
  const void* context = current_context_id();
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (NodeBase* n = load(reg.slot_)) {
      *created = false;
      return n;
    }
    if (closing_) {
      throw ScopeError(
          "scopereg: cannot create a value in a scope that is ending (a value's "
          "destructor kept creating values in its own dying scope)");
    }
    auto it = std::find_if(creating_.begin(), creating_.end(),
                           [&](const Creating& c) { return c.index == reg.index_; });
    if (it == creating_.end()) break;
    wait_not_creating(lock, reg.index_, context);
  }
  creating_.push_back(Creating{reg.index_, context});
  auto not_creating = [&] {
    std::erase_if(creating_, [&](const Creating& c) { return c.index == reg.index_; });
  };
  NodeBase* node = make_unlocked(lock, make, [&] {
    not_creating();
    cv_.notify_all();
  });
  not_creating();
  store(reg.slot_, node);
  reg.live_.fetch_add(1, std::memory_order_relaxed);
  cv_.notify_all();
  *created = true;
  return node;
}

NodeBase* ScopeState::exchange(SlotRegistry& reg, NodeBase* node) {
  std::unique_lock<std::mutex> lock(mu_);
  wait_not_creating(lock, reg.index_, current_context_id());
  if (node != nullptr && closing_) {
    throw ScopeError("scopereg: cannot set a value in a scope that is ending");
  }
  NodeBase* old = load(reg.slot_);
  store(reg.slot_, node);
  reg.live_.fetch_add((node != nullptr) - (old != nullptr), std::memory_order_relaxed);
  return old;
}

void ScopeState::collect_round(bool last) {
  Global& g = global();
  {
    std::lock_guard<std::mutex> lock(mu_);
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
        SlotRegistry* reg = g.slots[base + o];
        assert(reg != nullptr);
        reg->live_.fetch_sub(1, std::memory_order_relaxed);
        dying_.add(reg, node);
      }
    }
  }
  for (RegistryRecord* sub : g.subscribers) {
    if (NodeBase* node = sub->extract_for_end(token_)) dying_.add(sub, node);
  }
}

void ScopeState::end() noexcept {
  Global& g = global();
  for (int round = 0;; ++round) {
    {
      std::lock_guard<std::mutex> lock(g.mu);
      if (round < kHardRounds) collect_round(round >= kMaxRounds);
      if (dying_.empty()) {
        {
          std::lock_guard<std::mutex> scope_lock(mu_);
          closing_ = true;
        }
        if (prev_ != nullptr) prev_->next_ = next_; else g.scopes = next_;
        if (next_ != nullptr) next_->prev_ = prev_;
        ended_ = true;
        return;
      }
    }
    dying_.destroy_all();
  }
}

}  // namespace scopereg::internal

namespace scopereg {

FuncScope::FuncScope(ScopeFunc func) : func_(std::move(func)) {
  if (!func_) {
    throw ScopeError(
        "scopereg: FuncScope needs a ScopeFunc; got an empty one. Pass a callable "
        "returning the current ScopeToken, e.g. ThreadScope::func()");
  }
}

void end_scope(ScopeToken token) {
  if (token.is_null()) return;
  internal::Global& g = internal::global();
  internal::DyingList dying;
  {
    std::lock_guard<std::mutex> lock(g.mu);
    for (internal::RegistryRecord* sub : g.subscribers) {
      if (internal::NodeBase* node = sub->extract_for_end(token)) dying.add(sub, node);
    }
  }
  dying.destroy_all();
}

}  // namespace scopereg
