// User-written scope strategies: what docs/adding-a-strategy.md promises, checked. Nothing
// here is part of scopereg; it uses only public headers, as an application would.

#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/thread_scope.h"

namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

// ---- The smallest complete user strategy (quoted in docs/adding-a-strategy.md) ----------

// The token: copyable, ==, and hashable with absl::Hash through an AbslHashValue friend.
struct TenantToken {
  std::string tenant;
  int session = 0;

  friend bool operator==(const TenantToken&, const TenantToken&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const TenantToken& t) {
    return H::combine(std::move(h), t.tenant, t.session);
  }
};

// Set by the application when a thread starts serving a tenant's session.
thread_local TenantToken t_tenant;

// The strategy: a small copyable type naming its Token and returning the caller's.
struct TenantScope {
  using Token = TenantToken;
  Token current() const { return t_tenant; }
};
static_assert(scopereg::ScopeStrategy<TenantScope>);

// Usage:
//   scopereg::ScopedRegistry<Cart, TenantScope> carts(make_cart);
//   t_tenant = {"acme", 1};
//   carts().add(item);                            // acme/1's cart
//   scopereg::end_scope(TenantToken{"acme", 1});  // acme/1's values die now, everywhere

// ---- end of the quoted example -----------------------------------------------------------

// Sets t_tenant for a block and restores the previous token.
class AsTenant {
 public:
  AsTenant(std::string tenant, int session)
      : saved_(std::exchange(t_tenant, TenantToken{std::move(tenant), session})) {}
  AsTenant(const AsTenant&) = delete;
  AsTenant& operator=(const AsTenant&) = delete;
  ~AsTenant() { t_tenant = std::move(saved_); }

 private:
  TenantToken saved_;
};

TEST(UserStrategy, EachTokenGetsItsOwnValue) {
  Counts counts;
  int next_id = 0;
  scopereg::ScopedRegistry<Counted, TenantScope> reg(
      [&] { return Counted(counts, ++next_id); });
  int acme1 = 0, acme2 = 0, globex1 = 0;
  {
    AsTenant as("acme", 1);
    acme1 = reg().id();
  }
  {
    AsTenant as("acme", 2);  // same tenant, other session: another scope
    acme2 = reg().id();
  }
  {
    AsTenant as("globex", 1);  // same session number, other tenant: another scope
    globex1 = reg().id();
  }
  EXPECT_NE(acme1, acme2);
  EXPECT_NE(acme1, globex1);
  EXPECT_NE(acme2, globex1);
  EXPECT_EQ(reg.size(), 3);
  {
    AsTenant as("acme", 1);
    EXPECT_EQ(reg().id(), acme1);  // back to acme/1: its own value again
  }
}

TEST(UserStrategy, TheFactoryRunsOncePerToken) {
  int calls = 0;
  scopereg::ScopedRegistry<int, TenantScope> reg([&] { return ++calls; });
  AsTenant as("acme", 1);
  int& first = reg();
  EXPECT_EQ(&reg(), &first);
  EXPECT_EQ(&reg(), &first);
  EXPECT_EQ(calls, 1);
  // The same token on another thread is the same scope: no second call.
  std::thread([&] {
    AsTenant there("acme", 1);
    EXPECT_EQ(&reg(), &first);
  }).join();
  EXPECT_EQ(calls, 1);
}

TEST(UserStrategy, EndScopeDestroysThatTokensValueInEveryRegistry) {
  Counts counts;
  scopereg::ScopedRegistry<Counted, TenantScope> a([&] { return Counted(counts); });
  scopereg::ScopedRegistry<Counted, TenantScope> b([&] { return Counted(counts); });
  {
    AsTenant as("acme", 1);
    a();
    b();
  }
  {
    AsTenant as("globex", 1);
    a();
  }
  EXPECT_EQ(counts.made, 3);

  scopereg::end_scope(TenantToken{"acme", 1});  // every registry keyed by TenantToken
  EXPECT_EQ(counts.destroyed, 2);
  EXPECT_EQ(a.size(), 1);  // globex/1 is untouched
  EXPECT_EQ(b.size(), 0);

  a.end_scope(TenantToken{"globex", 1});  // this registry only
  EXPECT_EQ(counts.destroyed, 3);
  EXPECT_EQ(a.size(), 0);

  scopereg::end_scope(TenantToken{"nobody", 0});  // no values: a no-op
  EXPECT_EQ(counts.destroyed, 3);
}

TEST(UserStrategy, ATokenReusedAfterItsEndStartsEmpty) {
  Counts counts;
  int next_id = 0;
  scopereg::ScopedRegistry<Counted, TenantScope> reg(
      [&] { return Counted(counts, ++next_id); });
  AsTenant as("acme", 7);
  const int first = reg().id();
  scopereg::end_scope(TenantToken{"acme", 7});
  EXPECT_FALSE(reg.has());
  EXPECT_EQ(reg.find(), nullptr);
  EXPECT_NE(reg().id(), first);  // created afresh
  EXPECT_EQ(counts.made, 2);
  EXPECT_EQ(counts.destroyed, 1);
}

TEST(UserStrategy, DestroyingTheRegistryDestroysTheRemainingValues) {
  Counts counts;
  {
    scopereg::ScopedRegistry<Counted, TenantScope> reg([&] { return Counted(counts); });
    for (int session = 0; session < 3; ++session) {
      AsTenant as("acme", session);
      reg();
    }
    scopereg::end_scope(TenantToken{"acme", 0});
    EXPECT_EQ(counts.destroyed, 1);
  }
  EXPECT_EQ(counts.made, 3);
  EXPECT_EQ(counts.destroyed, 3);  // each value exactly once
  scopereg::end_scope(TenantToken{"acme", 1});  // the registry is gone: nothing left
  EXPECT_EQ(counts.destroyed, 3);
}

TEST(UserStrategy, AFuncScopeOfRegistryOfTheSameTokenTypeEndsWithTheSameEndScope) {
  // FuncScopeOf<K>: the same strategy chosen at run time, from a function returning K.
  Counts counts;
  scopereg::ScopedRegistry<Counted, TenantScope> typed([&] { return Counted(counts); });
  scopereg::ScopedRegistry<Counted, scopereg::FuncScopeOf<TenantToken>> by_func(
      [&] { return Counted(counts); },
      scopereg::FuncScopeOf<TenantToken>([] { return t_tenant; }));
  {
    AsTenant as("acme", 3);
    typed();
    by_func();
  }
  EXPECT_EQ(counts.made, 2);
  // One end_scope reaches every registry keyed by TenantToken, whichever the form.
  scopereg::end_scope(TenantToken{"acme", 3});
  EXPECT_EQ(counts.destroyed, 2);
  EXPECT_EQ(typed.size(), 0);
  EXPECT_EQ(by_func.size(), 0);
}

// ---- A strategy minting its own ScopeTokens ---------------------------------------------

// A "job" runtime: each Job is a scope whose token is minted from a kind of its own, so it
// never equals a thread's, a fiber's, an explicit scope's or an application ScopeToken(id).
const scopereg::ScopeKind kJobKind = scopereg::new_scope_kind();

thread_local scopereg::ScopeToken t_job;  // the running job's token; null: no job

struct JobScope {
  using Token = scopereg::ScopeToken;
  Token current() const { return t_job; }
};
static_assert(scopereg::ScopeStrategy<JobScope>);

// Runs as the current job for its lifetime; its scope ends with it.
class Job {
 public:
  Job() : token_(scopereg::new_scope_token(kJobKind)), saved_(std::exchange(t_job, token_)) {}
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  ~Job() {
    t_job = saved_;
    scopereg::end_scope(token_);  // the job's values die with it, in every registry
  }
  scopereg::ScopeToken token() const { return token_; }

 private:
  scopereg::ScopeToken token_;
  scopereg::ScopeToken saved_;
};

TEST(UserStrategy, ANewScopeKindDiffersFromEveryBuiltInKind) {
  using scopereg::ScopeKind;
  for (ScopeKind built_in : {ScopeKind::kNone, ScopeKind::kUser, ScopeKind::kThread,
                             ScopeKind::kFiber, ScopeKind::kExplicit, ScopeKind::kBoostFiber}) {
    EXPECT_NE(kJobKind, built_in);
  }
  EXPECT_NE(scopereg::new_scope_kind(), kJobKind);  // every call returns a new kind
  EXPECT_NE(scopereg::ThreadScope::current().kind(), kJobKind);

  const scopereg::ScopeToken token = scopereg::new_scope_token(kJobKind);
  EXPECT_EQ(token.kind(), kJobKind);
  EXPECT_FALSE(token.is_null());
  EXPECT_NE(scopereg::new_scope_token(kJobKind), token);  // never reused
  // The same id under the application's kind is another scope.
  EXPECT_NE(scopereg::ScopeToken(token.id()), token);
}

TEST(UserStrategy, MintedTokensKeepTheirValuesApartAndEndScopeDestroysThem) {
  Counts counts;
  int next_id = 0;
  scopereg::ScopedRegistry<Counted, JobScope> reg([&] { return Counted(counts, ++next_id); });
  {
    Job job;
    const int mine = reg().id();
    EXPECT_EQ(reg().id(), mine);
    {
      Job nested;  // a new job: a new scope, however the ids compare
      EXPECT_NE(reg().id(), mine);
    }  // the nested job's value is destroyed here
    EXPECT_EQ(counts.destroyed, 1);
    EXPECT_EQ(reg().id(), mine);  // the outer job's value is untouched
    // An application token with the same id is not this job's scope.
    t_job = scopereg::ScopeToken(job.token().id());
    EXPECT_FALSE(reg.has());
    t_job = job.token();
    EXPECT_TRUE(reg.has());
  }  // ~Job: scopereg::end_scope(token)
  EXPECT_EQ(counts.made, 2);
  EXPECT_EQ(counts.destroyed, 2);
  EXPECT_EQ(reg.size(), 0);
}

TEST(UserStrategy, ANullMintedTokenMeansNoScope) {
  scopereg::ScopedRegistry<int, JobScope> reg([] { return 1; });
  ASSERT_TRUE(t_job.is_null());  // no job running
  EXPECT_EQ(reg.find(), nullptr);
  EXPECT_FALSE(reg.has());
  reg.clear();  // no scope: a no-op
  EXPECT_THROW(reg(), scopereg::ScopeError);
  Job job;
  EXPECT_EQ(reg(), 1);
}

}  // namespace
