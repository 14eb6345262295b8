#include "scopereg/internal/registry_record.h"

#include <algorithm>

#include "scopereg/internal/fork.h"

namespace scopereg::internal {

constinit Mutex g_process_mutex;

namespace {

struct Teardown {
  CondVar destroyed;  // some RegistryRecord's destroying_ dropped to 0
  DyingList* dying ABSL_GUARDED_BY(g_process_mutex) = nullptr;
  std::vector<RegistryRecord*> subscribers ABSL_GUARDED_BY(g_process_mutex);
};

Teardown& teardown() {
  static Teardown* const t = new Teardown;  // never destroyed, on purpose
  return *t;
}

}  // namespace

// ---- DyingList ----------------------------------------------------------------------

void DyingList::add(RegistryRecord* record, NodeBase* node) {
  Teardown& t = teardown();
  items_.push_back(Item{record, node, false});
  if (!registered_) {
    registered_ = true;
    owner_ = current_thread_serial();
    prev_ = nullptr;
    next_ = t.dying;
    if (t.dying != nullptr) t.dying->prev_ = this;
    t.dying = this;
  }
}

void DyingList::destroy_all() noexcept {
  Teardown& t = teardown();
  RegistryRecord* finished = nullptr;  // the record of the value destroyed last round
  for (;;) {
    Item item{};
    {
      MutexLock lock(g_process_mutex);
      // One lock per value: report the previous destruction and take the next value.
      if (finished != nullptr && --finished->destroying_ == 0) t.destroyed.notify_all();
      auto it = std::find_if(items_.begin(), items_.end(),
                             [](const Item& i) { return !i.taken; });
      if (it == items_.end()) {
        items_.clear();
        if (registered_) {
          if (prev_ != nullptr) prev_->next_ = next_; else t.dying = next_;
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

RegistryRecord::RegistryRecord() : stack_owner_(stack_owner(this)) {}

bool RegistryRecord::on_dead_stack_in_child() const { return on_dead_stack(stack_owner_); }

void forget_dead_records_in_child() noexcept {
  Teardown& t = teardown();
  MutexLock lock(g_process_mutex);
  // Registries on the stacks of threads that are gone: scope ends must not reach them.
  std::vector<RegistryRecord*> kept;
  for (RegistryRecord* r : t.subscribers) {
    if (on_dead_stack(r->stack_owner_)) {
      r->subscribed_ = false;
    } else {
      kept.push_back(r);
    }
  }
  t.subscribers.swap(kept);
  // Values other threads were destroying: abandoned with their lists (which may have lived
  // on those threads' stacks); nobody is destroying anything now.
  const std::uint64_t me = current_thread_serial();
  for (DyingList* list = t.dying; list != nullptr;) {
    DyingList* next = list->next_;
    if (list->owner_ != me) {
      if (list->prev_ != nullptr) list->prev_->next_ = next; else t.dying = next;
      if (next != nullptr) next->prev_ = list->prev_;
    }
    list = next;
  }
  for (RegistryRecord* r : t.subscribers) r->destroying_ = 0;
}

void RegistryRecord::retire(std::vector<NodeBase*>& out) {
  Teardown& t = teardown();
  MutexLock lock(g_process_mutex);
  if (subscribed_) {
    std::erase(t.subscribers, this);
    subscribed_ = false;
  }
  for (DyingList* list = t.dying; list != nullptr; list = list->next_) {
    for (DyingList::Item& item : list->items_) {
      if (!item.taken && item.record == this) {
        item.taken = true;
        out.push_back(item.node);
      }
    }
  }
  while (destroying_ != 0) t.destroyed.wait(g_process_mutex);
}

void RegistryRecord::subscribe_to_scope_ends() {
  install_fork_handlers();
  Teardown& t = teardown();
  MutexLock lock(g_process_mutex);
  t.subscribers.push_back(this);
  subscribed_ = true;
}

void collect_ended(TokenRef token, DyingList& out) {
  for (RegistryRecord* sub : teardown().subscribers) {
    if (NodeBase* node = sub->extract_for_end(token)) out.add(sub, node);
  }
}

void lock_subscribers_for_fork() {
  for (RegistryRecord* sub : teardown().subscribers) sub->lock_for_fork();
}

void unlock_subscribers_after_fork() {
  for (RegistryRecord* sub : teardown().subscribers) sub->unlock_after_fork();
}

void abandon_everywhere(TokenRef token) {
  for (RegistryRecord* sub : teardown().subscribers) {
    (void)sub->extract_for_end(token);  // left alive on purpose: the parent's
  }
}

void end_scope_everywhere(TokenRef token) {
  DyingList dying;
  {
    MutexLock lock(g_process_mutex);
    collect_ended(token, dying);
  }
  dying.destroy_all();
}

}  // namespace scopereg::internal
