#!/usr/bin/env python3
"""Runs every scopereg benchmark binary, writes their Google Benchmark JSON, a markdown
summary (ours beside each anchor, measured in the same binary and run, with the ratio and
the target it must hold) and a bar chart.

    python3 benchmarks/report.py BUILD_DIR OUT_DIR [--repetitions N] [--min-time S]

Figures are medians of the repetitions, CPU time per operation per thread (Google
Benchmark's CPU column), so multi-threaded rows compare directly with single-threaded ones.
"""

import argparse
import json
import os
import subprocess
import sys

# (label, ours, anchor, kind, bound): kind "max" means ours/anchor <= bound;
# "faster" means anchor/ours >= bound; "added" means ours - anchor <= bound ns; "ratio"
# is ours/anchor <= bound for two figures of one benchmark (no anchor's own ratio); "scaling" compares a benchmark's 2-thread figure
# with its 1-thread one (see SCALING_ANCHOR); "bytes" is a counter of one benchmark.
SCALING_ANCHOR = ("BM_ScopeLife_FollyStyleContext/threads:2",
                  "BM_ScopeLife_FollyStyleContext/threads:1")
SCALING_SLACK = 0.05  # how far above the anchor's own 2-vs-1-thread ratio ours may be
TARGETS = [
    ("Request scope life (token) vs folly-style context (1 thread)",
     "BM_ScopeLife_ExplicitScope/threads:1", "BM_ScopeLife_FollyStyleContext/threads:1",
     "max", 1.0),
    ("Scope life, fresh_scope (no token) vs folly-style context (1 thread)",
     "BM_ScopeLife_FreshScope/threads:1", "BM_ScopeLife_FollyStyleContext/threads:1",
     "max", 1.0),
    ("Scope life (token), 2 threads vs 1 (per-thread)", "BM_ScopeLife_ExplicitScope/threads:2",
     "BM_ScopeLife_ExplicitScope/threads:1", "scaling", 1.2),
    ("Scope life (fresh_scope), 2 threads vs 1 (per-thread)",
     "BM_ScopeLife_FreshScope/threads:2", "BM_ScopeLife_FreshScope/threads:1", "scaling", 1.2),
    ("Explicit churn, 2 threads vs 1 (per-thread)", "BM_Churn_ExplicitScope/threads:2",
     "BM_Churn_ExplicitScope/threads:1", "scaling", 1.2),
    ("wrap + call, 2 threads vs 1 (per-thread)", "BM_WrapAndCall/threads:2",
     "BM_WrapAndCall/threads:1", "scaling", 1.2),
    ("Guard enter/leave, 2 threads vs 1 (per-thread)", "BM_EnterLeave_ScopeGuard/threads:2",
     "BM_EnterLeave_ScopeGuard/threads:1", "scaling", 1.2),
    ("folly-style context (anchor), 2 threads vs 1 (per-thread)", SCALING_ANCHOR[0],
     SCALING_ANCHOR[1], "info", None),
    ("Scope life, 10,000 FuncScope registries alive vs none",
     "BM_ScopeLife_FuncScopeAlive/10000", "BM_ScopeLife_FuncScopeAlive/0", "max", 1.2),
    ("Scope life, 100 FuncScope registries alive vs none",
     "BM_ScopeLife_FuncScopeAlive/100", "BM_ScopeLife_FuncScopeAlive/0", "max", 1.2),
    ("FuncScope hit, 16 registries used alternately vs 1", "BM_Get_FuncScope_Registries/16",
     "BM_Get_FuncScope_Registries/1", "max", 1.5),
    ("FuncScope hit, 64 registries used alternately vs 1", "BM_Get_FuncScope_Registries/64",
     "BM_Get_FuncScope_Registries/1", "max", 1.5),
    ("Bytes per fresh scope's first value, beyond sizeof(T)",
     "BM_Memory_BytesPerValue_ExplicitScope/iterations:1", "bytes_per_value", "bytes", 64),
    ("copy_context() + run, 0 values vs folly-style shallow copy", "BM_CopyRun_CopyContext/0",
     "BM_CopyRun_FollyStyleShallowCopy/0", "max", 1.0),
    ("copy_context() + run, 4 values vs folly-style shallow copy", "BM_CopyRun_CopyContext/4",
     "BM_CopyRun_FollyStyleShallowCopy/4", "max", 1.0),
    ("copy_context() + run, 16 values vs folly-style shallow copy",
     "BM_CopyRun_CopyContext/16", "BM_CopyRun_FollyStyleShallowCopy/16", "max", 1.0),
    ("Guard enter/leave, a hooked value in scope vs no hooks",
     "BM_EnterLeave_ScopeGuard_HookedValue", "BM_EnterLeave_ScopeGuard/threads:1", "info", None),
    ("Guard enter/leave with a switch, a watcher registered vs no hooks",
     "BM_EnterLeave_ScopeGuard_Watcher", "BM_EnterLeave_ScopeGuard/threads:1", "info", None),
    ("BoostFiberScope hit vs fiber_specific_ptr", "BM_Get_BoostFiberScope",
     "BM_Get_BoostFiberSpecificPtr", "faster", 3.0),
    ("ThreadScope hit vs raw thread_local", "BM_Get_ThreadScope/threads:1",
     "BM_Get_RawThreadLocal/threads:1", "max", 3.0),
    ("ThreadScope hit vs boost::thread_specific_ptr", "BM_Get_ThreadScope/threads:1",
     "BM_Get_BoostThreadSpecificPtr/threads:1", "faster", 10.0),
    ("ThreadScope hit vs pthread_getspecific", "BM_Get_ThreadScope/threads:1",
     "BM_Get_PthreadGetspecific/threads:1", "faster", 1.0),
    ("ThreadScope hit vs SQLAlchemy-style map under a mutex", "BM_Get_ThreadScope/threads:1",
     "BM_Find_FlatHashMapUnderMutex/threads:1", "faster", 1.0),
    ("FuncScope hit vs lock-free map find + indirect call", "BM_Get_FuncScope/threads:1",
     "BM_Find_FlatHashMapPlusCall/threads:1", "max", 2.0),
    ("ExplicitScope hit vs raw thread_local", "BM_Get_ExplicitScope/threads:1",
     "BM_Get_RawThreadLocal/threads:1", "max", 4.0),
    ("FiberScope hit vs fiber_specific_ptr", "BM_Get_FiberScope/threads:1",
     "BM_Get_BoostFiberSpecificPtr", "faster", 4.0),
    ("Fiber switch round trip vs raw Boost.Context", "BM_SwitchRoundTrip_ScoperegFiber",
     "BM_SwitchRoundTrip_BoostContext", "max", 1.5),
    ("Fiber switch round trip vs Boost.Fiber yield", "BM_SwitchRoundTrip_ScoperegFiber",
     "BM_SwitchRoundTrip_BoostFiberYield", "faster", 5.0),
    ("SessionCache get(interned) vs ScopedRegistry hit",
     "BM_Get_SessionCacheByInternedName/threads:1", "BM_Get_ScopedRegistry/threads:1", "max", 2.0),
    ("SessionCache get(name) vs ScopedRegistry hit", "BM_Get_SessionCacheByName/threads:1",
     "BM_Get_ScopedRegistry/threads:1", "info", None),
    ("Thread churn (spawn+join with a value) vs empty spawn+join", "BM_Churn_ThreadScope",
     "BM_Churn_ThreadSpawnJoin_Empty", "info", None),
    ("co_await in a task scope (TaskScopePromise): time added per suspend/resume pair",
     "BM_CoAwait_TaskScope", "BM_CoAwait_Plain", "added", 5.0),
    ("co_await in a task scope vs a folly-style shared_ptr context swap",
     "BM_CoAwait_TaskScope", "BM_CoAwait_FollyStyleSwap", "max", 1.0),
    ("CoroutineScope hit inside a task vs ExplicitScope hit",
     "BM_Coro_Get_CoroutineScope", "BM_Coro_Get_ExplicitScopeInGuard", "max", 1.5),
    ("Task scope life, 2 threads vs 1 (per-thread)", "BM_TaskLife_TaskScope/threads:2",
     "BM_TaskLife_TaskScope/threads:1", "ratio", 1.2),
    ("Task scope life vs an empty coroutine's life", "BM_TaskLife_TaskScope/threads:1",
     "BM_TaskLife_Plain/threads:1", "info", None),
    ("Boost.Asio co_await post in a task (TaskExecutor): time added per round trip",
     "BM_Asio_CoAwaitPost_TaskExecutor", "BM_Asio_CoAwaitPost_Plain", "added", 5.0),
    ("Boost.Asio co_await post in a task vs a folly-style context-carrying executor",
     "BM_Asio_CoAwaitPost_TaskExecutor", "BM_Asio_CoAwaitPost_FollyStyleExecutor", "max", 1.0),
    ("Boost.Asio task life (co_spawn, one value, end) vs plain co_spawn of an empty task",
     "BM_Asio_TaskLife_TaskExecutor", "BM_Asio_TaskLife_Plain", "info", None),
    ("Pool checkout+checkin vs mutex+deque pool", "BM_Pool_CheckoutCheckin/threads:1",
     "BM_Pool_MutexDeque/threads:1", "max", 1.0),
    # One shared pool: "ours" is the 2-thread figure, "anchor" the same benchmark's 1-thread
    # figure; the row below reports the anchor pool's own ratio for comparison.
    ("Pool checkout+checkin, 2 threads vs 1 thread (per-thread)",
     "BM_Pool_CheckoutCheckin/threads:2", "BM_Pool_CheckoutCheckin/threads:1", "max", 1.2),
    ("mutex+deque pool (anchor), 2 threads vs 1 thread (per-thread)",
     "BM_Pool_MutexDeque/threads:2", "BM_Pool_MutexDeque/threads:1", "info", None),
]

# Hit benchmarks whose per-thread cost must not grow with threads (per-thread tokens).
SCALING = [
    ("folly-style request context life (anchor)", "BM_ScopeLife_FollyStyleContext"),
    ("ExplicitScope request scope life (token)", "BM_ScopeLife_ExplicitScope"),
    ("ExplicitScope request scope life (fresh_scope)", "BM_ScopeLife_FreshScope"),
    ("FuncScope over ExplicitScope::func(), scope life (token)", "BM_ScopeLife_FuncScopeToken"),
    ("ExplicitScope churn (a registry per thread)", "BM_Churn_ExplicitScope"),
    ("wrap() + call", "BM_WrapAndCall"),
    ("ScopeGuard enter/leave", "BM_EnterLeave_ScopeGuard"),
    ("raw thread_local (anchor)", "BM_Get_RawThreadLocal"),
    ("ThreadScope", "BM_Get_ThreadScope"),
    ("ExplicitScope", "BM_Get_ExplicitScope"),
    ("FiberScope", "BM_Get_FiberScope"),
    ("FuncScope", "BM_Get_FuncScope"),
    ("SessionCache get(interned)", "BM_Get_SessionCacheByInternedName"),
    ("SessionCache get(name)", "BM_Get_SessionCacheByName"),
    ("boost::thread_specific_ptr (anchor)", "BM_Get_BoostThreadSpecificPtr"),
    ("map under std::mutex (anchor)", "BM_Find_FlatHashMapUnderMutex"),
]
SCALING_BOUND = 1.3  # at 2 threads, on this 2-core machine


def run(build, out, repetitions, min_time):
    """Returns {binary: {benchmark: median ns}} and {benchmark: counters}."""
    by_binary = {}
    counters = {}
    bench_dir = os.path.join(build, "benchmarks")
    binaries = sorted(f for f in os.listdir(bench_dir) if f.endswith("_benchmark"))
    if not binaries:
        sys.exit(f"report.py: no *_benchmark binaries in {bench_dir}")
    for binary in binaries:
        json_path = os.path.join(out, binary + ".json")
        print(f"running {binary} ...", flush=True)
        subprocess.run(
            [os.path.join(bench_dir, binary), f"--benchmark_repetitions={repetitions}",
             "--benchmark_report_aggregates_only=true", f"--benchmark_min_time={min_time}",
             f"--benchmark_out={json_path}", "--benchmark_out_format=json"],
            check=True, stdout=subprocess.DEVNULL)
        by_binary[binary] = load(json_path, counters)
    return by_binary, counters


def load(json_path, counters):
    results = {}
    with open(json_path) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        if b.get("aggregate_name") not in ("median", None):
            continue
        name = b.get("run_name", b["name"])
        if b.get("aggregate_name") is None and name in results:
            continue  # a single-iteration benchmark without aggregates
        scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}[b.get("time_unit", "ns")]
        results[name] = b["cpu_time"] * scale
        extra = {k: v for k, v in b.items() if k in ("bytes_per_value", "bytes_delta",
                                                     "live_values", "items_per_second")}
        if extra:
            counters[name] = extra
    return results


def pick(by_binary, ours, anchor):
    """Ours and the anchor from the same binary (the anchors run in every binary)."""
    for results in by_binary.values():
        if ours in results and anchor in results:
            return results[ours], results[anchor]
    return None, None


def merged(by_binary):
    """One figure per benchmark, for tables of our own operations: the anchors of
    anchors.cc run in every binary; their figure is taken from scoped_registry_benchmark."""
    out = {}
    for binary in sorted(by_binary, key=lambda b: b == "scoped_registry_benchmark"):
        out.update(by_binary[binary])
    return out


def fmt_ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.2f} ns"


def summarize(by_binary, counters):
    results = merged(by_binary)
    lines = ["# scopereg benchmark summary", "",
             "Medians, CPU time per operation per thread; ours and the anchor measured in the "
             "same binary and run.", "",
             "| comparison | ours | anchor | ratio | target | holds |",
             "|---|---|---|---|---|---|"]
    verdicts = []
    for label, ours, anchor, kind, bound in TARGETS:
        if kind == "bytes":
            v = counters.get(ours, {}).get(anchor)
            ok = v is not None and v <= bound
            verdicts.append(ok)
            shown = f"{v:.0f} B" if v is not None else "missing"
            lines.append(f"| {label} | {shown} | | | <= {bound} B | {'yes' if ok else 'no'} |")
            continue
        o, a = pick(by_binary, ours, anchor)
        if o is None:
            lines.append(f"| {label} | missing | missing | | | |")
            verdicts.append(False)
            continue
        if kind == "max":
            ratio, target, ok = o / a, f"<= {bound}x the anchor", o / a <= bound
            ratio_s = f"{ratio:.2f}x"
        elif kind == "ratio":  # a benchmark's own 2-thread figure against its 1-thread one
            ratio, target, ok = o / a, f"<= {bound}x", o / a <= bound
            ratio_s = f"{ratio:.2f}x"
        elif kind == "added":
            ratio, target, ok = o - a, f"<= {bound:g} ns added", o - a <= bound
            ratio_s = f"+{fmt_ns(o - a)}"
        elif kind == "faster":
            ratio, target, ok = a / o, f">= {bound}x faster", a / o >= bound
            ratio_s = f"{ratio:.1f}x faster"
        elif kind == "scaling":
            a2, a1 = pick(by_binary, *SCALING_ANCHOR)
            if a2 is None:
                a2, a1 = results.get(SCALING_ANCHOR[0]), results.get(SCALING_ANCHOR[1])
            anchor_ratio = a2 / a1 if a2 is not None else None
            ratio = o / a
            ratio_s = f"{ratio:.2f}x"
            if anchor_ratio is None:
                target, ok = f"<= {bound}x", ratio <= bound
            else:
                limit = anchor_ratio + SCALING_SLACK
                target = (f"<= {bound}x and <= anchor's {anchor_ratio:.2f}x"
                          f" + {SCALING_SLACK}")
                ok = ratio <= bound and ratio <= limit
        else:
            ratio_s, target, ok = f"{o / a:.2f}x", "(reported)", None
        verdicts.append(ok is not False)
        holds = "yes" if ok else ("no" if ok is False else "")
        lines.append(f"| {label} | {fmt_ns(o)} | {fmt_ns(a)} | {ratio_s} | {target} | {holds} |")
    lines += ["", "## Scaling: per-thread CPU time relative to 1 thread", "",
              f"2 cores here: the 2-thread column is the one to hold (target <= {SCALING_BOUND}x "
              "for every strategy with per-thread tokens); beyond 2 threads they share cores.", "",
              "| hit | 1 thread | 2 | 4 | 8 | 16 |", "|---|---|---|---|---|---|"]
    for label, base in SCALING:
        one = results.get(f"{base}/threads:1")
        if one is None:
            continue
        cells = [fmt_ns(one)]
        for t in (2, 4, 8, 16):
            v = results.get(f"{base}/threads:{t}")
            cells.append(f"{v / one:.2f}x" if v is not None else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        two = results.get(f"{base}/threads:2")
        if (two is not None and "anchor" not in label and "get(name)" not in label
                and not base.startswith(("BM_ScopeLife", "BM_Churn", "BM_WrapAndCall",
                                         "BM_EnterLeave"))):  # those are target rows
            verdicts.append(two / one <= SCALING_BOUND)
    lines += ["", "## Churn and memory", "", "| benchmark | time per op | counters |",
              "|---|---|---|"]
    for name in sorted(results):
        if not (name.startswith("BM_Churn") or name.startswith("BM_Memory")
                or name.startswith("BM_MissCreateClear") or name.startswith("BM_FiberLife")
                or name.startswith("BM_ScopeLife") or name.startswith("BM_EnterLeave")
                or name.startswith("BM_WrapAndCall") or name.startswith("BM_ClearForCurrentScope")
                or name.startswith("BM_CopyRun") or name.startswith("BM_TaskLife")
                or name.startswith("BM_CoAwait") or name.startswith("BM_Asio")):
            continue
        c = counters.get(name, {})
        shown = ", ".join(f"{k} = {v:,.0f}" for k, v in sorted(c.items()))
        lines.append(f"| {name} | {fmt_ns(results[name])} | {shown} |")
    lines += ["", "## Every operation", "", "| benchmark | median CPU time |", "|---|---|"]
    for name in sorted(results):
        lines.append(f"| {name} | {fmt_ns(results[name])} |")
    return "\n".join(lines) + "\n", all(verdicts)


def chart(by_binary, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not installed (python3-matplotlib); no chart")
        return
    rows = []
    for label, o, a, kind, _ in TARGETS:
        ours, anchor = pick(by_binary, o, a)
        if kind in ("max", "faster") and ours is not None:
            rows.append((label, ours, anchor))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="scopereg",
            color="#2b7bba")
    ax.barh([y - 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="anchor",
            color="#bbbbbb")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ns per operation (median CPU time, log scale; shorter is better)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("scopereg beside its anchors, measured in the same run")
    fig.tight_layout()
    fig.savefig(path)
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=90)
    print(f"chart: {path} (and .png)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("build")
    p.add_argument("out")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.1)
    p.add_argument("--from-json", action="store_true",
                   help="re-make the summary and chart from OUT's JSON without running")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        counters = {}
        by_binary = {f[:-5]: load(os.path.join(args.out, f), counters)
                     for f in sorted(os.listdir(args.out)) if f.endswith("_benchmark.json")}
    else:
        by_binary, counters = run(args.build, args.out, args.repetitions, args.min_time)
    summary, all_hold = summarize(by_binary, counters)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    chart(by_binary, os.path.join(args.out, "chart.svg"))
    print("every target holds" if all_hold else "some target does not hold: see the table")


if __name__ == "__main__":
    main()
