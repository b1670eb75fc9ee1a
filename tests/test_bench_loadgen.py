"""The load generator's shortcuts give exactly what the slow way gives."""
import json
from pathlib import Path

import pytest

from bench.loadgen import PhaseResult, RequestSource, StanSpace
from core import iso8583

DIALECTS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "codecs").glob("*.json")
                  if "_meta" in json.loads(p.read_text()))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_patched_purchase_frames_equal_full_encodes(dialect):
    src = RequestSource(StanSpace(), dialect=dialect)
    for _ in range(50):
        stan, mti, frame, doc = src.next()
        assert mti == "0200" and doc is None
        assert frame == src._purchase_frame(stan)
        decoded = iso8583.decode(frame[2:], src.spec)[0]
        assert decoded["11"] == stan and decoded["37"].endswith(stan)


def test_the_default_dialect_is_patched_not_encoded():
    assert RequestSource(StanSpace())._patch is not None


def test_a_mixed_source_encodes_every_request():
    src = RequestSource(StanSpace(), mix=("0100", "0200", "0400"))
    assert src._patch is None
    assert [src.next()[1] for _ in range(6)] == ["0100", "0200", "0400"] * 2


def test_a_source_whose_frames_cannot_be_patched_encodes_in_full(monkeypatch):
    # a template whose trace number does not sit at fixed offsets: fall back
    calls = []
    real = RequestSource._purchase_frame

    def varying(self, stan):
        calls.append(stan)
        return real(self, stan) + (b"x" if stan == "111111" else b"")

    monkeypatch.setattr(RequestSource, "_purchase_frame", varying)
    assert RequestSource(StanSpace())._patch is None


def test_fold_records_every_latency_once():
    ph = PhaseResult(name="t", mode="closed")
    values = [1, 5, 5, 1000, 250_000, 5]
    ph.latency_us.extend(values)
    ph.service_us.extend(values[:3])
    ph.fold()
    assert ph.latency.get_total_count() == len(values) and ph.service.get_total_count() == 3
    assert ph.latency_us == [] and ph.service_us == []
    assert ph.latency.get_max_value() >= 250_000 > ph.latency.get_value_at_percentile(80)
    ph.fold()  # nothing pending: nothing added
    assert ph.latency.get_total_count() == len(values)


def test_a_closed_loop_counts_its_window_after_the_settle_time():
    ph = PhaseResult(name="t", mode="closed", duration_s=2.0, settle_s=0.5)
    ph.answered_in_window = 300
    assert ph.tps == 200.0


def test_the_journal_verdict_is_the_median_of_paired_rounds():
    from bench.report import verdict

    def phase(target, tps):
        return {"scenario": "journal", "target": target, "mode": "closed", "tps": tps}

    on = [700, 900, 100, 800, 750]
    off = [1000, 1000, 1000, 1000, 1000]
    # rounds run on/off back to back; the phase list keeps run order
    phases = [p for a, b in zip(on, off)
              for p in (phase("switch (cython)", a), phase("switch (cython) journal none", b))]
    check = next(c for c in verdict(phases)["goals"] if c["check"].startswith("SQLite journal"))
    assert check["value"] == 0.75 and check["result"] == "PASS"
    assert "median of 5 rounds: 70%, 90%, 10%, 80%, 75%" in check["measured"]
    off[1] = 1500  # that round's ratio falls to 60%, the median to 70%
    phases = [p for a, b in zip(on, off)
              for p in (phase("switch (cython)", a), phase("switch (cython) journal none", b))]
    check = next(c for c in verdict(phases)["goals"] if c["check"].startswith("SQLite journal"))
    assert check["value"] == 0.7 and check["result"] == "PASS"
