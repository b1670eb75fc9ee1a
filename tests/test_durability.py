"""Fault tests with real processes: crash recovery, dropped links, long outages, scale-out.

DESIGN.md invariants 2 and 4-7: a request is journaled before it is
forwarded, an unknown outcome is reversed exactly once (also after kill -9),
the store-and-forward queue keeps entries in order through an outage, and two
switch processes on one PostgreSQL journal send each reversal once.
"""
import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switch.sim.acquirer import AcquirerSimulator, Fault
from switch.sim.terminal import TerminalClient, dev_client_context, make_purchase
from tests.pg import pg_dsn, pg_server  # noqa: F401  (pytest fixtures)
from tests.switch_harness import run, running_switch, terminal

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent


def reversals(sim):
    return [d for d in sim.received if d.get("t") in ("0400", "0401")]


def financial(sim):
    return [d for d in sim.received if d.get("t") in ("0100", "0200")]


# -- a switch in its own process ------------------------------------------------

def write_config(tmp_path: Path, acq_port: int, *, journal: str = "", name="isoswitch.toml",
                 acq_timeout: float = 20.0, terminal_timeout: float = 30.0) -> Path:
    cfg = tmp_path / name
    cfg.write_text(f"""
[switch]
state_dir = "{tmp_path / 'state'}"
shutdown_grace = 1.0
{journal}
[simulators]
embedded = false
[[listeners]]
name = "terminals"
port = 0
terminal_timeout = {terminal_timeout}
[[acquirers]]
name = "acq-a"
host = "127.0.0.1"
port = {acq_port}
connections = 1
timeout = {acq_timeout}
reconnect_min = 0.05
reconnect_max = 0.2
echo_interval = 0
""")
    return cfg


class SwitchProcess:
    def __init__(self, cfg: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0  # this process's output starts here
        self.logf = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "switch.cli", "run", "--config", str(cfg)],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = None

    async def started(self, timeout=30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()[self.offset:]
            ports = re.findall(r"listener terminals on 127\.0\.0\.1:(\d+)", text)
            if ports and "send a test transaction" in text.split(f":{ports[-1]}")[-1]:
                self.port = int(ports[-1])
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError("switch exited:\n" + text)
            await asyncio.sleep(0.05)
        raise AssertionError("switch did not start:\n" + self.log.read_text())

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.logf.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(int(c) for c in f.read().split())
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_until(pred, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


async def kill9_with_request_at_acquirer(tmp_path: Path, sim, req: dict, held) -> tuple[Path, Path, dict]:
    """Start a switch process, send ``req`` from a terminal, kill -9 the switch
    once ``held()`` (the simulator's list of such requests) has it unanswered;
    the journal writer must exit with it and the terminal gets no answer.
    Returns (config, log, the request as the acquirer received it)."""
    cfg = write_config(tmp_path, sim.port)
    log = tmp_path / "switch.log"
    sw = SwitchProcess(cfg, log)
    port = await sw.started()
    sim.fault = Fault(drop_responses=True)  # forwarded, never answered
    client = TerminalClient("127.0.0.1", port, ssl=dev_client_context(tmp_path / "state"))
    await client.connect()
    pending = asyncio.create_task(client.request(req, timeout=30))
    assert await wait_until(lambda: len(held()) == 1)
    original = held()[0]
    writers = _children(sw.proc.pid)
    assert len(writers) == 1  # the SQLite journal's writer process
    sw.kill9()  # between forwarding and answering
    # the writer sees its parent's end of the socket close and exits: no orphan
    assert await wait_until(lambda: not any(_alive(w) for w in writers), 10)
    with pytest.raises((ConnectionError, asyncio.TimeoutError, OSError, EOFError)):
        await asyncio.wait_for(pending, 5)
    await client.close()
    return cfg, log, original


# -- the tests ------------------------------------------------------------------

def test_kill9_between_forwarding_and_answering_reverses_exactly_once(tmp_path):
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=0.0).start()
        try:
            req = make_purchase(5000, stan=314)
            cfg, log, original = await kill9_with_request_at_acquirer(tmp_path, sim, req, lambda: financial(sim))
            assert not reversals(sim)
            sim.fault = Fault()
            sw2 = SwitchProcess(cfg, log)
            await sw2.started()
            assert await wait_until(lambda: len(reversals(sim)) >= 1, 20)
            await asyncio.sleep(1.0)
            revs = reversals(sim)
            assert len(revs) == 1, revs
            assert revs[0]["90"][:10] == "0200" + original["11"]
            assert revs[0]["4"] == original["4"] and revs[0]["37"] == original["37"]
            assert "crash recovery: 1 store-and-forward entry queued" in log.read_text()
            # a retransmission after the restart is not forwarded again (outcome unknown: 94)
            async with TerminalClient("127.0.0.1", sw2.port, ssl=dev_client_context(tmp_path / "state")) as c:
                r = await c.request(dict(req), timeout=10)
            assert r["39"] == "94" and len(financial(sim)) == 1
            sw2.stop()
            # and a third start queues nothing more
            sw3 = SwitchProcess(cfg, log)
            await sw3.started()
            await asyncio.sleep(1.5)
            sw3.stop()
            assert len(reversals(sim)) == 1
        finally:
            await sim.stop()

    run(go(), timeout=150)


def test_acquirer_drops_link_with_200_in_flight(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 2000.0}},
                                  acquirer_opts={"acq-a": {"timeout": 5.0, "max_in_flight": 512}},
                                  listener={"terminal_timeout": 8.0, "max_in_flight": 64}) as sw:
            sim = sw.sims["acq-a"]
            port = sim.port
            clients = [terminal(sw, tmp_path) for _ in range(5)]
            for c in clients:
                await c.connect()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks = [asyncio.create_task(clients[i % 5].request(make_purchase(100 + i, stan=i + 1), timeout=10))
                     for i in range(200)]
            assert await wait_until(lambda: len(financial(sim)) == 200, 10)
            originals = {d["11"]: d for d in financial(sim)}
            await sim.stop()  # the acquirer drops the link with 200 requests in flight
            results = await asyncio.gather(*tasks)
            assert loop.time() - t0 < 8.0  # all within the terminal timeout
            assert [r["39"] for r in results] == ["91"] * 200
            # the acquirer comes back on the same port; every unknown outcome is reversed once
            sim2 = await AcquirerSimulator(name="acq-a", port=port, latency_ms=0.0).start()
            try:
                assert await sw.reversals.wait_empty(60)
                revs = reversals(sim2)
                stans = collections.Counter(r["90"][4:10] for r in revs)
                assert set(stans) == set(originals) and set(stans.values()) == {1}
            finally:
                await sim2.stop()
            for c in clients:
                await c.close()

    run(go(), timeout=150)


def test_acquirer_down_for_the_whole_test_queue_delivers_in_order(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}, acquirer_opts={"acq-a": {"timeout": 0.3}}) as sw:
            sim = sw.sims["acq-a"]
            port = sim.port
            sim.fault = Fault(drop_responses=True)
            async with terminal(sw, tmp_path) as t:
                for i in range(6):
                    assert (await t.request(make_purchase(1000 + i, stan=i + 1), timeout=5))["39"] == "91"
            # (after 5 timeouts the breaker opens: the 6th is never sent, so not reversed)
            sent_order = [d["11"] for d in financial(sim)]
            assert len(sent_order) >= 5
            await sim.stop()  # down: every reversal attempt fails, nothing is dropped
            await asyncio.sleep(2.0)
            assert await sw.journal.sf_depth("acq-a") == len(sent_order)
            sim2 = await AcquirerSimulator(name="acq-a", port=port, latency_ms=0.0).start()
            try:
                assert await sw.reversals.wait_empty(60)
                got = [r["90"][4:10] for r in reversals(sim2)]
                assert got == sent_order
                # the head was attempted while the acquirer was down: it goes as a repeat
                assert reversals(sim2)[0]["t"] == "0401"
            finally:
                await sim2.stop()

    run(go(), timeout=150)


def test_retransmission_across_a_restart_is_replayed(tmp_path):
    async def go():
        async with running_switch(tmp_path, {"acq-a": {}}) as sw:
            async with terminal(sw, tmp_path) as t:
                req = make_purchase(777, stan=21)
                first = await t.request(dict(req))
        # a new switch on the same state directory (the journal on disk), another acquirer
        async with running_switch(tmp_path, {"acq-b": {}}) as sw2:
            async with terminal(sw2, tmp_path) as t:
                again = await t.request(dict(req))
            assert not financial(sw2.sims["acq-b"])
        assert again["39"] == first["39"] == "00" and again["38"] == first["38"]
        assert again["2"] == req["2"] and again["11"] == "000021"

    run(go())


def test_two_switch_processes_on_one_postgres_journal_send_each_reversal_once(tmp_path, pg_dsn):
    async def go():
        from switch.config import JournalConfig
        from switch.journal import make_journal
        from switch.keys import ensure_keys

        sim = await AcquirerSimulator(name="acq-a", latency_ms=1.0).start()
        procs = []
        try:
            journal_cfg = f'[journal]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n'
            cfg1 = write_config(tmp_path, sim.port, journal=journal_cfg, name="a.toml")
            cfg2 = write_config(tmp_path, sim.port, journal=journal_cfg, name="b.toml")
            (tmp_path / "state").mkdir(exist_ok=True)
            keys = ensure_keys(tmp_path / "state" / "keys.json")
            j = make_journal(JournalConfig(backend="postgres", path=None, dsn=pg_dsn), keys)
            await j.start()
            n = 120
            for i in range(n):
                await j.sf_enqueue("acq-a", "reversal", None, {
                    "t": "0200", "11": f"{i + 1:06d}", "7": "1121120000", "2": "4111111111111111",
                    "3": "000000", "4": f"{i + 1:012d}", "41": "TERM0001", "37": f"{i + 1:012d}"})
            await j.close()
            procs = [SwitchProcess(cfg1, tmp_path / "a.log"), SwitchProcess(cfg2, tmp_path / "b.log")]
            for p in procs:
                await p.started()
            assert await wait_until(lambda: len(reversals(sim)) >= n, 60)
            await asyncio.sleep(1.5)
            stans = collections.Counter(r["90"][4:10] for r in reversals(sim))
            assert len(stans) == n and set(stans.values()) == {1}, stans.most_common(3)
            assert sim.connections >= 2  # both processes were connected and draining
            # each process sends under trace numbers of its own block (0 and 1 of 16): no
            # DE11 of one can meet the other's at the acquirer
            held = {re.search(r"trace numbers: block (\d+) of 16", (tmp_path / log).read_text())[1]
                    for log in ("a.log", "b.log")}
            assert held == {"0", "1"}  # (both start at once: either may take block 0)
            sent = [int(r["11"]) for r in reversals(sim)]
            assert all(1 <= s <= 2 * 62_499 for s in sent) and len(set(sent)) == len(sent), sent
        finally:
            for p in procs:
                p.stop()
            await sim.stop()

    run(go(), timeout=150)


def test_a_switch_process_killed_on_a_shared_postgres_journal_is_recovered_by_its_peer(tmp_path, pg_dsn):
    """DESIGN.md #7 without a restart: process A is killed -9 with a request
    held at the acquirer and never started again; B, sharing the journal,
    finds A dead once its heartbeat is stale and reverses that request, once."""
    async def go():
        sim = await AcquirerSimulator(name="acq-a", latency_ms=1.0).start()
        procs = []
        try:
            journal_cfg = (f'[journal]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n'
                           "stale_after_seconds = 1.5\n")
            cfg_a = write_config(tmp_path, sim.port, journal=journal_cfg, name="a.toml")
            cfg_b = write_config(tmp_path, sim.port, journal=journal_cfg, name="b.toml")
            a = SwitchProcess(cfg_a, tmp_path / "a.log")
            procs = [a]
            port_a = await a.started()
            b = SwitchProcess(cfg_b, tmp_path / "b.log")
            procs.append(b)
            await b.started()
            sim.fault = Fault(drop_responses=True)  # forwarded, never answered
            client = TerminalClient("127.0.0.1", port_a, ssl=dev_client_context(tmp_path / "state"))
            await client.connect()
            pending = asyncio.create_task(client.request(make_purchase(4200, stan=77), timeout=30))
            assert await wait_until(lambda: len(financial(sim)) == 1)
            original = financial(sim)[0]
            a.kill9()
            with pytest.raises((ConnectionError, asyncio.TimeoutError, OSError, EOFError)):
                await asyncio.wait_for(pending, 5)
            await client.close()
            sim.fault = Fault()
            # dead after 1.5 s without a heartbeat; B looks every 1.5 s
            assert await wait_until(lambda: len(reversals(sim)) >= 1, 30)
            await asyncio.sleep(4.0)  # several more of B's rounds: nothing is queued twice
            revs = reversals(sim)
            assert len(revs) == 1, [r["t"] for r in revs]
            assert revs[0]["90"][:10] == "0200" + original["11"]
            assert "recovery: 1 store-and-forward entry queued" in (tmp_path / "b.log").read_text()
        finally:
            for p in procs:
                if p.proc.poll() is None:
                    p.stop()
            await sim.stop()

    run(go(), timeout=150)


def test_journal_writer_killed_under_traffic_restarts_and_reverses_undelivered_answers(tmp_path):
    """kill -9 of the SQLite journal's writer process while the acquirer holds
    30 requests: their approvals cannot be journaled, so the terminals hear 96
    and each approval is reversed exactly once; the writer comes back by itself
    and later requests are approved again, without restarting the switch."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 250.0}}) as sw:
            sim = sw.sims["acq-a"]
            writer = sw.journal._writer
            old_pid = writer.proc.pid
            async with terminal(sw, tmp_path) as t:
                first = [asyncio.create_task(t.request(make_purchase(1000 + i, stan=i + 1), timeout=10))
                         for i in range(30)]
                assert await wait_until(lambda: len(financial(sim)) == 30, 10)
                os.kill(old_pid, signal.SIGKILL)  # the answers are still at the acquirer
                answers = await asyncio.gather(*first)
                assert await wait_until(lambda: sw.journal.problem() is None, 30)
                assert writer.proc.pid != old_pid and writer.stats["restarts"] == 1
                later = [await t.request(make_purchase(2000 + i, stan=100 + i), timeout=10) for i in range(5)]
            assert [r["39"] for r in later] == ["00"] * 5
            codes = collections.Counter(r["39"] for r in answers)
            assert set(codes) <= {"00", "96"} and codes["96"] >= 1, codes
            assert await sw.reversals.wait_empty(30)
            undelivered = {r["4"] for r in answers if r["39"] == "96"}
            forwarded = {d["4"] for d in financial(sim)}
            reversed_ = collections.Counter(r["4"] for r in reversals(sim))
            # every answer the terminal did not get is reversed, once; nothing delivered is
            assert set(reversed_) == undelivered & forwarded and set(reversed_.values()) == {1}
            assert sw.flow.counters["outcome_not_journaled"] == len(reversed_)
            # the journal was down when they were due: held in memory, then journaled
            held = sw.reversals.counters
            assert held["held"] >= 1 and held["held_journaled"] == held["held"] and sw.reversals.held == 0
            # the journal agrees: no forwarded request is left without an outcome or a reversal
            rows = await sw.journal.by_time(limit=100)
            open_rows = [r for r in rows if r["response_code"] is None and not r["reversal_queued"]
                         and r["forwarded_at"] is not None]
            assert open_rows == [], open_rows

    run(go(), timeout=150)


def test_a_stalled_journal_never_leaves_an_answer_the_terminal_did_not_get(tmp_path):
    """The journal's writer stops (SIGSTOP: a hung disk) while 10 answers are
    at the acquirer and 10 more requests arrive. The terminals get 91 at their
    deadline. When the writer continues: the 10 approvals, journaled too late
    to be delivered, are reversed once each; the 10 requests whose forwarding
    was journaled too late are never sent. Invariants 1, 2 and 4."""
    async def go():
        async with running_switch(tmp_path, {"acq-a": {"latency_ms": 200.0}},
                                  acquirer_opts={"acq-a": {"timeout": 1.0}},
                                  listener={"terminal_timeout": 1.5}) as sw:
            sim = sw.sims["acq-a"]
            writer = sw.journal._writer.proc.pid
            async with terminal(sw, tmp_path) as t:
                first = [asyncio.create_task(t.request(make_purchase(1000 + i, stan=i + 1), timeout=5))
                         for i in range(10)]
                assert await wait_until(lambda: len(financial(sim)) == 10, 5)
                os.kill(writer, signal.SIGSTOP)
                try:
                    second = [asyncio.create_task(t.request(make_purchase(2000 + i, stan=100 + i), timeout=5))
                              for i in range(10)]
                    answers = await asyncio.gather(*first, *second)
                    assert [a["39"] for a in answers] == ["91"] * 20  # each at its deadline
                    await asyncio.sleep(0.5)
                finally:
                    os.kill(writer, signal.SIGCONT)
                # the flows finish once their writes complete
                assert await wait_until(lambda: sw.flow.counters["outcome_too_late"] == 20
                                        and sw.links["acq-a"].counters["not_sent_late"] == 10, 15)
                assert await sw.reversals.wait_empty(30)
                reversed_ = collections.Counter(r["4"] for r in reversals(sim))
                assert set(reversed_) == {d["4"] for d in financial(sim)} and set(reversed_.values()) == {1}
                assert len(financial(sim)) == 10  # the late-journaled forwardings never left
                assert sw.links["acq-a"].health.state_name == "CLOSED"  # not the acquirer's fault
                assert (await t.request(make_purchase(3000, stan=300), timeout=5))["39"] == "00"

    run(go(), timeout=120)
