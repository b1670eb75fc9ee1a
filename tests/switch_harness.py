"""Test harness: real acquirer simulators on 127.0.0.1, a real Switch, mTLS terminals."""
from __future__ import annotations

import asyncio
import contextlib
import textwrap
from pathlib import Path

from switch.app import Switch
from switch.config import load_config
from switch.sim.acquirer import AcquirerSimulator
from switch.sim.terminal import TerminalClient, dev_client_context


def acquirer_block(name: str, port: int, **opts) -> str:
    lines = ["[[acquirers]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}"]
    defaults = {"connections": 1, "timeout": 2.0, "reconnect_min": 0.05, "reconnect_max": 0.2,
                "echo_interval": 0}
    defaults.update(opts)
    for k, v in defaults.items():
        if isinstance(v, dict):
            continue
        lines.append(f"{k} = {_toml(v)}")
    for k, v in defaults.items():
        if isinstance(v, dict):
            lines.append(f"[acquirers.{k}]")
            lines.extend(f"{kk} = {_toml(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


@contextlib.asynccontextmanager
async def running_switch(tmp_path: Path, sims: dict[str, dict] | None = None, *,
                         acquirer_opts: dict[str, dict] | None = None, listener: dict | None = None,
                         routing: str = "", wait_up: bool = True, proxies: dict | None = None):
    """Start simulators (name -> AcquirerSimulator kwargs), then a switch routed to them
    (through ``proxies[name]``, a tests.faultproxy.FaultProxy, where given)."""
    sims = {"acq-a": {}, "acq-b": {}} if sims is None else sims
    acquirer_opts = acquirer_opts or {}
    started: dict[str, AcquirerSimulator] = {}
    for name, kw in sims.items():
        kw = dict(kw)
        kw.setdefault("latency_ms", 0.0)
        started[name] = await AcquirerSimulator(name=name, **kw).start()
    lst = {"name": "terminals", "port": 0, "terminal_timeout": 3.0}
    lst.update(listener or {})
    text = f'[switch]\nstate_dir = "{tmp_path / "state"}"\nshutdown_grace = 1.0\n'
    text += "[simulators]\nembedded = false\n"
    text += "[[listeners]]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in lst.items()) + "\n"
    proxies = proxies or {}
    for name, sim in started.items():
        opts = dict(acquirer_opts.get(name, {}))
        if "dialect" not in opts and sims[name].get("dialect"):
            opts["dialect"] = sims[name]["dialect"]
        port = sim.port
        if name in proxies:
            port = (await proxies[name].start(sim.port)).port
        text += acquirer_block(name, port, **opts)
    text += textwrap.dedent(routing)
    cfg_path = tmp_path / "isoswitch.toml"
    cfg_path.write_text(text)
    sw = Switch(load_config(cfg_path))
    await sw.start()
    try:
        if wait_up:
            await sw.wait_links_up(5.0)
        sw.sims = started
        yield sw
    finally:
        await sw.stop(grace=0.5)
        for proxy in proxies.values():
            await proxy.stop()
        for sim in started.values():
            await sim.stop()


def terminal(sw: Switch, tmp_path: Path, terminal_id: str = "TERM0001", **kw) -> TerminalClient:
    lst = sw.listeners[0]
    ssl = dev_client_context(tmp_path / "state", terminal_id) if lst.ssl_context is not None else None
    return TerminalClient("127.0.0.1", lst.port, ssl=ssl, terminal_id=terminal_id,
                          dialect=lst.cfg.dialect, framing=lst.cfg.framing, **kw)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))
