# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Acquirer health (circuit breaker) and failover order, Cython implementation
(twin: ``core._health_py``, whose module docstring is the reference).

States are a C enum; counters and EWMAs are C fields of a cdef class. The
EWMA step goes through ``_ewma_step``, which stores the product in a
volatile double before the add: C compilers may otherwise fuse
``s + a * (x - s)`` into one FMA instruction (the default on aarch64), and
the result would no longer match Python's float arithmetic bit for bit.
"""
from libc.math cimport INFINITY

cdef extern from *:
    """
    static double isoswitch_ewma_step(double s, double alpha, double x) {
        volatile double p = alpha * (x - s);
        return s + p;
    }
    """
    double isoswitch_ewma_step(double s, double alpha, double x) nogil

cdef enum BreakerState:
    ST_CLOSED = 0
    ST_OPEN = 1
    ST_HALF_OPEN = 2

CLOSED = ST_CLOSED
OPEN = ST_OPEN
HALF_OPEN = ST_HALF_OPEN
STATE_NAMES = ("CLOSED", "OPEN", "HALF_OPEN")
FAILURE_KINDS = ("connect", "timeout", "try_elsewhere", "write")

__all__ = [
    "AcquirerHealth", "CircuitBreaker", "order_candidates", "CLOSED", "OPEN",
    "HALF_OPEN", "STATE_NAMES", "FAILURE_KINDS",
]


cdef double _real(object value, str what) except? -1.0:
    cdef double v
    if type(value) is float:
        v = <double>value
    elif isinstance(value, (int, float)):
        v = float(value)
    else:
        raise TypeError(f"{what} must be a real number, not {type(value).__name__}")
    if v != v:
        raise ValueError(f"{what} must not be NaN")
    return v


cdef int _count(object value, str what) except -1:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1")
    if value > 0x7FFFFFFF:
        raise ValueError(f"{what} must be <= 2147483647")
    return <int>value


cdef class AcquirerHealth:
    """Circuit breaker and EWMA health of one acquirer (see module docstring).

    ``AcquirerHealth(name, failure_threshold=5, open_seconds=10.0,
    half_open_max=1, ewma_alpha=0.2)``
    """

    cdef readonly str name
    cdef readonly int failure_threshold
    cdef readonly double open_seconds
    cdef readonly int half_open_max
    cdef readonly double ewma_alpha
    cdef BreakerState _state
    cdef readonly long long consecutive_failures
    cdef double _open_until
    cdef int _trials
    cdef readonly double ewma_success
    cdef readonly double ewma_latency
    cdef bint _has_latency
    cdef readonly long long success_count
    cdef long long _fail_connect
    cdef long long _fail_timeout
    cdef long long _fail_try_elsewhere
    cdef long long _fail_write

    def __init__(self, name, failure_threshold=5, open_seconds=10.0,
                 half_open_max=1, ewma_alpha=0.2):
        cdef double v
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self.name = name
        self.failure_threshold = _count(failure_threshold, "failure_threshold")
        v = _real(open_seconds, "open_seconds")
        if not (0.0 <= v < INFINITY):
            raise ValueError("open_seconds must be finite and >= 0")
        self.open_seconds = v
        self.half_open_max = _count(half_open_max, "half_open_max")
        v = _real(ewma_alpha, "ewma_alpha")
        if not (0.0 < v <= 1.0):
            raise ValueError("ewma_alpha must be in (0, 1]")
        self.ewma_alpha = v
        self._state = ST_CLOSED
        self.consecutive_failures = 0
        self._open_until = 0.0
        self._trials = 0
        self.ewma_success = 1.0
        self.ewma_latency = 0.0
        self._has_latency = False
        self.success_count = 0
        self._fail_connect = 0
        self._fail_timeout = 0
        self._fail_try_elsewhere = 0
        self._fail_write = 0

    @property
    def state(self):
        """CLOSED, OPEN or HALF_OPEN (int) as of the last call"""
        return <int>self._state

    @property
    def state_name(self):
        return STATE_NAMES[<int>self._state]

    @property
    def half_open_trials(self):
        """trial slots in use while HALF_OPEN"""
        return self._trials

    @property
    def retry_at(self):
        """When an OPEN breaker becomes due for a trial, else None."""
        return self._open_until if self._state == ST_OPEN else None

    @property
    def failure_counts(self):
        return {
            "connect": self._fail_connect,
            "timeout": self._fail_timeout,
            "try_elsewhere": self._fail_try_elsewhere,
            "write": self._fail_write,
        }

    # -- transitions -------------------------------------------------------
    cdef inline void _advance(self, double now) noexcept:
        if self._state == ST_OPEN and now >= self._open_until:
            self._state = ST_HALF_OPEN
            self._trials = 0

    cdef inline void _open(self, double now) noexcept:
        self._state = ST_OPEN
        self._open_until = now + self.open_seconds
        self._trials = 0

    cdef inline bint _can_request(self, double now) noexcept:
        self._advance(now)
        if self._state == ST_CLOSED:
            return True
        if self._state == ST_HALF_OPEN:
            return self._trials < self.half_open_max
        return False

    def advance(self, now):
        """Apply the OPEN -> HALF_OPEN timer at ``now``; return the state."""
        self._advance(_real(now, "now"))
        return <int>self._state

    def can_request(self, now):
        """Would ``allow_request(now)`` say yes? Reserves nothing."""
        return self._can_request(_real(now, "now"))

    def allow_request(self, now):
        """May a request go to this acquirer now? In HALF_OPEN a yes reserves
        one of ``half_open_max`` trial slots until the outcome is recorded."""
        self._advance(_real(now, "now"))
        if self._state == ST_CLOSED:
            return True
        if self._state == ST_HALF_OPEN and self._trials < self.half_open_max:
            self._trials += 1
            return True
        return False

    def release(self, now):
        """Give back a trial slot ``allow_request(now)`` reserved for a request
        that never went out for a reason that says nothing about the acquirer
        (see the twin's docstring)."""
        self._advance(_real(now, "now"))
        if self._state == ST_HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def record_success(self, latency_s, now):
        cdef double lat = _real(latency_s, "latency_s")
        if not (0.0 <= lat < INFINITY):
            raise ValueError("latency_s must be finite and >= 0")
        self._advance(_real(now, "now"))
        self.ewma_success = isoswitch_ewma_step(self.ewma_success, self.ewma_alpha, 1.0)
        if self._has_latency:
            self.ewma_latency = isoswitch_ewma_step(self.ewma_latency, self.ewma_alpha, lat)
        else:
            self.ewma_latency = lat
            self._has_latency = True
        self.success_count += 1
        self.consecutive_failures = 0
        if self._state == ST_HALF_OPEN:
            self._state = ST_CLOSED
            self._trials = 0

    def record_failure(self, kind, now):
        cdef int k
        if kind == "connect":
            k = 0
        elif kind == "timeout":
            k = 1
        elif kind == "try_elsewhere":
            k = 2
        elif kind == "write":
            k = 3
        else:
            raise ValueError(
                f"unknown failure kind {kind!r}; expected one of " + ", ".join(FAILURE_KINDS)
            )
        cdef double t = _real(now, "now")
        if k == 0:
            self._fail_connect += 1
        elif k == 1:
            self._fail_timeout += 1
        elif k == 2:
            self._fail_try_elsewhere += 1
        else:
            self._fail_write += 1
        self._advance(t)
        self.ewma_success = isoswitch_ewma_step(self.ewma_success, self.ewma_alpha, 0.0)
        self.consecutive_failures += 1
        if self._state == ST_HALF_OPEN:
            self._open(t)
        elif self._state == ST_CLOSED and self.consecutive_failures >= self.failure_threshold:
            self._open(t)

    def __repr__(self):
        return (
            f"<AcquirerHealth {self.name!r} {STATE_NAMES[<int>self._state]} "
            f"success={self.ewma_success:.3f} latency={self.ewma_latency:.3f}s>"
        )


CircuitBreaker = AcquirerHealth


cdef inline bint _before(AcquirerHealth a, Py_ssize_t ia, AcquirerHealth b, Py_ssize_t ib) noexcept:
    # health order: higher ewma_success, then lower ewma_latency, then position
    if a.ewma_success != b.ewma_success:
        return a.ewma_success > b.ewma_success
    if a.ewma_latency != b.ewma_latency:
        return a.ewma_latency < b.ewma_latency
    return ia < ib


cdef void _sort_by_health(list cands, Py_ssize_t* idx, Py_ssize_t n):
    # insertion sort: candidate lists are a handful of acquirers
    cdef Py_ssize_t i, j, cur
    for i in range(1, n):
        cur = idx[i]
        j = i - 1
        while j >= 0 and _before(<AcquirerHealth>cands[cur], cur,
                                 <AcquirerHealth>cands[idx[j]], idx[j]):
            idx[j + 1] = idx[j]
            j -= 1
        idx[j + 1] = cur


def order_candidates(candidates, now, weights=None, rnd=0.0):
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
    cdef double t = _real(now, "now")
    cdef double r = _real(rnd, "rnd")
    cdef double x, total, target, acc
    cdef Py_ssize_t count, i, nclosed = 0, nhalf = 0, first = -1, k
    cdef list cands
    cdef list w = None
    cdef AcquirerHealth c
    cdef Py_ssize_t[16] small
    cdef Py_ssize_t* closed
    cdef Py_ssize_t* half
    cdef object buf = None
    if not (0.0 <= r < 1.0):
        raise ValueError("rnd must be in [0, 1)")
    count = len(candidates)
    if weights is not None:
        if len(weights) != count:
            raise ValueError(
                f"weights has {len(weights)} entries for {count} candidates"
            )
        w = []
        for item in weights:
            x = _real(item, "weight")
            if not (0.0 <= x < INFINITY):
                raise ValueError("weights must be finite and >= 0")
            w.append(x)
    cands = list(candidates)
    for item in cands:
        if not isinstance(item, AcquirerHealth):
            raise TypeError(
                f"candidates must be AcquirerHealth, not {type(item).__name__}"
            )
    if 2 * count <= 16:
        closed = small
    else:
        buf = bytearray(2 * count * sizeof(Py_ssize_t))
        closed = <Py_ssize_t*><char*>buf
    half = closed + count
    for i in range(count):
        c = <AcquirerHealth>cands[i]
        if c._can_request(t):
            if c._state == ST_CLOSED:
                closed[nclosed] = i
                nclosed += 1
            else:
                half[nhalf] = i
                nhalf += 1

    total = 0.0
    for k in range(nclosed):
        total += <double>w[closed[k]] if w is not None else 1.0
    if total > 0.0:
        target = r * total
        acc = 0.0
        for k in range(nclosed):
            x = <double>w[closed[k]] if w is not None else 1.0
            if x > 0.0:
                acc += x
                first = closed[k]
                if target < acc:
                    break

    out = []
    if first >= 0:
        out.append(cands[first])
        # drop the drawn one from tier 1, keeping the others' order
        k = 0
        for i in range(nclosed):
            if closed[i] != first:
                closed[k] = closed[i]
                k += 1
        nclosed = k
    _sort_by_health(cands, closed, nclosed)
    _sort_by_health(cands, half, nhalf)
    for k in range(nclosed):
        out.append(cands[closed[k]])
    for k in range(nhalf):
        out.append(cands[half[k]])
    return out
