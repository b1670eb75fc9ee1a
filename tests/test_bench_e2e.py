"""The end-to-end bench runs every scenario (--quick) and reports what it saw.

No timing asserts: figures belong to the bench and docs/BENCHMARKS.md, not to
tests. This checks the processes start, requests flow through the real
switch (Cython and pure-Python core) and the forwarder, answers come back,
the kill -9 happens, and the report has its structure (table, JSON, PNG,
verdict lines with a measured value each).
"""
import json

import pytest

from bench import __main__ as bench_main
from bench.e2e import SCENARIOS

pytestmark = pytest.mark.timeout(90)


def test_bench_quick_every_scenario(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench_main.main(["--quick", "--json", str(out_json), "--png", str(out_png)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {d["scenario"] for d in report["phases"]} == set(SCENARIOS)
    targets = {d["target"] for d in report["phases"]}
    assert targets == {"switch (cython)", "switch (pure python)", "forwarder",
                       "switch (cython) journal none"}
    assert "journal on/off TPS" in report["verdict"]["ratios"]
    for d in report["phases"]:
        assert d["sent"] > 0, d["name"]
        assert d["answered"] > 0, d["name"]
        assert d["tps"] > 0, d["name"]
        assert d["by_response_code"], d["name"]
        lat = d["latency_ms"]
        assert set(lat) >= {"mean", "p50", "p90", "p99", "p99.9", "max", "count"}
        assert lat["p50"] <= lat["p99"] <= lat["max"]
        assert d["front_cpu_us_per_txn"] is not None and d["front_peak_rss_mb"] > 0
    # the steady phase of a healthy stack answers everything, and approves it
    steady = next(d for d in report["phases"] if d["scenario"] == "steady")
    assert steady["answered"] == steady["sent"]
    assert set(steady["by_response_code"]) == {"00"}
    mixed = next(d for d in report["phases"] if d["scenario"] == "mixed")
    assert set(mixed["by_mti"]) == {"0100", "0200", "0400"}
    failover = next(d for d in report["phases"] if d["scenario"] == "failover")
    assert failover["primary_killed"] is True
    assert set(failover["windows_latency_ms"]) == {"before kill", "after kill"}
    burst = next(d for d in report["phases"] if d["scenario"] == "burst")
    assert set(burst["windows_latency_ms"]) == {"before", "burst", "after"}

    v = report["verdict"]
    assert len(v["targets"]) == 2 and len(v["goals"]) == 5  # 4 speed goals + journal on/off
    for check in v["targets"] + v["goals"]:
        assert check["result"] in ("PASS", "MISS", "n/a") and check["measured"]
    assert {"switch/forwarder TPS", "cython/pure-python TPS"} <= set(v["ratios"])
    assert report["machine"]["nproc"] >= 1
    for word in ("design targets", "goals", "ratios", "p99.9"):
        assert word in printed


def test_bench_rejects_unknown_scenario(capsys):
    with pytest.raises(SystemExit):
        bench_main.main(["--quick", "--scenarios", "steady,nonsense"])
    assert "nonsense" in capsys.readouterr().err
