"""BIN table bench: load, lookup and reload, Cython vs pure Python.

    python -m bench.bintable [--rows 1000000] [--lookups 1000000] [--seed 8583]
                             [--impl both|c|py]

Generates a CSV of random, non-duplicate 6-11 digit prefixes and ranges in a
temporary directory (deterministic seed), loads it with each implementation,
times lookups of random 16-digit PANs from Python (a plain ``for`` loop over
a bound method, loop overhead included), and times
``BinTableHolder.reload_from_csv``. The PANs are random digits generated here
and never printed.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import random
import sys
import tempfile
import time

from core.bintable import BinTableHolder

SCHEMES = ("visa", "mastercard", "amex", "discover", "unionpay", "jcb")
COUNTRIES = ("US", "GB", "DE", "FR", "NL", "IT", "ES", "840", "826", "276")
CARD_TYPES = ("credit", "debit", "prepaid")


def generate_csv(path: str, rows: int, seed: int) -> None:
    """``rows`` distinct entries: 70 % prefixes, 30 % ranges, 6-11 digits,
    a few hundred distinct route records (as in a real BIN file)."""
    rnd = random.Random(seed)
    records = [
        (
            f"acq{i % 12}_{rnd.choice(SCHEMES)}",
            rnd.choice(SCHEMES),
            rnd.choice(COUNTRIES),
            rnd.choice(CARD_TYPES),
            f"issuer{i}" if i % 3 else "",
        )
        for i in range(300)
    ]
    seen = set()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("low", "high", "route", "scheme", "country", "card_type", "issuer"))
        while len(seen) < rows:
            n = rnd.randint(6, 11)
            top = 10**n - 1
            low = rnd.randint(10 ** (n - 1), top)
            if rnd.random() < 0.3:
                high = min(top, low + rnd.randint(1, 10 ** (n - 5)))
            else:
                high = low
            key = (n, low, high)
            if key in seen:
                continue
            seen.add(key)
            route, scheme, country, card_type, issuer = rnd.choice(records)
            w.writerow(
                (str(low), str(high) if high != low else "", route, scheme,
                 country, card_type, issuer)
            )


def bench_impl(name: str, module, path: str, pans: list[str]) -> dict:
    t0 = time.perf_counter()
    table = module.BinTable.from_csv(path)
    load_s = time.perf_counter() - t0

    lookup = table.lookup
    hits = 0
    for pan in pans[:10000]:  # warm caches and branch predictors
        lookup(pan)
    t0 = time.perf_counter()
    for pan in pans:
        lookup(pan)
    lookup_s = time.perf_counter() - t0
    for pan in pans:
        if lookup(pan) is not None:
            hits += 1

    holder = BinTableHolder(table, table_cls=module.BinTable)
    t0 = time.perf_counter()
    old = holder.reload_from_csv(path)
    reload_s = time.perf_counter() - t0
    assert old is table
    return {
        "name": name,
        "load_s": load_s,
        "reload_s": reload_s,
        "ns": lookup_s / len(pans) * 1e9,
        "per_s": len(pans) / lookup_s,
        "hits": hits,
        "entries": len(table),
        "segments": table.segment_count,
        "records": table.record_count,
        "nbytes": table.nbytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bintable")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=8583)
    ap.add_argument("--impl", choices=("both", "c", "py"), default="both")
    args = ap.parse_args(argv)

    impls = []
    if args.impl in ("both", "c"):
        try:
            impls.append(("cython", importlib.import_module("core._bintable")))
        except ImportError as exc:
            print(f"cython extension not built ({exc}); skipping it")
    if args.impl in ("both", "py"):
        impls.append(("python", importlib.import_module("core._bintable_py")))

    with tempfile.TemporaryDirectory(prefix="bench-bintable-") as tmp:
        path = os.path.join(tmp, "bins.csv")
        t0 = time.perf_counter()
        generate_csv(path, args.rows, args.seed)
        gen_s = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 1e6
        rnd = random.Random(args.seed + 1)
        pans = ["%016d" % rnd.randrange(10**15, 10**16) for _ in range(args.lookups)]
        print(f"python {sys.version.split()[0]}; seed {args.seed}")
        print(f"generated {args.rows:,} rows ({size_mb:.1f} MB CSV) in {gen_s:.2f} s")
        print(f"{args.lookups:,} lookups of random 16-digit PANs per implementation")
        results = [bench_impl(name, mod, path, pans) for name, mod in impls]
        del pans

    print()
    print(f"{'impl':<8}{'load s':>9}{'reload s':>10}{'ns/lookup':>11}"
          f"{'lookups/s':>13}{'hits':>10}{'steps':>10}{'records':>9}{'arrays MB':>11}")
    for r in results:
        print(f"{r['name']:<8}{r['load_s']:>9.2f}{r['reload_s']:>10.2f}{r['ns']:>11.0f}"
              f"{r['per_s']:>13,.0f}{r['hits']:>10,}{r['segments']:>10,}"
              f"{r['records']:>9}{r['nbytes'] / 1e6:>11.1f}")
    if len(results) == 2:
        c, p = results
        print()
        print(f"python/cython ratio: load {p['load_s'] / c['load_s']:.1f}x, "
              f"reload {p['reload_s'] / c['reload_s']:.1f}x, "
              f"lookup {p['ns'] / c['ns']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
