"""The README promise: `isoswitch run` with no arguments starts on embedded defaults,
and `isoswitch sim terminal` against it gets approvals."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _cli(*args):
    return [sys.executable, "-m", "switch.cli", *args]


def test_run_with_no_arguments_then_sim_terminal(tmp_path):
    if not _port_free(8583):
        pytest.skip("port 8583 (the default listener port) is in use on this machine")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(_cli("run"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "isoswitch sim terminal" in line:
                break
        out = "".join(lines)
        assert "listener terminals on 127.0.0.1:8583 (mTLS" in out, out
        assert (tmp_path / "state" / "pki" / "ca.crt").exists()
        res = subprocess.run(_cli("sim", "terminal", "--port", "8583", "--state-dir", "state",
                                  "--count", "20"), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "00" in res.stdout
        assert "4761739001010010" not in res.stdout + res.stderr + out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, rest
    assert "shutting down" in rest
    assert "4761739001010010" not in rest


def _state_dir_cli(tmp_path, cfg):
    """``cli(*args)``: the isoswitch command line on a config (written to ``cfg``)
    that names only a state directory under ``tmp_path``."""
    cfg.write_text(f'[switch]\nstate_dir = "{tmp_path / "state"}"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))

    def cli(*args):
        return subprocess.run(_cli(*args, "--config", str(cfg)), capture_output=True, text=True,
                              env=env, timeout=60)
    return cli


def test_keys_and_queue_commands(tmp_path):
    import asyncio

    from switch.config import load_config
    from switch.journal import make_journal
    from switch.keys import KeyRing

    cfg = tmp_path / "c.toml"
    cli = _state_dir_cli(tmp_path, cfg)

    r = cli("keys", "init")
    assert r.returncode == 0 and (tmp_path / "state" / "keys.json").stat().st_mode & 0o077 == 0
    assert cli("keys", "init").returncode == 1  # never overwritten
    r = cli("keys", "rotate")
    assert r.returncode == 0 and "k2" in r.stdout

    async def park_one():
        c = load_config(cfg)
        j = make_journal(c.journal, KeyRing.load(c.security.key_file))
        await j.start()
        eid = await j.sf_enqueue("acq-a", "reversal", None, {"t": "0200", "11": "000001", "2": "4111111111111111"})
        await j.sf_park(eid, "gave up after 50 attempts")
        await j.close()
        return eid

    eid = asyncio.run(park_one())
    r = cli("queue", "list", "--parked")
    assert r.returncode == 0 and f"{eid:>8} acq-a" in r.stdout and "gave up" in r.stdout
    assert "4111111111111111" not in r.stdout
    r = cli("queue", "requeue", str(eid))
    assert r.returncode == 0 and "re-queued" in r.stdout
    r = cli("queue", "list")
    assert "queued 1, parked 0" in r.stdout


def test_run_reports_a_busy_port_without_a_traceback(tmp_path):
    cfg = tmp_path / "c.toml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg.write_text(f'[switch]\nstate_dir = "{tmp_path / "state"}"\n'
                       f'[[listeners]]\nname = "terminals"\nport = {port}\n')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run(_cli("run", "--config", str(cfg)), capture_output=True, text=True, env=env,
                           timeout=60)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr


def test_run_reports_a_journal_that_is_not_a_database_without_a_traceback(tmp_path):
    bad = tmp_path / "journal.db"
    bad.write_bytes(b"this is not an SQLite database, whatever its name says\n" * 20)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[switch]\nstate_dir = "{tmp_path / "state"}"\n[journal]\npath = "{bad}"\n'
                   f'[[listeners]]\nname = "terminals"\nport = 0\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(_cli("run", "--config", str(cfg)), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert "cannot open the journal" in r.stderr and "Traceback" not in r.stderr
    assert bad.read_bytes().startswith(b"this is not an SQLite database")  # left as it was


def test_queue_and_keys_commands_report_a_missing_key_file_and_list_acknowledged_entries(tmp_path):
    """`isoswitch queue ...` and `keys rotate` without a key file said so with a
    traceback; `queue list --all` ("include acknowledged entries") listed none."""
    import asyncio

    from switch.config import load_config
    from switch.journal import make_journal
    from switch.keys import KeyRing

    cfg = tmp_path / "c.toml"
    cli = _state_dir_cli(tmp_path, cfg)

    for args in (("queue", "list"), ("queue", "requeue", "1"), ("keys", "rotate")):
        r = cli(*args)
        assert r.returncode == 1 and "key file does not exist" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "state" / "keys.json").exists()
    assert cli("keys", "init").returncode == 0

    async def ack_one():
        c = load_config(cfg)
        j = make_journal(c.journal, KeyRing.load(c.security.key_file))
        await j.start()
        eid = await j.sf_enqueue("acq-a", "reversal", None, {"t": "0200", "11": "000001"})
        e = await j.sf_claim("acq-a", "w", 30)
        assert e.id == eid and await j.sf_ack(eid)
        await j.close()
        return eid

    eid = asyncio.run(ack_one())
    assert f"{eid:>8} acq-a" not in cli("queue", "list").stdout
    r = cli("queue", "list", "--all")
    assert r.returncode == 0 and f"{eid:>8} acq-a" in r.stdout and "acked" in r.stdout, r.stdout
