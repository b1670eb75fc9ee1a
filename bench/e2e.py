"""End-to-end bench: the real switch, simulated acquirers and the load generator in separate processes.

Every layout ("stack") is started fresh from the command line, the way an
operator runs it:

* acquirer simulators: ``python -m switch.cli sim acquirer --port 0 ...``
  (the same argparse as ``python -m switch.sim.acquirer``; through the CLI
  so it runs on uvloop like the switch does);
* the switch: ``python -m switch.cli run --config <tmp toml>``, optionally
  with ``ISOSWITCH_NO_EXTENSIONS=1`` (pure-Python core) or under
  ``python -m cProfile -o FILE``;
* the bare forwarder baseline: ``python -m bench.forwarder``;
* the load generator: this process (uvloop), N mTLS terminal connections
  using the development PKI of a temporary state directory.

CPU per transaction is read from ``/proc/<pid>/stat`` (utime + stime) of each
process before and after a phase; peak RSS is ``VmHWM`` of
``/proc/<pid>/status``. Scenarios and their phases are listed in
:data:`SCENARIOS`; :func:`run_bench` runs a selection and returns the report
dict that :mod:`bench.report` prints, writes as JSON and plots.
"""
from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import PhaseResult, RequestSource, StanSpace, closed_loop, connect_all, open_loop

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

SCENARIOS = ("steady", "sweep", "closed", "slow", "failover", "burst", "mixed", "journal", "baselines")


@dataclass
class BenchParams:
    duration: float = 5.0  # seconds per measured phase
    sweep_rates: tuple = (500, 1000, 2000, 5000, 10000)
    sweep_duration: float = 3.0
    steady_rate: float = 1000.0
    burst_base: float = 1000.0
    connections: int = 8
    in_flight: int = 48  # closed loop, per connection (48: enough to batch; 16 under-drove the forwarder)
    warmup: float = 1.0
    # journal on/off: many short closed loops, alternating, each on/off pair
    # close in time so a noisy neighbour's bursts (seconds long on the shared
    # VMs) hit both of a pair alike; the verdict is the median pair's ratio
    journal_rounds: int = 12
    journal_duration: float = 2.0
    settle: float = 0.25  # closed loops: answers in the first 0.25 s are not counted (the ramp)
    drain: float = 4.0
    slow_mean_ms: float = 20.0
    slow_p99_ms: float = 150.0
    failover_latency_ms: float = 5.0
    profile: Path | None = None  # run the closed-loop switch under cProfile, write stats here

    @classmethod
    def quick(cls) -> "BenchParams":
        return cls(duration=0.6, sweep_rates=(300, 1000), sweep_duration=0.4, steady_rate=300.0,
                   burst_base=200.0, connections=2, in_flight=4, warmup=0.2, drain=3.0,
                   journal_rounds=1, journal_duration=0.6, settle=0.1)


# --------------------------------------------------------------------------
# processes


def _cpu_us(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) * 1e6 / CLK_TCK  # utime, stime


def _children(pid: int) -> list[int]:
    """Direct child processes (the switch's journal writer)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Proc:
    """A child process that prints one line saying it is ready (and on which port)."""

    def __init__(self, name: str, argv: list[str], *, ready: str, log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.ready = re.compile(ready)
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.port: int | None = None
        self.killed = False

    def start(self, timeout: float = 30.0) -> "Proc":
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, bufsize=1)
        found = threading.Event()

        def pump():  # read stdout forever so the pipe never fills
            for line in self.popen.stdout:
                self._log.write(line)
                self._log.flush()
                m = self.ready.search(line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or self.port is None:
            self.stop()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"{self.name} did not start: {' '.join(self.argv)}\n{tail}")
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_us(self) -> float | None:
        return _cpu_us(self.pid)

    def vm_hwm_kb(self) -> int | None:
        return _vm_hwm_kb(self.pid)

    def kill9(self) -> None:
        self.killed = True
        os.kill(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._log.close()


def _env(pure_python: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("ISOSWITCH_NO_EXTENSIONS", None)
    env.pop("ISOSWITCH_REQUIRE_EXTENSIONS", None)
    if pure_python:
        env["ISOSWITCH_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_acquirer(name: str, work: Path, *, latency: tuple = ("fixed", 0.0, None)) -> Proc:
    """A simulator whose approval codes (DE38) start with its name's first letter, upper case,
    so the load generator can tell which acquirer answered."""
    kind, mean, p99 = latency
    argv = [sys.executable, "-m", "switch.cli", "sim", "acquirer", "--name", name, "--port", "0",
            "--latency-kind", kind, "--latency-ms", str(mean), "--seed", "1",
            "--approve-code-prefix", name[0].upper()]
    if p99 is not None:
        argv += ["--latency-p99-ms", str(p99)]
    return Proc(f"acquirer-{name}", argv, ready=r"listening on [\d.]+:(\d+)", log_dir=work,
                env=_env()).start()


def _toml_str(p) -> str:
    return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'


def switch_config(path: Path, state_dir: Path, pki, acquirers: list[tuple[str, int]],
                  journal: str = "sqlite") -> Path:
    """A switch config for the bench: one mTLS listener (port 0), the given acquirers in failover order."""
    lines = [
        "[switch]", f"state_dir = {_toml_str(state_dir)}", 'log_level = "warning"', 'log_format = "text"',
        "shutdown_grace = 1.0",
        "[journal]", f'backend = "{journal}"', "group_commit_ms = 0",
        "[simulators]", "embedded = false",
        "[[listeners]]", 'name = "terminals"', 'host = "127.0.0.1"', "port = 0",
        f"cert = {_toml_str(pki.server_cert)}", f"key = {_toml_str(pki.server_key)}",
        f"client_ca = {_toml_str(pki.ca_cert)}",
        # overload must show as latency, not as the per-connection pause limit
        "max_in_flight = 1024", "terminal_timeout = 3.0",
    ]
    for name, port in acquirers:
        lines += ["[[acquirers]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}",
                  "connections = 2", "timeout = 1.5", "max_in_flight = 8192", "echo_interval = 0",
                  "reconnect_min = 0.05", "reconnect_max = 0.5"]
    lines += ["[routing]", "default_acquirers = [" + ", ".join(f'"{n}"' for n, _ in acquirers) + "]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_switch(work: Path, tag: str, pki, acquirers: list[tuple[str, int]], *, pure_python: bool = False,
                 profile: Path | None = None, journal: str = "sqlite") -> Proc:
    state = work / f"state-{tag}"
    state.mkdir(exist_ok=True)
    cfg = switch_config(work / f"switch-{tag}.toml", state, pki, acquirers, journal)
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "switch.cli", "run", "--config", str(cfg), "--log-level", "warning"]
    return Proc(f"switch-{tag}", argv, ready=r"listener terminals on [\d.]+:(\d+)", log_dir=work,
                env=_env(pure_python)).start()


def start_forwarder(work: Path, upstream_port: int) -> Proc:
    argv = [sys.executable, "-m", "bench.forwarder", "--upstream", f"127.0.0.1:{upstream_port}",
            "--state-dir", str(work / "pki-state")]
    return Proc("forwarder", argv, ready=r"forwarder listening on [\d.]+:(\d+)", log_dir=work,
                env=_env()).start()


# --------------------------------------------------------------------------
# stacks and phases


@dataclass
class Stack:
    """One layout under test: the front process (switch or forwarder) and its acquirers."""

    label: str  # "switch (cython)", "switch (pure python)", "forwarder"
    front: Proc
    acquirers: dict[str, Proc]
    conns: list = field(default_factory=list)
    stans: StanSpace = field(default_factory=StanSpace)

    def stop(self) -> None:
        for c in self.conns:
            c.close()
        self.front.stop()
        for p in self.acquirers.values():
            p.stop()  # a kill -9'd one is only reaped


class Bench:
    def __init__(self, params: BenchParams, work: Path, log=print):
        from switch.certs import ensure_dev_pki
        from switch.sim.terminal import dev_client_context

        self.p = params
        self.work = work
        self.log = log
        self.pki = ensure_dev_pki(work / "pki-state")
        self.client_ssl = dev_client_context(work / "pki-state", "TERM0001")
        self.phases: list[dict] = []
        self.process_info: dict = {}

    # -- stacks
    async def _up(self, label: str, front: Proc, acquirers: dict[str, Proc]) -> Stack:
        stack = Stack(label, front, acquirers)
        stack.conns = await connect_all("127.0.0.1", front.port, self.client_ssl, self.p.connections)
        if self.p.warmup > 0:
            await closed_loop(stack.conns, RequestSource(stack.stans), in_flight=self.p.in_flight,
                              duration_s=self.p.warmup, name="warmup", drain_s=self.p.drain)
        return stack

    async def switch_stack(self, tag: str, *, latency=("fixed", 0.0, None), acquirers=("acq-a",),
                           pure_python=False, profile=None, journal="sqlite") -> Stack:
        sims = {n: start_acquirer(n, self.work, latency=latency) for n in acquirers}
        try:
            sw = start_switch(self.work, tag, self.pki, [(n, s.port) for n, s in sims.items()],
                              pure_python=pure_python, profile=profile, journal=journal)
        except Exception:
            for s in sims.values():
                s.stop()
            raise
        label = "switch (pure python)" if pure_python else "switch (cython)"
        if journal != "sqlite":
            label += f" journal {journal}"
        return await self._up(label, sw, sims)

    async def forwarder_stack(self) -> Stack:
        sim = start_acquirer("fwd-acq", self.work)
        try:
            fwd = start_forwarder(self.work, sim.port)
        except Exception:
            sim.stop()
            raise
        return await self._up("forwarder", fwd, {"fwd-acq": sim})

    # -- phases
    async def measure(self, stack: Stack, scenario: str, run) -> PhaseResult:
        procs = {"front": stack.front.pid, **{f"acquirer {n}": p.pid for n, p in stack.acquirers.items()}}
        # the SQLite journal's writer is a child process of the switch: its CPU counts too
        for i, child in enumerate(_children(stack.front.pid)):
            procs["journal writer" + (f" {i + 1}" if i else "")] = child
        before = {k: _cpu_us(pid) for k, pid in procs.items()}
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        phase: PhaseResult = await run()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        after = {k: _cpu_us(pid) for k, pid in procs.items()}
        n = max(phase.answered, 1)
        cpu = {}
        for k in procs:
            if before[k] is not None and after[k] is not None:
                cpu[k] = (after[k] - before[k]) / n
        cpu["loadgen"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e6 / n
        d = phase_dict(phase, scenario, stack.label)
        d["cpu_us_per_txn"] = {k: round(v, 1) for k, v in cpu.items()}
        d["front_cpu_us_per_txn"] = d["cpu_us_per_txn"].get("front")
        d["front_peak_rss_mb"] = round((stack.front.vm_hwm_kb() or 0) / 1024, 1)
        self.phases.append(d)
        self.log(one_line(d))
        return phase

    async def open(self, stack, scenario, name, rate, duration, **kw):
        src = kw.pop("source", None) or RequestSource(stack.stans)
        return await self.measure(stack, scenario, lambda: open_loop(
            stack.conns, src, [(duration, rate)], name=name, drain_s=self.p.drain, **kw))

    async def closed(self, stack, scenario, name, duration):
        return await self.measure(stack, scenario, lambda: closed_loop(
            stack.conns, RequestSource(stack.stans), in_flight=self.p.in_flight, duration_s=duration,
            name=name, drain_s=self.p.drain, settle_s=self.p.settle))

    # -- scenarios
    async def run(self, scenarios: list[str]) -> None:
        p = self.p
        main_set = [s for s in ("steady", "sweep", "closed", "burst", "mixed") if s in scenarios]
        if main_set:
            stack = await self.switch_stack("cython")
            try:
                self.process_info["switch (cython)"] = {"pid": stack.front.pid}
                if "steady" in main_set:
                    await self.open(stack, "steady", f"steady open {p.steady_rate:g}/s", p.steady_rate, p.duration)
                if "sweep" in main_set:
                    for r in p.sweep_rates:
                        await self.open(stack, "sweep", f"sweep open {r:g}/s", r, p.sweep_duration)
                if "closed" in main_set:
                    await self.closed(stack, "closed", "closed loop", p.duration)
                if "burst" in main_set:
                    await self._burst(stack)
                if "mixed" in main_set:
                    src = RequestSource(stack.stans, mix=("0100", "0200", "0200", "0100", "0200", "0200",
                                                          "0100", "0200", "0200", "0400"))
                    await self.open(stack, "mixed", "mixed 0100/0200/0400 open "
                                    f"{p.steady_rate:g}/s", p.steady_rate, p.duration, source=src)
            finally:
                stack.stop()
        if "slow" in scenarios:
            stack = await self.switch_stack("slow", latency=("lognormal", p.slow_mean_ms, p.slow_p99_ms))
            try:
                await self.open(stack, "slow", f"slow acquirer (lognormal mean {p.slow_mean_ms:g} ms, "
                                f"p99 {p.slow_p99_ms:g} ms) open {p.steady_rate:g}/s", p.steady_rate, p.duration)
            finally:
                stack.stop()
        if "failover" in scenarios:
            await self._failover()
        if "journal" in scenarios:
            # Both switches up at once, short closed loops alternating on/off
            # (ABBA order, so neither side always goes first) for many rounds:
            # a noisy neighbour then hits both of a round alike, and the
            # verdict takes the median round's ratio.
            stacks = []
            try:
                for tag, backend in (("journal-on", "sqlite"), ("journal-off", "none")):
                    stacks.append((backend, await self.switch_stack(tag, journal=backend)))
                for r in range(p.journal_rounds):
                    for backend, stack in (stacks if r % 2 == 0 else stacks[::-1]):
                        await self.closed(stack, "journal", f"closed loop, journal {backend}, round {r + 1}",
                                          p.journal_duration)
            finally:
                for _backend, stack in stacks:
                    stack.stop()
        if "baselines" in scenarios:
            for label, make in (("pure", lambda: self.switch_stack("pure", pure_python=True)),
                                ("forwarder", self.forwarder_stack)):
                stack = await make()
                try:
                    self.process_info[stack.label] = {"pid": stack.front.pid}
                    await self.open(stack, "baselines", f"open {p.steady_rate:g}/s", p.steady_rate, p.duration)
                    await self.closed(stack, "baselines", "closed loop", p.duration)
                finally:
                    stack.stop()

    async def _burst(self, stack: Stack) -> None:
        p = self.p
        d, base = p.duration, p.burst_base
        segs = [(0.4 * d, base), (0.2 * d, 10 * base), (0.4 * d, base)]
        windows = [("before", 0.0, 0.4 * d), ("burst", 0.4 * d, 0.6 * d), ("after", 0.6 * d, d)]
        src = RequestSource(stack.stans)
        await self.measure(stack, "burst", lambda: open_loop(
            stack.conns, src, segs, name=f"burst {base:g}/s -> {10 * base:g}/s for {0.2 * d:g} s",
            drain_s=p.drain, windows=windows))

    async def _failover(self) -> None:
        p = self.p
        # 5 ms at the acquirers keeps a few requests in flight at the kill:
        # those have an unknown outcome (91 + reversal), the rest fail over.
        stack = await self.switch_stack("failover", acquirers=("primary", "secondary"),
                                        latency=("fixed", p.failover_latency_ms, None))
        try:
            d = p.duration
            prim = stack.acquirers["primary"]
            kill_at = d / 2
            windows = [("before kill", 0.0, kill_at), ("after kill", kill_at, d)]
            src = RequestSource(stack.stans)
            await self.measure(stack, "failover", lambda: open_loop(
                stack.conns, src, [(d, p.steady_rate)],
                name=f"failover: primary kill -9 at {kill_at:g} s, open {p.steady_rate:g}/s",
                drain_s=p.drain, windows=windows, at=[(kill_at, prim.kill9)]))
            self.phases[-1]["primary_killed"] = prim.killed
            # the killed process's counters are gone: its figure would be meaningless
            self.phases[-1]["cpu_us_per_txn"].pop("acquirer primary", None)
        finally:
            stack.stop()

    async def profile_closed(self) -> None:
        """One closed-loop run with the switch under cProfile (stats to params.profile)."""
        stack = await self.switch_stack("profile", profile=self.p.profile)
        try:
            await self.closed(stack, "profile", "closed loop (switch under cProfile)", self.p.duration)
        finally:
            stack.stop()


# --------------------------------------------------------------------------
# results


def _pct(h, q) -> float | None:
    return round(h.get_value_at_percentile(q) / 1000.0, 3) if h.get_total_count() else None


def hist_dict(h) -> dict:
    if not h.get_total_count():
        return {"count": 0}
    return {"count": h.get_total_count(), "mean": round(h.get_mean_value() / 1000.0, 3),
            "p50": _pct(h, 50), "p90": _pct(h, 90), "p99": _pct(h, 99), "p99.9": _pct(h, 99.9),
            "max": round(h.get_max_value() / 1000.0, 3)}


def phase_dict(ph: PhaseResult, scenario: str, target: str) -> dict:
    return {
        "scenario": scenario, "target": target, "name": ph.name, "mode": ph.mode,
        "offered_tps": ph.offered_tps, "duration_s": ph.duration_s, "tps": round(ph.tps, 1),
        "sent": ph.sent, "answered": ph.answered, "timeouts": ph.timeouts, "errors": ph.errors,
        "not_sent": ph.not_sent, "undecodable": ph.undecodable,
        "by_response_code": dict(sorted(ph.by_response_code.items())),
        "by_mti": dict(sorted(ph.by_mti.items())),
        "approved_by": dict(sorted(ph.approved_by.items())),  # first letter of DE38: the acquirer
        "latency_ms": hist_dict(ph.latency),  # open loop: from the intended send time
        "service_latency_ms": hist_dict(ph.service),  # from the actual write
        "send_lag_ms": hist_dict(ph.send_lag),
        "windows_latency_ms": {k: hist_dict(h) for k, h in ph.windows.items()},
    }


def one_line(d: dict) -> str:
    lat = d["latency_ms"]
    p99 = f"{lat['p99']:.2f}" if lat.get("p99") is not None else "-"
    return (f"  {d['target']:<22} {d['name']:<44} {d['tps']:>9.0f} TPS  p99 {p99} ms  "
            f"answered {d['answered']}/{d['sent']}  rc {d['by_response_code']}")


async def _run_async(params: BenchParams, scenarios: list[str], log) -> dict:
    with tempfile.TemporaryDirectory(prefix="isoswitch-bench-") as tmp:
        bench = Bench(params, Path(tmp), log=log)
        try:
            if params.profile is not None:
                await bench.profile_closed()
            else:
                await bench.run(scenarios)
        except Exception:
            for f in sorted(Path(tmp).glob("*.log")):
                log(f"--- {f.name}\n{f.read_text()[-1500:]}")
            raise
        return {"phases": bench.phases, "processes": bench.process_info}


def run_bench(params: BenchParams, scenarios: list[str], log=print) -> dict:
    try:
        import uvloop

        runner = uvloop.run if hasattr(uvloop, "run") else None
    except ImportError:
        runner = None
    started = time.time()
    coro = _run_async(params, scenarios, log)
    result = runner(coro) if runner else asyncio.run(coro)
    result["wall_s"] = round(time.time() - started, 1)
    return result
