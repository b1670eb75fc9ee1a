"""REST shim bench: payments/s through POST /v1/payments, and latency at a fixed rate.

    python -m bench.rest [--seconds 5] [--rounds 3] [--connections 128] [--rate 500] [--quick]

The switch runs in its own process (`isoswitch run` with the API enabled and
the SQLite journal on), its simulated acquirer in another; this process is the
HTTPS client (a lean keep-alive client, see _LeanClient). A closed loop over
--connections keep-alive connections (128 clients by default: enough that
the switch, not the clients' round trips, is the limit) gives the maximum
payments/s; it runs --rounds times and the median is the figure, because the
machines here are shared and single runs vary. An open loop at --rate over
32 connections measures latency from each request's intended send time, so a
stall is never hidden; it runs --rounds times too, and the p99 is over all
of their requests pooled. Goals (issue 6): >= 5,000 payments/s, p99 <= 10 ms at
500/s. Figures are printed; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import resource
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from hdrh.histogram import HdrHistogram

from bench.e2e import Proc, _children, _cpu_us, _env, start_acquirer
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


@contextlib.contextmanager
def _client_gc_paused():
    """No collection in this (the client's) process while a round measures.

    A full collection here took 7-10 ms once the rounds had left their
    objects behind; every request in flight then looked that much slower,
    though the switch had answered it on time (seen as clusters of 10-20 ms
    latencies at the very moments the client collected). A round allocates
    a bounded amount (seconds x rate requests), so it runs with the collector
    off; cycles are collected between rounds."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _payment(amount: int) -> bytes:
    return json.dumps({"pan": TEST_PAN, "expiry": "2912", "amount": amount, "currency": "840",
                       "type": "purchase"}).encode()


class _LeanClient:
    """A minimal HTTP/1.1 keep-alive client over TLS for the closed loop.

    aiohttp's client costs more CPU per request than the switch's own HTTP
    handling; on a 2-core machine it would cap what is measured. This one
    writes a pre-built request (only the Idempotency-Key changes) and reads
    the status line, Content-Length and body: about a tenth of the cost.
    """

    def __init__(self, host: str, port: int, headers: dict, ctx):
        self.host, self.port, self.ctx = host, port, ctx
        self.head = ("POST /v1/payments HTTP/1.1\r\nHost: %s:%d\r\n" % (host, port)
                     + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode()
        self.prefix = uuid.uuid4().hex[:16]
        self.n = 0

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.ctx)
        return self

    async def post(self, amount: int) -> int:
        self.n += 1
        body = _payment(amount)
        self.writer.write(self.head + b"Idempotency-Key: %s-%d\r\nContent-Length: %d\r\n\r\n"
                          % (self.prefix.encode(), self.n, len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        i = head.lower().find(b"content-length:")
        if i < 0:
            raise RuntimeError("response without Content-Length")
        n = int(head[i + 15:head.index(b"\r\n", i)])
        await self.reader.readexactly(n)
        return status

    def close(self):
        self.writer.close()


async def closed_loop(url, headers, ctx, seconds, connections):
    from urllib.parse import urlsplit
    u = urlsplit(url)
    hist = HdrHistogram(1, 60_000_000, 3)
    codes: dict = {}
    clients = [await _LeanClient(u.hostname, u.port, headers, ctx).connect() for _ in range(connections)]
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker(c):
        nonlocal done
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            st = await c.post(1000)
            codes[st] = codes.get(st, 0) + 1
            hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
            done += 1

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in clients:
        c.close()
    out = {"mode": "closed", "payments_per_s": done / elapsed, "count": done, "codes": codes,
           "p50_ms": hist.get_value_at_percentile(50) / 1000, "p99_ms": hist.get_value_at_percentile(99) / 1000}
    if done:
        out["client_cpu_us_per_payment"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e6 / done
    return out


def _open_summary(rate, count, codes, hist, lag) -> dict:
    return {"mode": f"open {rate:g}/s", "count": count, "codes": codes,
            "p50_ms": hist.get_value_at_percentile(50) / 1000, "p90_ms": hist.get_value_at_percentile(90) / 1000,
            "p99_ms": hist.get_value_at_percentile(99) / 1000, "max_ms": hist.get_max_value() / 1000,
            "send_lag_p99_ms": lag.get_value_at_percentile(99) / 1000}


async def open_loop(url, headers, ctx, seconds, rate, connections):
    """Requests at fixed intended times over a pool of lean keep-alive connections;
    latency from each request's intended send time (waiting for a free
    connection and the generator's own lag included, never hidden).
    Returns the summary and the two histograms (latency, generator lag)."""
    from urllib.parse import urlsplit
    u = urlsplit(url)
    hist = HdrHistogram(1, 60_000_000, 3)
    lag = HdrHistogram(1, 60_000_000, 3)
    codes: dict = {}
    idle: asyncio.Queue = asyncio.Queue()
    clients = [await _LeanClient(u.hostname, u.port, headers, ctx).connect() for _ in range(connections)]
    for c in clients:
        idle.put_nowait(c)

    async def one(t_intended):
        c = await idle.get()
        try:
            st = await c.post(1000)
        finally:
            idle.put_nowait(c)
        codes[st] = codes.get(st, 0) + 1
        hist.record_value(max(1, int((time.perf_counter() - t_intended) * 1e6)))

    n = int(seconds * rate)
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        t = start + i / rate
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.record_value(max(1, int((time.perf_counter() - t) * 1e6)))
        tasks.append(asyncio.create_task(one(t)))
    await asyncio.gather(*tasks)
    for c in clients:
        c.close()
    return _open_summary(rate, n, codes, hist, lag), hist, lag


async def run(seconds: float, connections: int, rate: float, profile: Path | None = None,
              rounds: int = 1, open_connections: int = 32) -> dict:
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
        writers = _children(sw.pid)  # the SQLite journal's writer process
        results = []
        for _ in range(max(1, rounds)):
            c0, w0 = sw.cpu_us(), [_cpu_us(w) for w in writers]
            with _client_gc_paused():
                closed = await closed_loop(url, headers, ctx, seconds, connections)
            c1, w1 = sw.cpu_us(), [_cpu_us(w) for w in writers]
            if c0 is not None and c1 is not None and closed["count"]:
                closed["switch_cpu_us_per_payment"] = (c1 - c0) / closed["count"]
                if writers and None not in w0 + w1:
                    closed["journal_writer_cpu_us_per_payment"] = (sum(w1) - sum(w0)) / closed["count"]
            results.append(closed)
        median = sorted(results, key=lambda r: r["payments_per_s"])[len(results) // 2]
        # The latency goal is judged on every request of every open-loop round
        # pooled (rounds x seconds x rate of them): one 100 ms stall of the
        # shared machine (several processes starved at once) is 2% of a 5 s
        # round's 2,500 requests; the pooled p99 still shows one that recurs.
        pooled_hist = HdrHistogram(1, 60_000_000, 3)
        pooled_lag = HdrHistogram(1, 60_000_000, 3)
        opened, codes = [], {}
        for _ in range(max(1, rounds)):
            with _client_gc_paused():
                o, h, lag = await open_loop(url, headers, ctx, seconds, rate, open_connections)
            pooled_hist.add(h)
            pooled_lag.add(lag)
            for k, v in o["codes"].items():
                codes[k] = codes.get(k, 0) + v
            opened.append(o)
        pooled = _open_summary(rate, sum(o["count"] for o in opened), codes, pooled_hist, pooled_lag)
        return {"closed": median, "rounds": results, "open": pooled, "open_rounds": opened}
    finally:
        if sw is not None:
            sw.stop()
        sim.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=128, help="closed-loop clients")
    ap.add_argument("--rounds", type=int, default=3, help="closed-loop rounds; the median is reported")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--quick", action="store_true", help="one second each (smoke test)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--profile", metavar="FILE", type=Path,
                    help="run the switch under cProfile and write its stats here")
    args = ap.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    rounds = 1 if args.quick else args.rounds
    out = runner(run(seconds, args.connections, args.rate, args.profile, rounds))
    c, o = out["closed"], out["open"]
    print("REST shim: POST /v1/payments over HTTPS, SQLite journal on, switch in its own process")
    cpu = c.get("switch_cpu_us_per_payment")
    if len(out["rounds"]) > 1:
        each = ", ".join(f"{r['payments_per_s']:.0f}" for r in out["rounds"])
        print(f"closed-loop rounds: {each} payments/s; the median round:")
    print(f"closed loop ({args.connections} connections): {c['payments_per_s']:.0f} payments/s, "
          f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, HTTP {c['codes']}")
    if cpu:
        print(f"  CPU per payment: switch {cpu:.0f} us, journal writer "
              f"{c.get('journal_writer_cpu_us_per_payment', 0):.0f} us, client "
              f"{c.get('client_cpu_us_per_payment', 0):.0f} us")
    if len(out["open_rounds"]) > 1:
        each = ", ".join(f"{r['p99_ms']:.2f}" for r in out["open_rounds"])
        print(f"open-loop rounds: p99 {each} ms; all {o['count']} requests pooled:")
    print(f"open loop {args.rate:g}/s (32 connections): p50 {o['p50_ms']:.2f} ms, p90 {o['p90_ms']:.2f} ms, "
          f"p99 {o['p99_ms']:.2f} ms, max {o['max_ms']:.2f} ms, HTTP {o['codes']} "
          f"(generator send lag p99 {o['send_lag_p99_ms']:.2f} ms, included)")
    ok_pps = c["payments_per_s"] >= GOAL_PPS
    ok_p99 = o["p99_ms"] <= GOAL_P99_MS
    print(f"goals: {'PASS' if ok_pps else 'MISS'} >= {GOAL_PPS:.0f} payments/s ({c['payments_per_s']:.0f}); "
          f"{'PASS' if ok_p99 else 'MISS'} p99 <= {GOAL_P99_MS:g} ms at {args.rate:g}/s ({o['p99_ms']:.2f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
