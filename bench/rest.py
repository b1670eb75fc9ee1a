"""REST shim bench: payments/s through POST /v1/payments, and latency at a fixed rate.

    python -m bench.rest [--seconds 5] [--connections 32] [--rate 500] [--quick]

The switch runs in its own process (`isoswitch run` with the API enabled and
the SQLite journal on), its simulated acquirer in another; this process is the
HTTPS client (aiohttp, keep-alive). Closed loop gives the maximum payments/s;
open loop at --rate measures latency from each request's intended send time,
so a stall is never hidden. Goals (issue 6): >= 5,000 payments/s, p99 <= 10 ms
at 500/s. Figures are printed; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from hdrh.histogram import HdrHistogram

from bench.e2e import Proc, _env, start_acquirer
from switch import certs
from switch.messages import TEST_PAN

GOAL_PPS = 5000.0
GOAL_P99_MS = 10.0


def _config(work: Path, acq_port: int) -> Path:
    cfg = work / "rest.toml"
    cfg.write_text(f"""
[switch]
state_dir = "{work / 'state'}"
log_level = "warning"
log_format = "text"
shutdown_grace = 1.0
[journal]
group_commit_ms = 0
[simulators]
embedded = false
[[listeners]]
name = "terminals"
port = 0
[[acquirers]]
name = "acq-a"
host = "127.0.0.1"
port = {acq_port}
connections = 2
timeout = 2.0
max_in_flight = 8192
echo_interval = 0
[api]
enabled = true
host = "127.0.0.1"
port = 0
""")
    return cfg


def _payment(amount: int) -> bytes:
    return json.dumps({"pan": TEST_PAN, "expiry": "2912", "amount": amount, "currency": "840",
                       "type": "purchase"}).encode()


async def _post(session, url, headers, amount, hist, codes, t_intended=None):
    t0 = time.perf_counter() if t_intended is None else t_intended
    h = dict(headers)
    h["Idempotency-Key"] = uuid.uuid4().hex
    async with session.post(url, data=_payment(amount), headers=h) as r:
        await r.read()
        codes[r.status] = codes.get(r.status, 0) + 1
    hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))


async def closed_loop(url, headers, ctx, seconds, connections):
    import aiohttp

    hist = HdrHistogram(1, 60_000_000, 3)
    codes: dict = {}
    conn = aiohttp.TCPConnector(ssl=ctx, limit=connections)
    async with aiohttp.ClientSession(connector=conn) as s:
        deadline = time.perf_counter() + seconds
        done = 0

        async def worker():
            nonlocal done
            while time.perf_counter() < deadline:
                await _post(s, url, headers, 1000, hist, codes)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    return {"mode": "closed", "payments_per_s": done / elapsed, "count": done, "codes": codes,
            "p50_ms": hist.get_value_at_percentile(50) / 1000, "p99_ms": hist.get_value_at_percentile(99) / 1000}


async def open_loop(url, headers, ctx, seconds, rate, connections):
    import aiohttp

    hist = HdrHistogram(1, 60_000_000, 3)
    codes: dict = {}
    conn = aiohttp.TCPConnector(ssl=ctx, limit=connections)
    async with aiohttp.ClientSession(connector=conn) as s:
        n = int(seconds * rate)
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            t = start + i / rate
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(s, url, headers, 1000, hist, codes, t_intended=t)))
        await asyncio.gather(*tasks)
    return {"mode": f"open {rate:g}/s", "count": n, "codes": codes,
            "p50_ms": hist.get_value_at_percentile(50) / 1000, "p90_ms": hist.get_value_at_percentile(90) / 1000,
            "p99_ms": hist.get_value_at_percentile(99) / 1000, "max_ms": hist.get_max_value() / 1000}


async def run(seconds: float, connections: int, rate: float, profile: Path | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="isoswitch-rest-"))
    pki = certs.ensure_dev_pki(work / "state")
    key = subprocess.run([sys.executable, "-m", "switch.api.auth", "create", "--file",
                          str(work / "state" / "api_keys.json"), "--name", "bench", "--scopes", "payments",
                          "--rate", "1000000", "--burst", "1000000"], capture_output=True, text=True,
                         check=True, env=_env()).stdout.strip().split()[-1]
    sim = start_acquirer("acq-a", work)
    sw = None
    try:
        prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        sw = Proc("switch-rest", [sys.executable, *prof, "-m", "switch.cli", "run", "--config",
                                  str(_config(work, sim.port))],
                  ready=r"REST API and dashboard on https://[\d.]+:(\d+)", log_dir=work, env=_env()).start()
        url = f"https://127.0.0.1:{sw.port}/v1/payments"
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.check_hostname = False  # the dev certificate names localhost; we dial 127.0.0.1
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        await closed_loop(url, headers, ctx, min(1.0, seconds / 4), connections)  # warm-up
        c0 = sw.cpu_us()
        closed = await closed_loop(url, headers, ctx, seconds, connections)
        c1 = sw.cpu_us()
        if c0 is not None and c1 is not None and closed["count"]:
            closed["switch_cpu_us_per_payment"] = (c1 - c0) / closed["count"]
        opened = await open_loop(url, headers, ctx, seconds, rate, connections)
        return {"closed": closed, "open": opened}
    finally:
        if sw is not None:
            sw.stop()
        sim.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--quick", action="store_true", help="one second each (smoke test)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--profile", metavar="FILE", type=Path,
                    help="run the switch under cProfile and write its stats here")
    args = ap.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    out = asyncio.run(run(seconds, args.connections, args.rate, args.profile))
    c, o = out["closed"], out["open"]
    print("REST shim: POST /v1/payments over HTTPS, SQLite journal on, switch in its own process")
    cpu = c.get("switch_cpu_us_per_payment")
    print(f"closed loop ({args.connections} connections): {c['payments_per_s']:.0f} payments/s, "
          f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, HTTP {c['codes']}"
          + (f", switch CPU {cpu:.0f} us/payment" if cpu else ""))
    print(f"open loop {args.rate:g}/s: p50 {o['p50_ms']:.2f} ms, p90 {o['p90_ms']:.2f} ms, "
          f"p99 {o['p99_ms']:.2f} ms, max {o['max_ms']:.2f} ms, HTTP {o['codes']}")
    ok_pps = c["payments_per_s"] >= GOAL_PPS
    ok_p99 = o["p99_ms"] <= GOAL_P99_MS
    print(f"goals: {'PASS' if ok_pps else 'MISS'} >= {GOAL_PPS:.0f} payments/s ({c['payments_per_s']:.0f}); "
          f"{'PASS' if ok_p99 else 'MISS'} p99 <= {GOAL_P99_MS:g} ms at {args.rate:g}/s ({o['p99_ms']:.2f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
