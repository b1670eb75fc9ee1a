"""Acquirer health: circuit breaker and failover order (public selector).

See core/_health_py.py for the breaker rules and the exact candidate order;
the Cython extension core._health behaves identically, to the last bit of
every EWMA.
"""
from core import _select

_impl = _select.load("health")
IMPLEMENTATION = _select.implementation(_impl)

AcquirerHealth = _impl.AcquirerHealth
CircuitBreaker = _impl.CircuitBreaker
order_candidates = _impl.order_candidates
CLOSED = _impl.CLOSED
OPEN = _impl.OPEN
HALF_OPEN = _impl.HALF_OPEN
STATE_NAMES = _impl.STATE_NAMES
FAILURE_KINDS = _impl.FAILURE_KINDS

__all__ = [
    "IMPLEMENTATION",
    "AcquirerHealth",
    "CircuitBreaker",
    "order_candidates",
    "CLOSED",
    "OPEN",
    "HALF_OPEN",
    "STATE_NAMES",
    "FAILURE_KINDS",
]
