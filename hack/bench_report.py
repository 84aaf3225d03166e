#!/usr/bin/env python3
"""Turns hack/bench.sh's raw results into one Markdown table (ratios and targets first).

  bench_report.py --raw DIR --out FILE --command CMD --versions TEXT --reps N --soak S --cell S
  bench_report.py --passes OHA_JSON RATE   exit 0 when an open-loop step met p99 <= 5 ms

Every figure is a median over the repetitions, with the spread (min..max) in brackets. "Added"
latency is paired: each repetition's proxy figure minus the direct figure of the same
repetition and concurrency, measured minutes apart at most.
"""

import argparse
import json
import os
import statistics
import sys

P99_LIMIT_S = 0.005
TARGET_NAMES = {
    "direct": "direct",
    "claudekey": "claudekey proxy",
    "baseline": "claudekey proxy, baseline build",
    "shared": "claudekey proxy, limits shared in Redis (on core 1)",
    "shared-r0": "claudekey proxy, limits shared in Redis on the proxy's core",
    "nginx": "nginx",
    "litellm": "LiteLLM",
    "agentgateway": "agentgateway",
    "portkey": "Portkey gateway",
    "bare": "a bare hyper forward (no policy)",
}
# The peer gateways a user would pick instead of claudekey (issue 21): claudekey's CPU per request
# should be below each one's.
PEERS = ("agentgateway", "portkey")
# The streaming row's measures, for claudekey's table and the peers' alike.
STREAM_FIELDS = (
    ("ttfb_p50_us", "TTFB p50"),
    ("ttfb_p99_us", "TTFB p99"),
    ("gap_p50_us", "gap between deltas p50"),
    ("gap_p99_us", "gap between deltas p99"),
    ("gap_max_us", "gap between deltas max"),
)


def load(path):
    with open(path) as f:
        return json.load(f)


def oha_summary(path):
    """p50/p99 (s), achieved req/s, 200s and real errors of one oha JSON report."""
    try:
        d = load(path)
    except (OSError, ValueError):
        return None
    pct = d.get("latencyPercentiles", {})
    codes = d.get("statusCodeDistribution", {}) or {}
    errors = {k: v for k, v in (d.get("errorDistribution", {}) or {}).items() if "deadline" not in k}
    ok = int(codes.get("200", 0))
    total = sum(int(v) for v in codes.values()) + sum(errors.values())
    return {
        "p50": pct.get("p50"),
        "p99": pct.get("p99"),
        "rps": d.get("summary", {}).get("requestsPerSec") or 0.0,
        "ok": ok,
        "bad": total - ok,
    }


def passes(path, rate):
    s = oha_summary(path)
    return bool(
        s and s["p99"] is not None and s["bad"] == 0 and s["p99"] <= P99_LIMIT_S and s["rps"] >= 0.95 * rate
    )


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.median(values), min(values), max(values))


def scale_by_count(scale):
    """The controller-scale rounds grouped by their number of ClaudeKeys, smallest first."""
    counts = sorted({m["count"] for m in scale})
    return [(c, [m for m in scale if m["count"] == c]) for c in counts]


def kib(v):
    return "n/a" if v is None else f"{v / 1024:.1f} MiB"


def round_cpu(records):
    """Where the large controller round's time went (bench.sh's `scale_cpu` record): CPU seconds
    per process over the round, the machine's busy and idle seconds, the round's wall time, and
    the floor the apiserver and etcd alone put under it (their CPU over the machine's cores).
    None without the record."""
    rec = next((r for r in reversed(records) if r["row"] == "scale_cpu"), None)
    if not rec:
        return None
    before, after = rec["before"], rec["after"]
    delta = {k: after[k] - before[k] for k in after if k in before}
    wall = delta.pop("t")
    busy, idle = delta.pop("machine_busy"), delta.pop("machine_idle")
    cores = rec.get("cores") or 1
    floor = None
    if "kube-apiserver" in delta and "etcd" in delta:
        floor = (delta["kube-apiserver"] + delta["etcd"]) / cores
    return {"count": rec["count"], "wall_s": wall, "busy_s": busy, "idle_s": idle,
            "cores": cores, "processes": delta, "floor_s": floor}


def gateway_tenants(records, raw, rss, scale):
    """Row 8: the gateway's c=64 cells at one tenant and at many, its RSS and change time."""
    cells = {}
    for label in ("one", "many"):
        runs = [oha_summary(os.path.join(raw, r["file"])) for r in records
                if r["row"] == "gateway_tenants" and r["tenants"] == label]
        runs = [x for x in runs if x]
        if not runs:
            return None
        cells[label] = {k: med([x[k] for x in runs]) for k in ("p50", "p99", "rps")}
    big = max(scale, key=lambda m: m["count"]) if scale else None
    return {
        "cells": cells,
        "tenants": (big["count"] + 1) if big else 1,
        "change_s": big and big.get("gateway_change_s"),
        "rss_many": rss.get(("gateway-tenants", "many")),
        "p99_one": cells["one"]["p99"],
        "p99_many": cells["many"]["p99"],
    }


def fmt(m, unit="", scale=1.0, digits=0):
    if m is None:
        return "n/a"
    mid, lo, hi = (x * scale for x in m)
    f = f"{{:.{digits}f}}"
    if lo == hi:
        return f"{f.format(mid)}{unit}"
    return f"{f.format(mid)}{unit} ({f.format(lo)}..{f.format(hi)})"


def kib_to_mb(kib):
    """The targets are in MB (10^6 bytes); /proc reports KiB."""
    return kib * 1024 / 1e6


def paired_rounds(raw, records, a="claudekey", b="nginx"):
    """Row 1's paired rounds: per percentile, the median of `a` minus `b` over the rounds in
    which both answered every request, its quartiles, the rounds in which `b` was ahead, and
    the number of rounds. None without such a round."""
    runs = {}
    for r in records:
        if r["row"] == "pair":
            runs.setdefault(r["round"], {})[r["target"]] = oha_summary(os.path.join(raw, r["file"]))
    rounds = [x for x in runs.values() if all(x.get(t) and x[t]["ok"] and not x[t]["bad"] for t in (a, b))]
    if not rounds:
        return None
    out = {}
    for field in ("p50", "p99"):
        d = sorted(x[a][field] - x[b][field] for x in rounds)
        q1, _, q3 = statistics.quantiles(d, n=4) if len(d) > 1 else (d[0], d[0], d[0])
        out[field] = (statistics.median(d), q1, q3, sum(v > 0 for v in d))
    out["rounds"] = len(rounds)
    return out


def verdict(value, limit, higher_is_better=False):
    if value is None:
        return "not measured"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "**missed**"


def report(args):
    raw = args.raw
    if args.baseline:
        TARGET_NAMES["baseline"] = f"claudekey proxy @{args.baseline}"
    records = []
    with open(os.path.join(raw, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))

    # ---- row 1: closed loop
    closed = {}  # (target, c, rep) -> summary + cpu
    for r in records:
        if r["row"] == "closed":
            s = oha_summary(os.path.join(raw, r["file"]))
            if s:
                s["cpu_s"] = r["cpu_s"]
                closed[(r["target"], r["c"], r["rep"])] = s
    targets = [t for t in TARGET_NAMES if any(k[0] == t for k in closed)]
    conc = sorted({k[1] for k in closed})
    reps = sorted({k[2] for k in closed})

    def added(t, c, field):
        out = []
        for rep in reps:
            a, d = closed.get((t, c, rep)), closed.get(("direct", c, rep))
            if a and d and a[field] is not None and d[field] is not None:
                out.append(a[field] - d[field])
        return med(out)

    def vs_baseline(c, measure):
        """This build over the baseline build, paired per repetition (both saw the same noise)."""
        out = []
        for rep in reps:
            a, b, d = (closed.get((t, c, rep)) for t in ("claudekey", "baseline", "direct"))
            if not (a and b and d and a["ok"] and b["ok"]):
                continue
            if measure == "cpu":
                num, den = a["cpu_s"] / a["ok"], b["cpu_s"] / b["ok"]
            else:
                num, den = a[measure] - d[measure], b[measure] - d[measure]
            if den > 0:
                out.append(num / den)
        return med(out)

    def cpu_per_req(t, c):
        out = []
        for rep in reps:
            s = closed.get((t, c, rep))
            if s and s["ok"]:
                out.append(s["cpu_s"] / s["ok"])
        return med(out)

    # ---- row 1: open loop
    sweep = {}  # (target, rep) -> best passing rate
    for r in records:
        if r["row"] == "sweep":
            key = (r["target"], r["rep"])
            sweep.setdefault(key, 0)
            if passes(os.path.join(raw, r["file"]), r["rate"]):
                sweep[key] = max(sweep[key], r["rate"])
    max_rate = {t: med([v for (tt, _), v in sweep.items() if tt == t]) for t in targets}

    # ---- row 2: streaming
    stream = {}
    for r in records:
        if r["row"] == "stream":
            stream[(r["target"], r["rep"])] = dict(r["m"])
    # TTFB from the run of many one-delta streams where there is one (a p99 of the 64-delta
    # streams alone is their maximum).
    ttfb_streams = []
    for r in records:
        if r["row"] == "stream_ttfb" and (r["target"], r["rep"]) in stream:
            for field in ("ttfb_p50_us", "ttfb_p99_us"):
                stream[(r["target"], r["rep"])][field] = r["m"][field]
            ttfb_streams.append(r["m"]["streams"])
    s_reps = sorted({k[1] for k in stream})

    def s_added(field, target="claudekey"):
        return med(
            [
                stream[(target, rep)][field] - stream[("direct", rep)][field]
                for rep in s_reps
                if (target, rep) in stream and ("direct", rep) in stream
            ]
        )

    def s_abs(t, field):
        return med([stream[(t, rep)][field] for rep in s_reps if (t, rep) in stream])

    # The floor under row 2: a round trip to a bare echo on the proxy's core, by idle gap.
    wake = {}
    for r in records:
        if r["row"] == "wake":
            wake.setdefault(r["m"]["idle_ms"], []).append(r["m"])

    def wake_fig(idle_ms, field):
        return med([m[field] for m in wake.get(idle_ms, [])])

    # ---- row 3: footprint
    rss = {(r["target"], r["phase"]): r["kib"] for r in records if r["row"] == "rss"}
    anon = {(r["target"], r["phase"]): r.get("anon_kib") for r in records if r["row"] == "rss"}
    soak = next((r for r in records if r["row"] == "soak"), None)
    soak_summary, rss_1k, rss_growth, soak_cpu = None, None, None, None
    if soak:
        soak_summary = oha_summary(os.path.join(raw, soak["file"]))
        samples = []
        with open(os.path.join(raw, soak["samples"])) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] != "0":
                    samples.append(int(parts[1]))
        steady = samples[2:] or samples
        if steady:
            rss_1k = (statistics.median(steady), min(steady), max(steady))
            k = max(1, min(10, len(steady) // 3))
            rss_growth = statistics.mean(steady[-k:]) - statistics.mean(steady[:k])
        if soak_summary and soak_summary["ok"]:
            soak_cpu = soak["cpu_s"] / soak_summary["ok"]

    # ---- rows 4 and 6: criterion
    crit = {}
    croot = os.path.join(raw, "criterion")
    for dirpath, _, files in os.walk(croot):
        if os.path.basename(dirpath) == "new" and "estimates.json" in files:
            est = load(os.path.join(dirpath, "estimates.json"))
            bench = load(os.path.join(dirpath, "benchmark.json"))
            tp = (bench.get("throughput") or {}).get("Bytes")
            m = est["median"]
            crit[bench["full_id"]] = {
                "ns": m["point_estimate"],
                "lo": m["confidence_interval"]["lower_bound"],
                "hi": m["confidence_interval"]["upper_bound"],
                "bytes": tp,
            }

    scale = [r["m"] for r in records if r["row"] == "scale"]
    big_round = round_cpu(records)

    admission = None
    ad = next((r for r in records if r["row"] == "admission"), None)
    if ad:
        admission = load(os.path.join(raw, ad["file"]))

    # ---------------------------------------------------------------- output
    L = []
    w = L.append
    w("# claudekey benchmarks")
    w("")
    w(f"Produced by `{args.command}`" + (" (**smoke run: figures are meaningless**)" if args.smoke else "") + ".")
    w("")
    for v in args.versions.strip().splitlines():
        w(f"- {v}")
    w(
        f"- {len(reps)} repetitions, interleaved in a random order per cell; closed-loop cells of {args.cell} s; "
        f"figures are medians with the spread (min..max over repetitions) in brackets"
    )
    w("- CPU pinning: the proxy under test on core 0; load generator (oha) and fake upstream on core 1")
    w("")
    w("## Headline: ratios and targets")
    w("")
    w("| Measure | Figure | Target (issue 9) | Verdict |")
    w("| --- | --- | --- | --- |")
    a50 = added("claudekey", 1, "p50") if 1 in conc else None
    a99 = added("claudekey", 1, "p99") if 1 in conc else None
    for peer in ("litellm", "nginx"):
        p99 = added(peer, 1, "p99") if peer in targets and 1 in conc else None
        if p99 and a99 and a99[0] > 0:
            target = ">= 10x" if peer == "litellm" else "(reference)"
            v = verdict(p99[0] / a99[0], 10, True) if peer == "litellm" else ""
            w(
                f"| {TARGET_NAMES[peer]} added p99 / claudekey added p99, c=1 | "
                f"**{p99[0] / a99[0]:.1f}x** ({fmt(p99, ' µs', 1e6)} vs {fmt(a99, ' µs', 1e6)}) | {target} | {v} |"
            )
        elif peer == "litellm":
            w(f"| LiteLLM added p99 / claudekey added p99, c=1 | not measured | >= 10x | not measured |")
    pairs = paired_rounds(raw, records)
    if pairs:

        def us(x):
            return f"{x * 1e6:+.0f} µs"

        (m50, l50, h50, n50), (m99, l99, h99, n99) = pairs["p50"], pairs["p99"]
        w(
            f"| claudekey minus nginx at c=1, p50 / p99, {pairs['rounds']} paired rounds (median; quartiles; rounds nginx was ahead) | "
            f"**{us(m50)} / {us(m99)}** ({us(l50)}..{us(h50)} / {us(l99)}..{us(h99)}; {n50} / {n99} of {pairs['rounds']}) | "
            f"<= 0 (issue 21) | {verdict(max(m50, m99), 0)} |"
        )
    if "baseline" in targets:
        for c in [c for c in (1, 64) if c in conc]:
            for measure, label in (("p50", "added p50"), ("p99", "added p99"), ("cpu", "CPU per request")):
                r = vs_baseline(c, measure)
                w(
                    f"| claudekey / baseline build {args.baseline}: {label}, c={c} (paired per repetition) | "
                    f"**{fmt(r, 'x', 1, 2)}** | (regression check) | |"
                )
    for peer in ("litellm", "nginx"):
        cp, cc = cpu_per_req(peer, 64) if peer in targets else None, cpu_per_req("claudekey", 64)
        if cp and cc:
            w(f"| {TARGET_NAMES[peer]} CPU per request / claudekey CPU per request, c=64 | **{cp[0] / cc[0]:.1f}x** | | |")
    # hack/hotpath.sh: counted under valgrind (one run, exact to a fraction of a percent).
    hot = {r["target"]: r for r in records if r["row"] == "hotpath"}
    for t in [t for t in ("claudekey", "baseline", "nginx") if t in hot]:
        h = hot[t]
        name = {"claudekey": "claudekey", "nginx": "nginx (bare proxy, checks nothing)"}.get(
            t, f"claudekey @{args.baseline}")
        ratios = []
        if t == "claudekey":
            for other, what in (("baseline", "the baseline build's"), ("nginx", "nginx's")):
                if other in hot and hot[other]["instructions"] > 0:
                    ratios.append(f"{h['instructions'] / hot[other]['instructions']:.2f}x {what} instructions")
        ratio = "; ".join(ratios)
        size = "" if h.get("alloc_bytes") is None else f" ({h['alloc_bytes']:,.0f} bytes)"
        misses = ""
        if h.get("l1i_misses") is not None:
            misses = f", {h['l1i_misses']:,.0f} L1i and {h['l1d_misses']:,.0f} L1d misses (32 KiB L1s simulated)"
        if h.get("sha256_portable_instructions"):
            misses += (f"; {h['sha256_portable_instructions']:,.0f} of the instructions are SHA-256 blocks run "
                       "portably (valgrind has no SHA extensions; with sha_ni about a tenth)")
        if h.get("pipeline_instructions"):
            misses += (f"; {h['pipeline_instructions']:,.0f} inside the request pipeline (`pipeline::handle`, "
                       "the policy and both messages' handling), the rest in hyper on both sides, tokio and "
                       "the exchange's end")
        w(
            f"| hot path: instructions and allocations per request, {name} "
            f"(valgrind, c=1, {'no policy' if t == 'nginx' else 'full policy'}) | "
            f"**{h['instructions']:,.0f} instructions, {h['allocations']:.1f} allocations{size}**{misses} | {ratio} | |"
        )
    for peer in PEERS:
        cp, cc = cpu_per_req(peer, 64) if peer in targets else None, cpu_per_req("claudekey", 64)
        name = f"{TARGET_NAMES[peer]} CPU per request / claudekey CPU per request, c=64"
        if cp and cc:
            w(
                f"| {name} | **{cp[0] / cc[0]:.1f}x** ({fmt(cp, ' µs', 1e6, 1)} vs {fmt(cc, ' µs', 1e6, 1)}) | "
                f"> 1x (issue 21) | {verdict(cp[0] / cc[0], 1, True)} |"
            )
        else:
            w(f"| {name} | not measured | > 1x (issue 21) | not measured |")
        p99 = added(peer, 1, "p99") if peer in targets and 1 in conc else None
        if p99 and a99 and a99[0] > 0:
            w(
                f"| {TARGET_NAMES[peer]} added p99 / claudekey added p99, c=1 | "
                f"**{p99[0] / a99[0]:.1f}x** ({fmt(p99, ' µs', 1e6)} vs {fmt(a99, ' µs', 1e6)}) | | |"
            )
    w(f"| claudekey added latency p50, c=1 | {fmt(a50, ' µs', 1e6)} | <= 100 µs | {verdict(a50 and a50[0] * 1e6, 100)} |")
    w(f"| claudekey added latency p99, c=1 | {fmt(a99, ' µs', 1e6)} | <= 300 µs | {verdict(a99 and a99[0] * 1e6, 300)} |")
    rtt = {}  # Redis's core -> [probe lines]
    for r in records:
        if r["row"] == "redis_rtt":
            rtt.setdefault(r["redis_core"], []).append(r["m"])
    placements = (("shared", 1, "Redis on the load generator's core"), ("shared-r0", 0, "Redis on the proxy's core"))
    for target, core, where in placements:
        for c in (1, 64):
            for field, goal in (("p50", 100), ("p99", None)):
                if target in targets and c in conc:
                    extra = med(
                        [
                            closed[(target, c, r)][field] - closed[("claudekey", c, r)][field]
                            for r in reps
                            if (target, c, r) in closed and ("claudekey", c, r) in closed
                            and closed[(target, c, r)][field] is not None and closed[("claudekey", c, r)][field] is not None
                        ]
                    )
                    t = f"<= {goal} µs (one loopback round trip)" if goal else ""
                    v = verdict(extra and extra[0] * 1e6, goal) if goal else ""
                    w(f"| shared limits minus local limits ({where}), latency {field}, c={c} | {fmt(extra, ' µs', 1e6)} | {t} | {v} |")
        lines = rtt.get(core, [])
        if lines:
            figs = ", ".join(
                f"{cmd.upper()} {fmt(med([m[cmd]['p50'] for m in lines]), ' µs')} / {fmt(med([m[cmd]['p99'] for m in lines]), ' µs')}"
                for cmd in ("ping", "evalsha")
            )
            w(f"| one loopback round trip to Redis from the proxy's core ({where}), p50 / p99 | {figs} | (reference) | |")
    for r in records:
        if r["row"] == "accuracy":
            ok = sum((oha_summary(os.path.join(raw, f)) or {"ok": 0})["ok"] for f in r["files"])
            allowed = r["limit"] + int(r["seconds"])
            w(
                f"| limit accuracy: requestsPerMinute {r['limit']} shared by {r['proxies']} proxy processes, {r['sent']} requests "
                f"in {r['seconds']:.1f} s | **{ok} admitted** (in-memory limits would admit up to {r['limit'] * r['proxies']}) | "
                f"{r['limit']} +/- 2 (+1 per second elapsed) | {'met' if r['limit'] - 2 <= ok <= allowed + 2 else 'missed'} |"
            )
    cc = cpu_per_req("claudekey", 64) if 64 in conc else None
    per_core = 1.0 / cc[0] if cc and cc[0] > 0 else None
    w(
        f"| claudekey req/s per proxy core (1 / CPU time per request, c=64) | "
        f"{'n/a' if per_core is None else f'{per_core:,.0f}'} | >= 8,000 | {verdict(per_core, 8000, True)} |"
    )
    mr = max_rate.get("claudekey")
    w(
        f"| claudekey max rate at p99 <= 5 ms (open loop, proxy on one core) | {fmt(mr, ' req/s')} | "
        f"(>= 8,000 per core) | {verdict(mr and mr[0], 8000, True)}{' (bounded by the load generator core if direct is no higher)' if mr else ''} |"
    )
    t99 = s_added("ttfb_p99_us")
    w(f"| streaming added TTFB p99 (response redaction off) | {fmt(t99, ' µs')} | <= 300 µs | {verdict(t99 and t99[0], 300)} |")
    t99r = s_added("ttfb_p99_us", "claudekey-redact")
    w(f"| streaming added TTFB p99 (response redaction on) | {fmt(t99r, ' µs')} | <= 300 µs | {verdict(t99r and t99r[0], 300)} |")
    t99n = s_added("ttfb_p99_us", "nginx")
    if t99n:
        w(f"| streaming added TTFB p99 through nginx, unbuffered (reference: the floor of one extra hop here) | {fmt(t99n, ' µs')} | | |")
    t99b = s_added("ttfb_p99_us", "bare")
    if t99b:
        w(f"| streaming added TTFB p99 through a bare hyper forward (reference: hyper and tokio alone, no policy) | {fmt(t99b, ' µs')} | | |")
    for peer in PEERS:
        t99p = s_added("ttfb_p99_us", peer)
        if t99p:
            w(f"| streaming added TTFB p99 through {TARGET_NAMES[peer]} | {fmt(t99p, ' µs')} | | |")
    w99 = wake_fig(20, "p99_us")
    if w99:
        w(f"| round trip to a bare echo on the proxy's core after 20 ms idle, p99 (reference: what waking an idle vCPU costs here) | {fmt(w99, ' µs')} | | |")
    g99 = s_added("gap_p99_us")
    w(f"| streaming added gap between deltas p99 (response redaction off) | {fmt(g99, ' µs')} | (no Nagle: far below 40 ms) | |")
    idle = rss.get(("claudekey", "idle"))
    idle_anon = anon.get(("claudekey", "idle"))
    w(
        f"| proxy RSS idle | {'n/a' if idle is None else f'{idle / 1024:.1f} MiB ({kib_to_mb(idle):.1f} MB)'}"
        f"{'' if not idle_anon else f' (anonymous: {idle_anon / 1024:.1f} MiB; the rest is pages of the executable)'} | <= 15 MB | "
        f"{verdict(idle and kib_to_mb(idle), 15)} |"
    )
    w(
        f"| proxy RSS at 1k req/s | {fmt(rss_1k, ' MiB', 1 / 1024, 1)} | <= 30 MB | "
        f"{verdict(rss_1k and kib_to_mb(rss_1k[2]), 30)} |"
    )
    handler = [v for k, v in crit.items() if k.startswith("admission_review_10_containers/")]
    worst = max(handler, key=lambda v: v["ns"]) if handler else None
    w(
        f"| webhook handler time per AdmissionReview, 10 containers (criterion median of the slowest case) | "
        f"{'n/a' if not worst else '%.1f µs' % (worst['ns'] / 1000)} | p99 <= 1 ms | "
        f"{verdict(worst and worst['hi'] / 1e6, 1)} |"
    )
    if scale:
        for count, runs in scale_by_count(scale):
            ready = med([m["ready_s"] for m in runs])
            per_key = med([m["api_requests"] / m["count"] for m in runs])
            bound = ""
            if big_round and big_round["count"] == count and big_round["floor_s"] is not None:
                bound = (f" (the apiserver's and etcd's CPU alone: {big_round['floor_s']:.1f} s on "
                         f"{big_round['cores']} cores; section 5)")
            w(
                f"| {count:,} ClaudeKeys applied at once: all Ready | {fmt(ready, ' s', 1, 1)}{bound} | <= 60 s | "
                f"{verdict(ready[2] if count >= 1000 else None, 60)} |"
            )
            w(
                f"| {count:,} ClaudeKeys: API requests per ClaudeKey | {fmt(per_key, '', 1, 2)} | "
                f"{'<= 4 (issue 21)' if count >= 10000 else ''} | {verdict(per_key[2], 4) if count >= 10000 else ''} |"
            )
    else:
        w("| 1,000 ClaudeKeys Ready | not measured (no control plane) | <= 60 s | not measured |")
    gwt = gateway_tenants(records, raw, rss, scale)
    if gwt:
        many_rss, change, one99, many99, many_n = gwt["rss_many"], gwt["change_s"], gwt["p99_one"], gwt["p99_many"], gwt["tenants"]
        w(f"| one gateway with {many_n:,} tenants: RSS | {kib(many_rss)} | <= 100 MiB | {verdict(many_rss and many_rss / 1024, 100)} |")
        w(f"| one gateway with {many_n:,} tenants: a rotated key accepted after | {'n/a' if change is None else '%.2f s' % change} | <= 2 s | {verdict(change, 2)} |")
        ratio = many99[0] / one99[0] if one99 and many99 else None
        w(
            f"| one gateway, c=64 p99 with {many_n:,} tenants / with one | "
            f"{'n/a' if ratio is None else '%.2fx' % ratio} ({fmt(many99, ' µs', 1e6)} vs {fmt(one99, ' µs', 1e6)}) | <= 1.10x | {verdict(ratio, 1.10)} |"
        )
    for r in (r for r in records if r["row"] == "tenant_heap"):
        m = r["m"]
        distinct = m["per_distinct_policy"]
        prescreen = distinct.get("prescreen", 0)
        w(
            f"| heap per gateway tenant, {r['policy']} policy shared by {m['count']:,} tenants | {m['bytes_per_tenant'] / 1024:.1f} KiB "
            f"(a distinct policy adds {distinct['redactor'] / 1024:.1f} KiB redactor, "
            f"{f'{prescreen / 1024:.1f} KiB prescreen, ' if prescreen else ''}"
            f"{distinct['scope'] / 1024:.1f} KiB model globs) | | |"
        )
    w("")

    w("## 1. Proxy overhead (non-streaming Messages request, ~1 KB prompt)")
    w("")
    w(
        "Closed loop: oha with a fixed number of connections. Latency is what oha sees; *added* is minus "
        "the direct figure of the same repetition. CPU per request is the proxy process's user+system "
        "time (/proc/PID/stat) over the requests it served."
    )
    w("")
    w("| Target | c | p50 | p99 | added p50 | added p99 | req/s | CPU per request |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in conc:
        for t in targets:
            p50 = med([closed[(t, c, r)]["p50"] for r in reps if (t, c, r) in closed])
            p99 = med([closed[(t, c, r)]["p99"] for r in reps if (t, c, r) in closed])
            rps = med([closed[(t, c, r)]["rps"] for r in reps if (t, c, r) in closed])
            bad = sum(closed[(t, c, r)]["bad"] for r in reps if (t, c, r) in closed)
            d = t == "direct"
            cpu = "—" if d else fmt(cpu_per_req(t, c), " µs", 1e6)
            w(
                f"| {TARGET_NAMES[t]}{f' ({bad} failed)' if bad else ''} | {c} | {fmt(p50, ' µs', 1e6)} | {fmt(p99, ' µs', 1e6)} | "
                f"{'—' if d else fmt(added(t, c, 'p50'), ' µs', 1e6)} | {'—' if d else fmt(added(t, c, 'p99'), ' µs', 1e6)} | "
                f"{fmt(rps)} | {cpu} |"
            )
    w("")
    w(
        "Open loop (oha -q with 32 connections, constant arrival rate, latency corrected for coordinated omission): the highest "
        "rate of the sweep whose p99 stayed <= 5 ms with >= 95% of the rate achieved and no failed request. "
        "The direct row is the ceiling of the load-generator core."
    )
    w("")
    w("| Target | max req/s at p99 <= 5 ms |")
    w("| --- | --- |")
    for t in targets:
        w(f"| {TARGET_NAMES[t]} | {fmt(max_rate.get(t))} |")
    w("")

    w("## 2. Streaming (paced SSE upstream: 64 text deltas, 20 ms apart)")
    w("")
    if ttfb_streams:
        long_streams = sorted({stream[k]["streams"] for k in stream})
        w(f"TTFB from {min(ttfb_streams)} streams of one delta per target and repetition (the request asks "
          f"for 2 tokens and the upstream stops there), each after 60 ms of quiet; the gaps and delta counts from "
          f"{'/'.join(str(n) for n in long_streams)} streams of 64 deltas.")
        w("")
    if s_reps:
        w("| Measure | direct | claudekey | added | claudekey, response redaction on | added | nginx (unbuffered) | added |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for field, label in STREAM_FIELDS:
            w(
                f"| {label} | {fmt(s_abs('direct', field), ' µs')} | {fmt(s_abs('claudekey', field), ' µs')} | "
                f"{fmt(s_added(field), ' µs')} | {fmt(s_abs('claudekey-redact', field), ' µs')} | "
                f"{fmt(s_added(field, 'claudekey-redact'), ' µs')} | {fmt(s_abs('nginx', field), ' µs')} | "
                f"{fmt(s_added(field, 'nginx'), ' µs')} |"
            )
        row = lambda f: " | ".join(
            [fmt(s_abs("direct", f)), fmt(s_abs("claudekey", f)), "", fmt(s_abs("claudekey-redact", f)), "",
             fmt(s_abs("nginx", f)), ""]
        )
        w(f"| gaps > 30 ms per run (the Nagle signature is ~40 ms) | {row('gaps_over_30ms')} |")
        w(f"| fewest delta events seen in one stream (upstream sends 64) | {row('min_deltas')} |")
        w("")
        peers = [p for p in PEERS if any(k[0] == p for k in stream)]
        if peers:
            w("The peer gateways, same streams, same repetitions (agentgateway with its request prompt guard on and "
              "no response guard, like the claudekey column; Portkey with its input guardrails):")
            w("")
            w("| Measure | " + " | ".join(f"{TARGET_NAMES[p]} | added" for p in peers) + " |")
            w("| --- |" + " --- | --- |" * len(peers))
            for field, label in STREAM_FIELDS:
                w(f"| {label} | " + " | ".join(f"{fmt(s_abs(p, field), ' µs')} | {fmt(s_added(field, p), ' µs')}" for p in peers) + " |")
            w("| gaps > 30 ms per run | " + " | ".join(f"{fmt(s_abs(p, 'gaps_over_30ms'))} | " for p in peers) + " |")
            w("| fewest delta events seen in one stream | " + " | ".join(f"{fmt(s_abs(p, 'min_deltas'))} | " for p in peers) + " |")
            w("")
        if any(k[0] == "bare" for k in stream):
            w("The HTTP stack's share: `examples/bare_forward`, hyper's server and client on tokio's single-threaded "
              "runtime as the proxy runs them, on the proxy's core, forwarding to the same paced upstream with no "
              "authentication, policy, audit or metrics. What claudekey adds beyond it is its own work on the request and the response.")
            w("")
            w("| Measure | a bare hyper forward | added |")
            w("| --- | --- | --- |")
            for field, label in STREAM_FIELDS[:2]:
                w(f"| {label} | {fmt(s_abs('bare', field), ' µs')} | {fmt(s_added(field, 'bare'), ' µs')} |")
            w("")
        if wake:
            w("The floor of one extra hop: a round trip from the streaming client's core to a bare TCP echo "
              "on the proxy's core (`examples/bench_wake`), back to back and after the stream's 20 ms pace.")
            w("")
            w("| echo round trip | p50 | p99 | max |")
            w("| --- | --- | --- | --- |")
            for idle_ms in sorted(wake):
                w(f"| after {idle_ms} ms idle | {fmt(wake_fig(idle_ms, 'p50_us'), ' µs')} | "
                  f"{fmt(wake_fig(idle_ms, 'p99_us'), ' µs')} | {fmt(wake_fig(idle_ms, 'max_us'), ' µs')} |")
            w("")
        w(
            "Streams run one at a time after warm-up streams, so every measured stream reuses warm "
            "connections; between streams the cores sit idle, and waking an idle vCPU on this virtual machine "
            "costs on the order of a millisecond, which is in every TTFB here (direct included) and shows up "
            "once more for each extra process on the path: compare the nginx column. "
            "Both claudekey proxies run the full request policy. With response redaction on, the proxy holds back a short "
            "carry-over per text block so a pattern split across deltas is still caught: held-back text leaves "
            "in a later event, and a delta whose text is all held back is not sent, so fewer delta events arrive "
            "and the gap between them grows by design."
        )
    else:
        w("not measured")
    w("")

    w("## 3. Footprint (resident set size)")
    w("")
    w("| Process | idle (after start) | under load | after load |")
    w("| --- | --- | --- | --- |")
    soak_note = ""
    if soak_summary:
        soak_note = (
            f"{fmt(rss_1k, ' MiB', 1 / 1024, 1)} at {soak_summary['rps']:.0f} req/s for {args.soak} s "
            f"(growth first vs last 10 s: {0 if rss_growth is None else rss_growth / 1024:+.1f} MiB)"
        )
    w(f"| claudekey proxy | {kib(rss.get(('claudekey', 'idle')))} | {soak_note or 'n/a'} | {kib(rss.get(('claudekey', 'after')))} |")
    for t in ("nginx", "litellm") + PEERS:
        if (t, "idle") in rss:
            w(f"| {TARGET_NAMES[t]} | {kib(rss.get((t, 'idle')))} | | {kib(rss.get((t, 'after')))} |")
    w(f"| claudekey webhook | {kib(rss.get(('webhook', 'idle')))} | | |")
    ci, cp, cb, ca = (rss.get(("controller", p)) for p in ("idle", "peak", "peak-big", "after"))
    if ci:
        sizes = [count for count, _ in scale_by_count(scale)]
        peaks = f"{kib(cp)} (peak while reconciling {sizes[0]:,} ClaudeKeys)" if sizes else kib(cp)
        if cb and len(sizes) > 1:
            peaks += f"; {kib(cb)} (peak with {sizes[-1]:,})"
        w(f"| claudekey controller | {kib(ci)} | {peaks} | {kib(ca)} |")
    else:
        w("| claudekey controller | not measured (no control plane) | | |")
    if soak_summary:
        w("")
        w(
            f"Soak: {soak_summary['ok']} requests, p99 {soak_summary['p99'] * 1e6:.0f} µs, "
            f"{soak_summary['bad']} failed, CPU per request {'n/a' if soak_cpu is None else f'{soak_cpu * 1e6:.1f} µs'}."
        )
    w("")

    w("## 4. Admission webhook")
    w("")
    w("| Measure | median | 95% CI of the median |")
    w("| --- | --- | --- |")
    for k in sorted(x for x in crit if x.startswith("admission_review_10_containers/")):
        v = crit[k]
        w(f"| handler {k.split('/', 1)[1]} (criterion, 10-container pod) | {v['ns'] / 1000:.1f} µs | {v['lo'] / 1000:.1f}..{v['hi'] / 1000:.1f} µs |")
    if admission:
        wo, wi = admission["without_ms"], admission["with_ms"]
        q = lambda xs, p: sorted(xs)[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")
        w(
            f"| create a 10-container Deployment through the apiserver, without webhooks (p50 / p99) | "
            f"{q(wo, 50):.2f} / {q(wo, 99):.2f} ms | n={len(wo)} |"
        )
        w(
            f"| same, with the mutating and validating webhooks registered (p50 / p99) | "
            f"{q(wi, 50):.2f} / {q(wi, 99):.2f} ms | n={len(wi)} |"
        )
        w(f"| added by the webhooks (p50 / p99) | {q(wi, 50) - q(wo, 50):.2f} / {q(wi, 99) - q(wo, 99):.2f} ms | |")
    else:
        w("| create latency through the apiserver | not measured (no control plane) | |")
    w("")

    w("## 5. Controller scale")
    w("")
    if scale:
        w(
            "`examples/bench_controller` creates the ClaudeKeys (32 creates in flight, over 10 namespaces, all "
            "reading one kubernetesSecret upstream key) against the real kube-apiserver while a `claudekey controller` "
            "process reconciles them, and follows them with one watch. API requests are the apiserver's "
            "`apiserver_request_total` growth minus the benchmark's own requests: an upper bound, since "
            "kube-controller-manager's background requests are in it too."
        )
        w("")
        groups = scale_by_count(scale)
        w("| Measure | " + " | ".join(f"{count:,} ClaudeKeys ({len(runs)} round{'s' if len(runs) > 1 else ''})" for count, runs in groups) + " |")
        w("| --- |" + " --- |" * len(groups))

        def line(label, values):
            w(f"| {label} | " + " | ".join(values) + " |")

        line("namespaces", [str(runs[0]["namespaces"]) for _, runs in groups])
        line("time to create them all", [fmt(med([m["apply_s"] for m in runs]), " s", 1, 1) for _, runs in groups])
        line("time until all are Ready (from the first create)", [fmt(med([m["ready_s"] for m in runs]), " s", 1, 1) for _, runs in groups])
        line("reconciles per ClaudeKey", [fmt(med([m["reconciles"] / m["count"] for m in runs]), "", 1, 2) for _, runs in groups])
        line("API requests by the controller", [fmt(med([m["api_requests"] for m in runs])) for _, runs in groups])
        line("API requests per ClaudeKey", [fmt(med([m["api_requests"] / m["count"] for m in runs]), "", 1, 2) for _, runs in groups])
        w("")
        count, runs = groups[-1]
        kinds = runs[-1].get("per_claudekey_by_kind") or {}
        shown = [(k, v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.01 and k != "POST claudekeys"]
        if shown:
            w(f"Requests per ClaudeKey by verb and resource, {count:,} ClaudeKeys (the benchmark's own creates left out; "
              "kube-controller-manager's requests for the new namespaces are in it):")
            w("")
            w("| verb resource | per ClaudeKey |")
            w("| --- | --- |")
            for k, v in shown:
                w(f"| {k} | {v:.2f} |")
        if big_round:
            w("")
            w(f"CPU over the {big_round['count']:,}-ClaudeKey round ({big_round['wall_s']:.1f} s from just before the first create "
              "until the benchmark returned; /proc, all threads and child processes): the machine's "
              f"{big_round['cores']} cores were busy {big_round['busy_s']:.1f} s and idle {big_round['idle_s']:.1f} s.")
            w("")
            w("| process | CPU | share of the cores' time |")
            w("| --- | --- | --- |")
            capacity = big_round["wall_s"] * big_round["cores"]
            named = 0.0
            names = {"controller": "claudekey controller", "gateway": "claudekey gateway (section 5b)"}
            for name, secs in sorted(big_round["processes"].items(), key=lambda kv: -kv[1]):
                named += secs
                w(f"| {names.get(name, name)} | {secs:.1f} s | {100 * secs / capacity:.0f}% |")
            w(f"| everything else (the benchmark, the kernel's own threads) | {max(big_round['busy_s'] - named, 0):.1f} s | "
              f"{100 * max(big_round['busy_s'] - named, 0) / capacity:.0f}% |")
            if big_round["floor_s"] is not None:
                w("")
                w(f"The apiserver's and etcd's CPU alone, spread perfectly over {big_round['cores']} cores, take "
                  f"{big_round['floor_s']:.1f} s: with the same API requests, the round cannot end sooner on this machine "
                  "however little CPU the controller itself used.")
    else:
        w("Not measured: no control plane in this run.")
    w("")

    if gwt:
        w("## 5b. One gateway serving every ClaudeKey")
        w("")
        w(
            "A `claudekey proxy --mode gateway --config-secrets` on the proxy core, watching the operator namespace's "
            "config Secrets the controller writes in section 5: first with one ClaudeKey, then with the large round's "
            "ClaudeKeys added. oha at c=64 with the first ClaudeKey's key (a `claude-haiku-4-5` request within its "
            "scope). The change time is from the rotated key's `-client` Secret being seen written until the gateway's "
            "first 200 with it (polled every 10 ms), right after the large round was Ready."
        )
        w("")
        w("| Tenants | p50 | p99 | req/s | RSS |")
        w("| --- | --- | --- | --- | --- |")
        for label, n in (("one", 1), ("many", gwt["tenants"])):
            c = gwt["cells"][label]
            w(f"| {n:,} | {fmt(c['p50'], ' µs', 1e6)} | {fmt(c['p99'], ' µs', 1e6)} | {fmt(c['rps'])} | {kib(rss.get(('gateway-tenants', label)))} |")
        w("")

    w("## 6. Redaction and key scan throughput (one core, criterion)")
    w("")
    w("| Pass | input | median time | throughput |")
    w("| --- | --- | --- | --- |")
    for k in sorted(x for x in crit if x.split("/")[0] in ("redact", "scan")):
        v = crit[k]
        mbps = v["bytes"] / (v["ns"] / 1e9) / 1e6 if v["bytes"] else None
        w(
            f"| {k} | {v['bytes'] or '?'} B | {v['ns'] / 1000:.1f} µs | "
            f"{'n/a' if mbps is None else f'{mbps:,.0f} MB/s'} |"
        )
    w("")
    text = "\n".join(L) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--passes":
        sys.exit(0 if passes(sys.argv[2], float(sys.argv[3])) else 1)
    p = argparse.ArgumentParser()
    p.add_argument("--raw", required=True)
    p.add_argument("--out")
    p.add_argument("--command", default="hack/bench.sh")
    p.add_argument("--versions", default="")
    p.add_argument("--reps", default="?")
    p.add_argument("--soak", default="?")
    p.add_argument("--cell", default="?")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--baseline", default="", help="the baseline build's commit (its row's name)")
    report(p.parse_args())


if __name__ == "__main__":
    main()
