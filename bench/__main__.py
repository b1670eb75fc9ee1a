"""``python -m bench``: the end-to-end bench (switch, simulators, load generator in separate processes).

    python -m bench [--quick] [--scenarios steady,sweep,closed,slow,failover,burst,mixed,journal,baselines]
                    [--duration S] [--json FILE] [--png FILE] [--profile FILE]

Prints one line per phase while running, then the table, the baseline ratios
and the verdict against the design targets and goals. ``--profile FILE``
instead runs one closed loop with the switch under cProfile and prints the
top cumulative entries. The codec micro-bench is ``python -m bench.codec``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.e2e import SCENARIOS, BenchParams, run_bench
from bench.report import format_report, machine, verdict, write_json, write_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every scenario for a fraction of a second (smoke test)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per measured phase (default 5; the journal scenario's rounds are 2 s)")
    ap.add_argument("--connections", type=int, default=None, help="terminal connections (default 8)")
    ap.add_argument("--in-flight", type=int, default=None, help="closed loop: requests in flight per connection (default 48)")
    ap.add_argument("--json", type=Path, default=None, help="write the full report as JSON")
    ap.add_argument("--png", type=Path, default=None, help="plot latency percentiles against offered load")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run one closed loop with the switch under cProfile; stats to this file")
    args = ap.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    params = BenchParams.quick() if args.quick else BenchParams()
    if args.duration is not None:
        params.duration = args.duration
        params.sweep_duration = min(params.sweep_duration, args.duration)
    if args.connections is not None:
        params.connections = args.connections
    if args.in_flight is not None:
        params.in_flight = args.in_flight
    params.profile = args.profile
    print(f"isoswitch end-to-end bench: {', '.join(scenarios) if not args.profile else 'profile'} "
          f"({params.connections} mTLS connections, {params.duration:g} s per phase)", flush=True)
    result = run_bench(params, scenarios, log=lambda s: print(s, flush=True))
    result["machine"] = machine()
    result["params"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(params).items()}
    result["command"] = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result["verdict"] = verdict(result["phases"])
    print(format_report(result), flush=True)
    if args.profile:
        import pstats

        print(f"\ncProfile of the switch process ({args.profile}), top 30 by cumulative time:")
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)
    if args.json:
        write_json(result, args.json)
        print(f"JSON report: {args.json}")
    if args.png:
        if write_png(result, args.png):
            print(f"plot: {args.png}")
        else:
            print("plot: no open-loop sweep ran; nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
