"""Codec micro-bench: a realistic 0200 through Cython, the pure-Python twin and pyiso8583.

    python -m bench.codec [--dialect default] [--seconds 0.5] [--repeat 5]

All three run side by side in one process, interleaved, and each figure is
the best of --repeat timed runs, so a noisy shared machine shifts all of
them alike; the ratios to pyiso8583 are what we quote. The message carries
fields 2,3,4,7,11,12,13,14,18,22,25,35,37,41,42,43,49,52,55 with a test
PAN from a documented test range.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import iso8583 as pyiso

from core.dialect import load_dialect

from switch.messages import TEST_PAN  # test card from a public test range


def sample_0200(spec: dict) -> dict:
    track2_sep = "D" if spec["35"]["data_enc"] == "b" else "="
    return {
        "t": "0200",
        "2": TEST_PAN,
        "3": "000000",
        "4": "000000001000",
        "7": "1121153000",
        "11": "123456",
        "12": "153000",
        "13": "1121",
        "14": "2812",
        "18": "5999",
        "22": "051",
        "25": "00",
        "35": TEST_PAN + track2_sep + "28122011143804400000",
        "37": "632115123456",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "ISOSWITCH TEST MERCHANT  CITY         US",
        "49": "840",
        "52": "0123456789ABCDEF",
        "55": "9F2608C2C12B098F3DA6E39F2701809F100706011203A4A8029F37045D4A2C8E"
              "9F3602000A950500000000009A032611219C01009F02060000000010005F2A020840",
    }


def _time(fn, seconds: float, repeat: int) -> float:
    """Best-of-`repeat` µs per call, each run lasting about `seconds`."""
    n = 1
    while True:  # calibrate the loop count
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > 0.05:
            break
        n *= 4
    loops = max(1, int(n * seconds / dt))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best * 1e6


def run(dialect: str = "default", seconds: float = 0.5, repeat: int = 5) -> dict:
    spec = load_dialect(dialect)
    doc = sample_0200(spec)
    impls = {"pyiso8583": pyiso}
    try:
        impls["cython"] = importlib.import_module("core._iso8583")
    except ImportError:
        print("note: Cython extension not built; run `pip install -e .`", file=sys.stderr)
    impls["python"] = importlib.import_module("core._iso8583_py")
    raw = bytes(pyiso.encode(dict(doc), spec)[0])
    for name, mod in impls.items():  # all must agree before anything is timed
        assert bytes(mod.encode(dict(doc), spec)[0]) == raw, name
        assert mod.decode(raw, spec)[0] == pyiso.decode(raw, spec)[0], name
    results = {}
    for name, mod in impls.items():
        enc, dec = mod.encode, mod.decode

        def encode_once(enc=enc):
            enc(dict(doc), spec)

        def decode_once(dec=dec):
            dec(raw, spec)

        def both_once(enc=enc, dec=dec):
            r, _ = enc(dict(doc), spec)
            dec(r, spec)

        results[name] = {
            "encode_us": _time(encode_once, seconds, repeat),
            "decode_us": _time(decode_once, seconds, repeat),
            "encode_decode_us": _time(both_once, seconds, repeat),
        }
    base = results["pyiso8583"]
    for name, r in results.items():
        for k in ("encode", "decode", "encode_decode"):
            r[f"{k}_speedup_vs_pyiso8583"] = base[f"{k}_us"] / r[f"{k}_us"]
    return {"dialect": dialect, "message_bytes": len(raw), "fields": len(doc) - 1,
            "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    ap.add_argument("--dialect", default="default")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one timed run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--min-speedup", type=float, default=0.0,
                    help="exit 1 if Cython encode+decode is not this many times faster than pyiso8583")
    args = ap.parse_args(argv)
    out = run(args.dialect, args.seconds, args.repeat)
    print(f"0200 with {out['fields']} fields, {out['message_bytes']} bytes, dialect {out['dialect']}")
    print(f"{'implementation':<14}{'encode µs':>11}{'decode µs':>11}{'enc+dec µs':>12}"
          f"{'enc x':>8}{'dec x':>8}{'enc+dec x':>11}")
    for name, r in out["results"].items():
        print(f"{name:<14}{r['encode_us']:>11.2f}{r['decode_us']:>11.2f}{r['encode_decode_us']:>12.2f}"
              f"{r['encode_speedup_vs_pyiso8583']:>8.1f}{r['decode_speedup_vs_pyiso8583']:>8.1f}"
              f"{r['encode_decode_speedup_vs_pyiso8583']:>11.1f}")
    print("(x = times faster than pyiso8583, measured side by side in this run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    c = out["results"].get("cython")
    if args.min_speedup and (c is None or c["encode_decode_speedup_vs_pyiso8583"] < args.min_speedup):
        print(f"FAIL: Cython encode+decode below {args.min_speedup}x pyiso8583")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
