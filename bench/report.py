"""Bench report: the table, baseline ratios, the verdict against targets and goals, JSON and PNG.

Targets come from DESIGN.md ("1000+ TPS, sub-200 ms average"); goals are the
project's own, much higher bars. Every verdict line shows the measured value
and the phase it comes from; a phase that did not run is "n/a", never PASS.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

DESIGN_TPS = 1000.0
DESIGN_MEAN_MS = 200.0
GOAL_CLOSED_TPS = 20000.0
GOAL_P99_1K_MS = 1.0
GOAL_P99_10K_MS = 5.0
GOAL_FORWARDER_SHARE = 0.5
GOAL_JOURNAL_SHARE = 0.7  # issue 5: SQLite journal on keeps >= 70% of journal-off throughput


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "platform": platform.platform(), "loop": loop, "loadavg": os.getloadavg()}


def _find(phases, scenario, target="switch (cython)", mode=None, offered=None):
    for d in phases:
        if d["scenario"] != scenario or d["target"] != target:
            continue
        if mode is not None and d["mode"] != mode:
            continue
        if offered is not None and (d["offered_tps"] is None or abs(d["offered_tps"] - offered) > 1e-6):
            continue
        return d
    return None


def _find_all(phases, scenario, target, mode=None):
    return [d for d in phases if d["scenario"] == scenario and d["target"] == target
            and (mode is None or d["mode"] == mode)]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _check(name, value, ok, measured, source, margin=None):
    return {"check": name, "value": value, "result": "n/a" if ok is None else ("PASS" if ok else "MISS"),
            "measured": measured, "from": source, "margin": margin}


def verdict(phases: list[dict]) -> dict:
    closed = _find(phases, "closed", mode="closed")
    steady = (_find(phases, "steady", offered=1000.0) or _find(phases, "sweep", offered=1000.0)
              or _find(phases, "steady", mode="open"))
    sweep10k = _find(phases, "sweep", offered=10000.0)
    fwd_closed = _find(phases, "baselines", "forwarder", mode="closed")
    pure_closed = _find(phases, "baselines", "switch (pure python)", mode="closed")
    targets, goals = [], []

    if closed:
        v = closed["tps"]
        targets.append(_check(f"throughput >= {DESIGN_TPS:.0f} TPS", v, v >= DESIGN_TPS, f"{v:.0f} TPS",
                              "closed loop", f"x{v / DESIGN_TPS:.1f}"))
    else:
        targets.append(_check(f"throughput >= {DESIGN_TPS:.0f} TPS", None, None, "not run", "closed loop"))
    if steady and steady["latency_ms"].get("mean") is not None:
        v = steady["latency_ms"]["mean"]
        targets.append(_check(f"average latency < {DESIGN_MEAN_MS:.0f} ms", v, v < DESIGN_MEAN_MS,
                              f"{v:.3f} ms", steady["name"], f"x{DESIGN_MEAN_MS / max(v, 1e-9):.0f} under"))
    else:
        targets.append(_check(f"average latency < {DESIGN_MEAN_MS:.0f} ms", None, None, "not run", "steady"))

    if closed:
        v = closed["tps"]
        goals.append(_check(f"closed loop >= {GOAL_CLOSED_TPS:.0f} TPS", v, v >= GOAL_CLOSED_TPS, f"{v:.0f} TPS",
                            "closed loop", f"{v / GOAL_CLOSED_TPS:.0%} of goal"))
    else:
        goals.append(_check(f"closed loop >= {GOAL_CLOSED_TPS:.0f} TPS", None, None, "not run", "closed loop"))
    for label, ph, limit, rate in ((f"p99 <= {GOAL_P99_1K_MS:g} ms at 1000 TPS open loop", steady,
                                    GOAL_P99_1K_MS, 1000.0),
                                   (f"p99 <= {GOAL_P99_10K_MS:g} ms at 10000 TPS open loop", sweep10k,
                                    GOAL_P99_10K_MS, 10000.0)):
        if ph is None or ph["latency_ms"].get("p99") is None:
            goals.append(_check(label, None, None, "not run", "sweep/steady"))
            continue
        p99 = ph["latency_ms"]["p99"]
        lost = ph["sent"] - ph["answered"]
        sustained = ph["tps"] >= 0.95 * ph["offered_tps"] and lost == 0
        ok = p99 <= limit and sustained and abs(ph["offered_tps"] - rate) < 1e-6
        note = f"{p99:.3f} ms" + ("" if sustained else f" (answered {ph['tps']:.0f}/s of {ph['offered_tps']:.0f}/s"
                                  f"{f', {lost} unanswered' if lost else ''})")
        if abs(ph["offered_tps"] - rate) > 1e-6:
            note += f" (measured at {ph['offered_tps']:.0f}/s, not {rate:.0f}/s: --quick)"
        goals.append(_check(label, p99, ok, note, ph["name"], f"{limit / max(p99, 1e-9):.2f}x limit"))
    ratios = {}
    if closed and fwd_closed and fwd_closed["tps"]:
        share = closed["tps"] / fwd_closed["tps"]
        ratios["switch/forwarder TPS"] = round(share, 3)
        goals.append(_check(f"switch >= {GOAL_FORWARDER_SHARE:.0%} of forwarder throughput", share,
                            share >= GOAL_FORWARDER_SHARE,
                            f"{share:.0%} ({closed['tps']:.0f} vs {fwd_closed['tps']:.0f} TPS)", "closed loops"))
        if closed.get("front_cpu_us_per_txn") and fwd_closed.get("front_cpu_us_per_txn"):
            ratios["switch/forwarder CPU us per txn"] = round(
                closed["front_cpu_us_per_txn"] / fwd_closed["front_cpu_us_per_txn"], 2)
    else:
        goals.append(_check(f"switch >= {GOAL_FORWARDER_SHARE:.0%} of forwarder throughput", None, None,
                            "not run", "baselines"))
    if closed and pure_closed and pure_closed["tps"]:
        ratios["cython/pure-python TPS"] = round(closed["tps"] / pure_closed["tps"], 3)
        if closed.get("front_cpu_us_per_txn") and pure_closed.get("front_cpu_us_per_txn"):
            ratios["pure-python/cython CPU us per txn"] = round(
                pure_closed["front_cpu_us_per_txn"] / closed["front_cpu_us_per_txn"], 2)
    j_on = _find_all(phases, "journal", "switch (cython)", mode="closed")
    j_off = _find_all(phases, "journal", "switch (cython) journal none", mode="closed")
    if j_on and j_off and all(d["tps"] for d in j_off):
        # paired rounds (run back to back): the median of their ratios
        pairs = [a["tps"] / b["tps"] for a, b in zip(j_on, j_off)]
        share = _median(pairs)
        on, off = _median([d["tps"] for d in j_on]), _median([d["tps"] for d in j_off])
        ratios["journal on/off TPS"] = round(share, 3)
        rounds = ", ".join(f"{x:.0%}" for x in pairs)
        goals.append(_check(f"SQLite journal on >= {GOAL_JOURNAL_SHARE:.0%} of journal off", share,
                            share >= GOAL_JOURNAL_SHARE,
                            f"{share:.0%} (median of {len(pairs)} rounds: {rounds}; median TPS {on:.0f} on, "
                            f"{off:.0f} off)", "journal closed loops"))
    return {"targets": targets, "goals": goals, "ratios": ratios}


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def format_report(result: dict) -> str:
    phases = result["phases"]
    lines = []
    m = result.get("machine") or machine()
    lines.append(f"machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, {m['loop']}")
    hdr = (f"{'target':<21} {'phase':<46} {'offered':>8} {'TPS':>8} {'mean':>7} {'p50':>7} {'p90':>7} "
           f"{'p99':>7} {'p99.9':>7} {'max':>8} {'CPUus':>6} {'RSSMB':>6} {'lag99':>6}  outcomes")
    lines.append("latency in ms (open loop: from the intended send time; closed loop: from the write); "
                 "CPUus = front process CPU per answered txn; lag99 = generator send lag p99")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for d in phases:
        lat = d["latency_ms"]
        codes = " ".join(f"{k}={v}" for k, v in d["by_response_code"].items()) or "-"
        bad = [f"{k}={d[k]}" for k in ("timeouts", "errors", "not_sent", "undecodable") if d.get(k)]
        if d.get("approved_by") and d["scenario"] == "failover":
            bad.append("approved by " + " ".join(f"{k}*={v}" for k, v in d["approved_by"].items()))
        lines.append(
            f"{d['target']:<21} {d['name'][:46]:<46} {_f(d['offered_tps'], '{:.0f}'):>8} {d['tps']:>8.0f} "
            f"{_f(lat.get('mean')):>7} {_f(lat.get('p50')):>7} {_f(lat.get('p90')):>7} {_f(lat.get('p99')):>7} "
            f"{_f(lat.get('p99.9')):>7} {_f(lat.get('max')):>8} {_f(d.get('front_cpu_us_per_txn'), '{:.0f}'):>6} "
            f"{_f(d.get('front_peak_rss_mb'), '{:.0f}'):>6} {_f(d['send_lag_ms'].get('p99')):>6}  "
            f"{codes}{'  ' + ' '.join(bad) if bad else ''}")
        for w, h in d.get("windows_latency_ms", {}).items():
            if h.get("count"):
                lines.append(f"{'':<21}   {w:<44} {'':>8} {'':>8} {_f(h['mean']):>7} {_f(h['p50']):>7} "
                             f"{_f(h['p90']):>7} {_f(h['p99']):>7} {_f(h['p99.9']):>7} {_f(h['max']):>8}  "
                             f"n={h['count']}")
    cpu_lines = []
    for d in phases:
        if d["mode"] == "closed":
            parts = ", ".join(f"{k} {v:.0f}" for k, v in d["cpu_us_per_txn"].items())
            cpu_lines.append(f"  {d['target']} {d['name']}: {parts} us/txn")
    if cpu_lines:
        lines.append("CPU per answered transaction, every process (closed loops):")
        lines.extend(cpu_lines)
    v = result["verdict"]
    if v["ratios"]:
        lines.append("ratios: " + ", ".join(f"{k} {val:.2f}" for k, val in v["ratios"].items()))
    for title, checks in (("design targets (DESIGN.md)", v["targets"]), ("goals", v["goals"])):
        lines.append(f"{title}:")
        for c in checks:
            margin = f"  [{c['margin']}]" if c.get("margin") and c["result"] != "n/a" else ""
            lines.append(f"  {c['result']:<4} {c['check']:<48} {c['measured']}  ({c['from']}){margin}")
    lines.append(f"wall time {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def write_png(result: dict, path: Path) -> bool:
    """Latency percentiles against offered load (the open-loop sweep); False when there is no sweep."""
    pts = sorted((d for d in result["phases"] if d["scenario"] in ("sweep", "steady") and d["mode"] == "open"
                  and d["target"] == "switch (cython)" and d["latency_ms"].get("count")),
                 key=lambda d: d["offered_tps"])
    seen, uniq = set(), []
    for d in pts:  # steady and the sweep may both hold a 1000/s point: keep the longer run
        if d["offered_tps"] in seen:
            continue
        seen.add(d["offered_tps"])
        uniq.append(max((x for x in pts if x["offered_tps"] == d["offered_tps"]), key=lambda x: x["sent"]))
    if not uniq:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    x = [d["offered_tps"] for d in uniq]
    for q, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-"), ("p99.9", "v-"), ("max", "x--")):
        ax.plot(x, [d["latency_ms"][q] for d in uniq], style, label=q)
    for b in ("switch (pure python)", "forwarder"):
        d = _find(result["phases"], "baselines", b, mode="open")
        if d and d["latency_ms"].get("p99") is not None:
            ax.plot([d["offered_tps"]], [d["latency_ms"]["p99"]], "D", label=f"{b} p99")
    ax.axhline(GOAL_P99_1K_MS, color="grey", lw=0.8, ls=":")
    ax.axhline(GOAL_P99_10K_MS, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency from intended send time (ms)")
    m = result.get("machine") or {}
    ax.set_title(f"isoswitch end to end (mTLS, cython core) - {m.get('nproc', '?')} CPUs")
    for d in uniq:
        ax.annotate(f"{d['tps']:.0f}/s", (d["offered_tps"], d["latency_ms"]["p50"]), fontsize=7,
                    textcoords="offset points", xytext=(0, -12), ha="center")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
