"""Simulators: an acquirer host and PoS terminals speaking ISO 8583 over TCP/TLS.

* :mod:`switch.sim.acquirer` - :class:`AcquirerSimulator`, an asyncio server
  that answers authorisations, financial requests, reversals, advices and
  network management with configurable latency, response-code rules and
  faults (drop, delay, close, refuse, forced code). Used embedded by the
  switch, by the integration tests and by the bench.
* :mod:`switch.sim.terminal` - :class:`TerminalClient` (pipelined requests
  matched by terminal id and STAN), :func:`make_purchase` and
  :func:`run_terminals`, the load-driver building block.

Both speak the same wire protocol as the switch's terminal listener in the
same dialect, so a terminal can talk to a simulator directly.
"""
import importlib

# Names resolve lazily (PEP 562) so ``python -m switch.sim.acquirer`` does not
# import the module twice.
_EXPORTS = {
    "AcquirerSimulator": "acquirer",
    "Fault": "acquirer",
    "LatencyModel": "acquirer",
    "Rule": "acquirer",
    "add_acquirer_parser": "acquirer",
    "run_acquirer_cli": "acquirer",
    "StanCounter": "terminal",
    "Summary": "terminal",
    "TerminalClient": "terminal",
    "add_terminal_parser": "terminal",
    "make_echo": "terminal",
    "make_purchase": "terminal",
    "make_reversal": "terminal",
    "run_terminal_cli": "terminal",
    "run_terminals": "terminal",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AcquirerSimulator",
    "Fault",
    "LatencyModel",
    "Rule",
    "StanCounter",
    "Summary",
    "TerminalClient",
    "add_acquirer_parser",
    "add_terminal_parser",
    "make_echo",
    "make_purchase",
    "make_reversal",
    "run_acquirer_cli",
    "run_terminal_cli",
    "run_terminals",
]
