"""`isoswitch` command line: run the switch, run simulators.

    isoswitch run [--config FILE]
    isoswitch sim acquirer [...]
    isoswitch sim terminal [...]
    isoswitch keys init|rotate [--config FILE]
    isoswitch queue list [--parked] [--acquirer NAME] | requeue ID [--config FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from switch.runtime import tune_gc


def _install_loop(use_uvloop: bool) -> str:
    if use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
        except ImportError:
            pass
    return "asyncio"


async def _run(args) -> int:
    from switch.app import Switch
    from switch.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    from switch.logs import configure_logging

    configure_logging(args.log_level or cfg.switch.log_level, args.log_format or cfg.switch.log_format)
    from switch.journal import JournalError
    from switch.keys import KeyFileError

    sw = Switch(cfg)
    try:
        await sw.start()
    except (OSError, JournalError, KeyFileError) as e:
        # a port in use, an unreadable certificate, a journal file that is not a
        # journal, a bad key file: say so in one line, no traceback
        print(f"isoswitch: cannot start: {e}", file=sys.stderr)
        await sw.stop(grace=0)
        return 1
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload_bins():
        try:
            sw.reload_bin_table()
        except Exception as e:  # keep serving on the old table
            logging.getLogger("isoswitch").error("BIN table reload failed: %s", e)

    loop.add_signal_handler(signal.SIGHUP, reload_bins)
    await sw.wait_links_up(5.0)
    for lst in sw.listeners:
        mode = "mTLS" if lst.ssl_context is not None else "plain TCP"
        print(f"isoswitch: listener {lst.cfg.name} on {lst.cfg.host}:{lst.port} ({mode}, "
              f"dialect {lst.cfg.dialect}, framing {lst.cfg.framing})", flush=True)
    for name, link in sw.links.items():
        print(f"isoswitch: acquirer {name} -> {link.cfg.host}:{link.port} "
              f"({'up' if link.up else 'connecting'})", flush=True)
    if sw.api_runner is not None:
        from switch.api.server import bound_port

        print(f"isoswitch: REST API and dashboard on https://{cfg.api.host}:{bound_port(sw.api_runner)}",
              flush=True)
    if sw.listeners:
        lst = sw.listeners[0]
        extra = "" if lst.ssl_context is not None else " --no-tls"
        print("isoswitch: send a test transaction with:\n"
              f"  isoswitch sim terminal --host {lst.cfg.host} --port {lst.port} "
              f"--state-dir {cfg.switch.state_dir} --count 10{extra}", flush=True)
    await stop.wait()
    print("isoswitch: shutting down", flush=True)
    await sw.stop()
    return 0


async def _queue(args) -> int:
    """List or re-queue store-and-forward entries in the configured journal."""
    from switch.config import ConfigError, load_config
    from switch.journal import JournalError, make_journal
    from switch.keys import KeyFileError, KeyRing

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    try:
        journal = make_journal(cfg.journal, KeyRing.load(cfg.security.key_file))
        await journal.start()
    except (OSError, JournalError, KeyFileError) as e:  # one line, as `run` says it
        print(f"isoswitch: cannot open the journal: {e}", file=sys.stderr)
        return 1
    try:
        if args.queue_command == "requeue":
            ok = await journal.sf_requeue(args.id)
            print(f"entry {args.id}: {'re-queued' if ok else 'not parked (nothing done)'}")
            return 0 if ok else 1
        parked = True if args.parked else None
        entries = await journal.sf_list(parked=parked, acquirer=args.acquirer,
                                        acked=args.all and not args.parked)
        print(f"{'id':>8} {'acquirer':<16} {'kind':<9} {'state':<7} {'attempts':>8}  last error / reason")
        for e in entries:
            if e.state == "acked" and not args.all:
                continue
            why = e.parked_reason or e.last_error or ""
            print(f"{e.id:>8} {e.acquirer:<16} {e.kind:<9} {e.state:<7} {e.attempts:>8}  {why[:60]}")
        print(f"queued {await journal.sf_depth()}, parked {await journal.sf_parked_count()}")
        return 0
    finally:
        await journal.close()


def _keys(args) -> int:
    from switch.config import ConfigError, load_config
    from switch.keys import KeyFileError, init_keys, rotate_keys

    try:
        path = load_config(args.config).security.key_file
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    if args.keys_command == "init":
        if path.exists():
            print(f"{path} exists; keys are never overwritten (use 'isoswitch keys rotate')", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        init_keys(path)
        print(f"created {path} (mode 0600)")
        return 0
    try:
        kid = rotate_keys(path)
    except KeyFileError as e:  # missing, unreadable, too permissive: nothing was changed
        print(f"isoswitch: {e}", file=sys.stderr)
        return 1
    print(f"{path}: new current data key {kid}; older keys kept so existing rows stay readable")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="isoswitch", description="Low-latency ISO 8583 switch")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the switch")
    run.add_argument("--config", type=Path, default=None, help="TOML config (default: embedded defaults)")
    run.add_argument("--log-level", default=None, help="default: the config's switch.log_level")
    run.add_argument("--log-format", choices=("json", "text"), default=None,
                     help="default: the config's switch.log_format")
    sim = sub.add_parser("sim", help="simulated acquirers and terminals")
    simsub = sim.add_subparsers(dest="sim_command", required=True)
    from switch.sim.acquirer import add_acquirer_parser, run_acquirer_cli
    from switch.sim.terminal import add_terminal_parser, run_terminal_cli

    add_acquirer_parser(simsub)
    add_terminal_parser(simsub)
    keys = sub.add_parser("keys", help="card-data encryption keys (state/keys.json)")
    keysub = keys.add_subparsers(dest="keys_command", required=True)
    for name, text in (("init", "create the key file"), ("rotate", "add a new current data key")):
        kp = keysub.add_parser(name, help=text)
        kp.add_argument("--config", type=Path, default=None)
    queue = sub.add_parser("queue", help="store-and-forward entries (reversals, advices)")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    ql = qsub.add_parser("list", help="list queued and parked entries")
    ql.add_argument("--config", type=Path, default=None)
    ql.add_argument("--parked", action="store_true", help="parked entries only")
    ql.add_argument("--acquirer", default=None)
    ql.add_argument("--all", action="store_true", help="include acknowledged entries")
    qr = qsub.add_parser("requeue", help="make a parked entry due again")
    qr.add_argument("id", type=int)
    qr.add_argument("--config", type=Path, default=None)
    args = ap.parse_args(argv)
    from switch.logs import configure_logging

    # Card data is masked by the logging layer itself, whatever a caller logs.
    configure_logging((getattr(args, "log_level", None) or "info"),
                      getattr(args, "log_format", None) or "text")
    _install_loop(True)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "keys":
            return _keys(args)
        if args.command == "queue":
            return asyncio.run(_queue(args))
        if args.sim_command == "acquirer":
            return asyncio.run(run_acquirer_cli(args))
        return asyncio.run(run_terminal_cli(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
