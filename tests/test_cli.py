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
