"""Acquirer health (circuit breaker) and failover order, pure-Python twin of
``core._health``.

Link-level up/down is the engine's business; this module is the breaker and
the ordering math only. All time comes from the ``now`` argument (monotonic
seconds), so behaviour is a pure function of the calls made: no clock is read.

Breaker states
    CLOSED (0)     requests flow; each failure increments a consecutive-failure
                   count, each success resets it. ``failure_threshold``
                   consecutive failures open the breaker.
    OPEN (1)       no requests until ``open_seconds`` after it opened.
    HALF_OPEN (2)  up to ``half_open_max`` trial requests, each reserved by
                   ``allow_request(now)``. A success closes the breaker; a
                   failure opens it again with a fresh timer; ``release(now)``
                   gives back the slot of a trial that never went out for a
                   reason that is not the acquirer's.

    OPEN becomes HALF_OPEN lazily: every method that takes ``now`` first
    applies ``advance(now)``, which moves an OPEN breaker whose timer ran out
    to HALF_OPEN with no trial slots in use.

    Outcomes of requests sent before the breaker opened may arrive while it
    is OPEN: a failure then does not restart the timer (late timeouts must
    not keep an acquirer out forever) and a success does not close it; both
    still feed the EWMAs and counters.

Failure kinds
    "connect", "timeout", "try_elsewhere", "write": all count as failures;
    per-kind totals are kept for metrics (``failure_counts``).

EWMAs
    ``ewma_success`` starts at 1.0 and moves by ``ewma_alpha`` toward 1.0 on
    a success and 0.0 on a failure: ``s = s + alpha * (x - s)``.
    ``ewma_latency`` (seconds) is updated on successes only; it is 0.0 until
    the first success, which sets it to that latency directly. The Cython
    twin evaluates the same expression in the same order, with the product
    rounded to double before the add (no fused multiply-add), so both give
    bit-identical floats.
"""
from __future__ import annotations

import math

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
STATE_NAMES = ("CLOSED", "OPEN", "HALF_OPEN")
FAILURE_KINDS = ("connect", "timeout", "try_elsewhere", "write")


def _real(value, what: str) -> float:
    """``value`` as a float; ints and floats only, never NaN."""
    if type(value) is not float:
        if not isinstance(value, (int, float)):
            raise TypeError(f"{what} must be a real number, not {type(value).__name__}")
        value = float(value)
    if value != value:
        raise ValueError(f"{what} must not be NaN")
    return value


def _count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1")
    if value > 0x7FFFFFFF:
        raise ValueError(f"{what} must be <= 2147483647")
    return int(value)


class AcquirerHealth:
    """Circuit breaker and EWMA health of one acquirer (see module docstring).

    ``AcquirerHealth(name, failure_threshold=5, open_seconds=10.0,
    half_open_max=1, ewma_alpha=0.2)``
    """

    __slots__ = (
        "_name", "_failure_threshold", "_open_seconds", "_half_open_max",
        "_ewma_alpha", "_state", "_consecutive_failures", "_open_until",
        "_trials", "_ewma_success", "_ewma_latency", "_has_latency",
        "_successes", "_fail_connect", "_fail_timeout", "_fail_try_elsewhere",
        "_fail_write",
    )

    def __init__(self, name, failure_threshold=5, open_seconds=10.0,
                 half_open_max=1, ewma_alpha=0.2):
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self._name = name
        self._failure_threshold = _count(failure_threshold, "failure_threshold")
        open_seconds = _real(open_seconds, "open_seconds")
        if not (0.0 <= open_seconds < math.inf):
            raise ValueError("open_seconds must be finite and >= 0")
        self._open_seconds = open_seconds
        self._half_open_max = _count(half_open_max, "half_open_max")
        ewma_alpha = _real(ewma_alpha, "ewma_alpha")
        if not (0.0 < ewma_alpha <= 1.0):
            raise ValueError("ewma_alpha must be in (0, 1]")
        self._ewma_alpha = ewma_alpha
        self._state = CLOSED
        self._consecutive_failures = 0
        self._open_until = 0.0
        self._trials = 0
        self._ewma_success = 1.0
        self._ewma_latency = 0.0
        self._has_latency = False
        self._successes = 0
        self._fail_connect = 0
        self._fail_timeout = 0
        self._fail_try_elsewhere = 0
        self._fail_write = 0

    # -- read-only view ----------------------------------------------------
    name = property(lambda self: self._name)
    failure_threshold = property(lambda self: self._failure_threshold)
    open_seconds = property(lambda self: self._open_seconds)
    half_open_max = property(lambda self: self._half_open_max)
    ewma_alpha = property(lambda self: self._ewma_alpha)
    state = property(lambda self: self._state, doc="CLOSED, OPEN or HALF_OPEN (int) as of the last call")
    consecutive_failures = property(lambda self: self._consecutive_failures)
    half_open_trials = property(lambda self: self._trials, doc="trial slots in use while HALF_OPEN")
    ewma_success = property(lambda self: self._ewma_success)
    ewma_latency = property(lambda self: self._ewma_latency)
    success_count = property(lambda self: self._successes)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self._state]

    @property
    def retry_at(self):
        """When an OPEN breaker becomes due for a trial, else None."""
        return self._open_until if self._state == OPEN else None

    @property
    def failure_counts(self) -> dict:
        return {
            "connect": self._fail_connect,
            "timeout": self._fail_timeout,
            "try_elsewhere": self._fail_try_elsewhere,
            "write": self._fail_write,
        }

    # -- transitions -------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self._state == OPEN and now >= self._open_until:
            self._state = HALF_OPEN
            self._trials = 0

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._open_until = now + self._open_seconds
        self._trials = 0

    def advance(self, now) -> int:
        """Apply the OPEN -> HALF_OPEN timer at ``now``; return the state."""
        self._advance(_real(now, "now"))
        return self._state

    def can_request(self, now) -> bool:
        """Would ``allow_request(now)`` say yes? Reserves nothing."""
        self._advance(_real(now, "now"))
        if self._state == CLOSED:
            return True
        if self._state == HALF_OPEN:
            return self._trials < self._half_open_max
        return False

    def allow_request(self, now) -> bool:
        """May a request go to this acquirer now? In HALF_OPEN a yes reserves
        one of ``half_open_max`` trial slots until the outcome is recorded."""
        self._advance(_real(now, "now"))
        if self._state == CLOSED:
            return True
        if self._state == HALF_OPEN and self._trials < self._half_open_max:
            self._trials += 1
            return True
        return False

    def release(self, now) -> None:
        """Give back a trial slot ``allow_request(now)`` reserved for a request
        that never went out for a reason that says nothing about the acquirer
        (a retransmission the journal already holds, a journal failure).
        Without it the slot stays taken: with no outcome ever recorded, a
        HALF_OPEN breaker would refuse every request from then on. Records
        nothing; does nothing outside HALF_OPEN or with no slot in use."""
        self._advance(_real(now, "now"))
        if self._state == HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def record_success(self, latency_s, now) -> None:
        latency_s = _real(latency_s, "latency_s")
        if not (0.0 <= latency_s < math.inf):
            raise ValueError("latency_s must be finite and >= 0")
        self._advance(_real(now, "now"))
        alpha = self._ewma_alpha
        self._ewma_success = self._ewma_success + alpha * (1.0 - self._ewma_success)
        if self._has_latency:
            self._ewma_latency = self._ewma_latency + alpha * (latency_s - self._ewma_latency)
        else:
            self._ewma_latency = latency_s
            self._has_latency = True
        self._successes += 1
        self._consecutive_failures = 0
        if self._state == HALF_OPEN:
            self._state = CLOSED
            self._trials = 0

    def record_failure(self, kind, now) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(
                f"unknown failure kind {kind!r}; expected one of " + ", ".join(FAILURE_KINDS)
            )
        now = _real(now, "now")
        if kind == "connect":
            self._fail_connect += 1
        elif kind == "timeout":
            self._fail_timeout += 1
        elif kind == "try_elsewhere":
            self._fail_try_elsewhere += 1
        else:
            self._fail_write += 1
        self._advance(now)
        alpha = self._ewma_alpha
        self._ewma_success = self._ewma_success + alpha * (0.0 - self._ewma_success)
        self._consecutive_failures += 1
        if self._state == HALF_OPEN:
            self._open(now)
        elif self._state == CLOSED and self._consecutive_failures >= self._failure_threshold:
            self._open(now)

    def __repr__(self) -> str:
        return (
            f"<AcquirerHealth {self._name!r} {STATE_NAMES[self._state]} "
            f"success={self._ewma_success:.3f} latency={self._ewma_latency:.3f}s>"
        )


CircuitBreaker = AcquirerHealth


def order_candidates(candidates, now, weights=None, rnd=0.0) -> list:
    """Candidates that may take a request at ``now``, in the order to try them.

    1. Eligibility: ``can_request(now)`` (CLOSED, or HALF_OPEN with a free
       trial slot). OPEN candidates not yet due are left out. Nothing is
       reserved: call ``allow_request(now)`` on a candidate just before
       sending to it (that reserves a half-open trial slot) and move on to the
       next one if it says no.
    2. Tier 1, all CLOSED candidates, before tier 2, the HALF_OPEN ones.
    3. First place in tier 1 is drawn by weight: with ``total`` the sum of
       the tier-1 weights (summed in candidate order), the first candidate
       whose running sum exceeds ``rnd * total`` goes first, so over uniform
       ``rnd`` in [0, 1) traffic splits in proportion to the weights.
       ``weights=None`` means equal weights; weight 0 never goes first but
       stays available for failover; if all tier-1 weights are 0 no draw is
       made.
    4. The rest of tier 1, and all of tier 2, by ``ewma_success`` (higher
       first), then ``ewma_latency`` (lower first), then position in
       ``candidates``.

    ``weights`` must have one finite weight >= 0 per candidate; ``rnd`` must
    be in [0, 1).
    """
    now = _real(now, "now")
    rnd = _real(rnd, "rnd")
    if not (0.0 <= rnd < 1.0):
        raise ValueError("rnd must be in [0, 1)")
    count = len(candidates)
    if weights is None:
        w = [1.0] * count
    else:
        if len(weights) != count:
            raise ValueError(
                f"weights has {len(weights)} entries for {count} candidates"
            )
        w = []
        for x in weights:
            x = _real(x, "weight")
            if not (0.0 <= x < math.inf):
                raise ValueError("weights must be finite and >= 0")
            w.append(x)
    for c in candidates:
        if not isinstance(c, AcquirerHealth):
            raise TypeError(
                f"candidates must be AcquirerHealth, not {type(c).__name__}"
            )
    closed = []
    half = []
    for i, c in enumerate(candidates):
        if c.can_request(now):
            (closed if c._state == CLOSED else half).append(i)

    first = -1
    total = 0.0
    for i in closed:
        total += w[i]
    if total > 0.0:
        target = rnd * total
        acc = 0.0
        for i in closed:
            if w[i] > 0.0:
                acc += w[i]
                first = i
                if target < acc:
                    break
        # if rounding left target >= acc, the last weighted candidate wins

    def key(i):
        c = candidates[i]
        return (-c._ewma_success, c._ewma_latency, i)

    out = [candidates[first]] if first >= 0 else []
    out.extend(candidates[i] for i in sorted((i for i in closed if i != first), key=key))
    out.extend(candidates[i] for i in sorted(half, key=key))
    return out
