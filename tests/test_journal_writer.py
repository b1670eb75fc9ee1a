"""The SQLite writer's batched hot path (WriterCore._run_batch) against its
one-statement-per-write path: same results, same rows, whatever the group."""
from __future__ import annotations

import random
import time

import pytest

from switch import journal as J
from switch import journal_writer as W
from switch.journal import TxnRecord, _pack, _txn_tuple, sanitize_fields, sanitize_replay
from switch.journal_writer import WriterCore, open_writer_connection
from switch.keys import KeyRing
from switch.messages import TEST_PAN

FIELDS = _pack(sanitize_fields({"2": TEST_PAN, "3": "000000", "4": "000000001000", "11": "000001"}))
REPLAY = _pack(sanitize_replay({"t": "0210", "39": "00", "38": "A12345", "11": "000001"}))
# every column but the ciphertext, whose nonce is random
COLS = ", ".join(c for c in J.TXN_COLS if c != "reversal_fields") + ", reversal_fields IS NOT NULL"


def _core(tmp_path, name: str, keyring: KeyRing) -> WriterCore:
    return WriterCore(open_writer_connection(str(tmp_path / f"{name}.db"), "NORMAL"), keyring, "node", "boot")


def _fwd(stan: int, link_stan: str | None = None, *, terminal: str = "TERM0001", at: float = 1.0e9):
    txn = TxnRecord("pos", terminal, f"{stan:06d}", "1121120000", "0200", rrn=f"{stan:012d}", amount=1000,
                    currency="840", pan=TEST_PAN, proc_code="000000", received_at=at)
    return "fwd", (_txn_tuple(txn), "acq-a", link_stan or f"{stan:06d}", at + 0.001, FIELDS)


def _outcome(txn_id, rc: str = "00"):
    return "outcome", (txn_id, rc, "A12345" if rc == "00" else None, REPLAY, 1.5, 1.0e9 + 1)


def _run(core: WriterCore, ops: list, seq0: int = 0) -> dict:
    group = [(seq0 + k, name, args) for k, (name, args) in enumerate(ops)]
    results = core.run_group(group)
    assert sorted(s for s, _ok, _v in results) == [s for s, _n, _a in group]  # one result per write
    return {s: (ok, v) for s, ok, v in results}


def _rows(core: WriterCore) -> list:
    return core.conn.execute(f"SELECT {COLS} FROM txn ORDER BY id").fetchall()


@pytest.fixture
def keyring():
    return KeyRing.generate()


def test_a_batch_gives_each_write_its_own_result(tmp_path, keyring):
    core = _core(tmp_path, "j", keyring)
    r = _run(core, [_fwd(1), _fwd(2), _fwd(3)])
    assert [r[k] for k in range(3)] == [(True, 1), (True, 2), (True, 3)]
    # outcomes for 1 and 3 and an unknown id, a retransmission of 2 and a new request, in one run
    r = _run(core, [_outcome(1), _fwd(2), _outcome(99), _fwd(4), _outcome(3, "05")], seq0=10)
    assert r == {10: (True, 1), 11: (True, None), 12: (True, 0), 13: (True, 4), 14: (True, 1)}
    rows = core.conn.execute("SELECT id, state, response_code, approval_code, reversal_fields IS NULL "
                             "FROM txn ORDER BY id").fetchall()
    assert rows == [(1, "done", "00", "A12345", 1), (2, "forwarded", None, None, 0),
                    (3, "done", "05", None, 1), (4, "forwarded", None, None, 0)]
    # the stored row is what the one-by-one path stores: masked PAN, fingerprint, decryptable fields
    pan_masked, fp, blob = core.conn.execute(
        "SELECT pan_masked, pan_fingerprint, reversal_fields FROM txn WHERE id = 4").fetchone()
    assert TEST_PAN not in pan_masked and fp == keyring.pan_fingerprint(TEST_PAN)
    fields = core._decrypt_reversal(4, blob, ("TERM0001", "000004", "1121120000", "0200"))
    assert fields is not None and fields["4"] == "000000001000"


def test_a_malformed_write_fails_alone(tmp_path, keyring):
    core = _core(tmp_path, "j", keyring)
    bad_fwd = ("fwd", (("pos",), "acq-a"))  # too few fields
    bad_outcome = ("outcome", (1,))
    r = _run(core, [_fwd(1), bad_fwd, _fwd(2), bad_outcome, _outcome(1)])
    assert r[0] == (True, 1) and r[2] == (True, 2) and r[4] == (True, 1)
    assert r[1][0] is False and r[3][0] is False
    assert r[1][1].startswith("journal write failed") and TEST_PAN not in r[1][1]


def test_a_late_response_between_writes_keeps_its_place(tmp_path, keyring):
    core = _core(tmp_path, "j", keyring)
    _run(core, [_fwd(1, "000777"), _fwd(2)])
    # the late answer for link STAN 000777 arrived before a new request reused that STAN:
    # it belongs to txn 1, never to the new one (a reordering across it would match 3)
    r = _run(core, [_outcome(2), ("late", ("acq-a", "000777", "00", 1.0e9 + 5)), _fwd(3, "000777"), _fwd(4)],
             seq0=10)
    assert r[11] == (True, 1) and r[12] == (True, 3) and r[13] == (True, 4)


def test_batch_ids_follow_rows_another_path_wrote(tmp_path, keyring):
    core = _core(tmp_path, "j", keyring)
    # a row inserted by another path with an id above the batch's last one:
    # the batch continues after it, as SQLite's own rowid choice would
    _run(core, [_fwd(1)])
    core.conn.execute("INSERT INTO txn (id, terminal_id, terminal_stan, terminal_tx_time, mti, received_at, "
                      "node_id, boot_id, state) VALUES (5, 'OTHER', '000001', '1121120000', '0200', 0, 'n', "
                      "'b', 'received')")
    r = _run(core, [_fwd(2), _fwd(3)], seq0=10)
    assert r == {10: (True, 6), 11: (True, 7)}


@pytest.mark.parametrize("seed", range(6))
def test_batched_and_one_by_one_agree(tmp_path, keyring, seed, monkeypatch):
    """Random groups of new requests, retransmissions, outcomes (known and
    unknown ids), late answers and timeouts: both paths answer every write
    alike and leave the same rows."""
    rnd = random.Random(seed)
    batched = _core(tmp_path, "batched", keyring)
    single = _core(tmp_path, "single", keyring)
    stan, open_ids, known_ids, seq = 0, [], [], 0
    for _group in range(25):
        ops = []
        for _ in range(rnd.randint(1, 40)):
            roll = rnd.random()
            if roll < 0.45 or stan == 0:
                stan += 1
                ops.append(_fwd(stan, f"{rnd.randint(1, 60):06d}", terminal=f"TERM000{stan % 3}"))
            elif roll < 0.55:  # a retransmission
                s = rnd.randint(1, stan)
                ops.append(_fwd(s, terminal=f"TERM000{s % 3}"))
            elif roll < 0.85 and open_ids:
                ops.append(_outcome(open_ids.pop(rnd.randrange(len(open_ids))), rnd.choice(["00", "05", "91"])))
            elif roll < 0.9:
                # done already, or unknown: never an id this group creates (the
                # parent learns an id only after the group holding it committed)
                ops.append(_outcome(rnd.choice(known_ids + [10_000 + stan])))
            elif roll < 0.95:
                ops.append(("late", ("acq-a", f"{rnd.randint(1, 60):06d}", "00", time.time())))
            else:
                ops.append(("exec", (J.SQL_TIMEOUT, (time.time(), rnd.randint(1, stan + 2)))))
        got = _run(batched, ops, seq)
        monkeypatch.setattr(W, "_BATCHED", frozenset())
        want = _run(single, ops, seq)
        monkeypatch.undo()
        assert got == want
        new_ids = [v for s, (ok, v) in got.items() if ok and ops[s - seq][0] == "fwd" and v is not None]
        open_ids += new_ids
        known_ids += new_ids
        seq += len(ops)
    assert _rows(batched) == _rows(single)
    assert len(_rows(batched)) == stan
