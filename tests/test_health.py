"""Acquirer circuit breaker and failover order: transitions, weights, parity."""
import pytest
from hypothesis import given, settings, strategies as st

from core import health
from tests.conftest import _impls

IMPLS = _impls("health")


@pytest.mark.parametrize("impl", IMPLS)
def test_opens_after_threshold_consecutive_failures(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=3, open_seconds=10.0)
    assert (h.state, h.state_name) == (impl.CLOSED, "CLOSED")
    h.record_failure("timeout", 1.0)
    h.record_failure("connect", 2.0)
    h.record_success(0.1, 3.0)  # resets the consecutive count
    h.record_failure("write", 4.0)
    h.record_failure("try_elsewhere", 5.0)
    assert h.state == impl.CLOSED and h.consecutive_failures == 2
    h.record_failure("timeout", 6.0)
    assert (h.state, h.state_name, h.retry_at) == (impl.OPEN, "OPEN", 16.0)
    assert h.failure_counts == {"connect": 1, "timeout": 2, "try_elsewhere": 1, "write": 1}
    assert h.success_count == 1
    assert not h.allow_request(15.999)
    assert h.state == impl.OPEN


@pytest.mark.parametrize("impl", IMPLS)
def test_half_open_trial_limit_and_close(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=1, open_seconds=5.0, half_open_max=2)
    h.record_failure("connect", 0.0)
    assert h.state == impl.OPEN
    assert h.advance(4.9) == impl.OPEN
    assert h.can_request(5.0)  # reserves nothing
    assert h.state_name == "HALF_OPEN" and h.half_open_trials == 0
    assert h.allow_request(5.0)
    assert h.allow_request(5.1)
    assert h.half_open_trials == 2
    assert not h.allow_request(5.2)
    assert not h.can_request(5.2)
    h.record_success(0.05, 5.3)
    assert h.state == impl.CLOSED and h.half_open_trials == 0
    assert h.allow_request(5.4) and h.allow_request(5.4) and h.allow_request(5.4)
    assert h.retry_at is None


@pytest.mark.parametrize("impl", IMPLS)
def test_release_gives_back_a_trial_slot_and_records_nothing(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=1, open_seconds=5.0, half_open_max=1)
    h.release(0.0)  # CLOSED: nothing to give back
    assert h.state == impl.CLOSED and h.half_open_trials == 0
    h.record_failure("timeout", 0.0)
    h.release(1.0)  # OPEN, not due: nothing
    assert h.state == impl.OPEN and h.retry_at == 5.0
    assert h.allow_request(5.0) and not h.allow_request(5.0)
    before = (h.consecutive_failures, h.ewma_success, h.success_count, h.failure_counts)
    h.release(5.1)  # the trial never went out (not the acquirer's doing)
    assert (h.state, h.half_open_trials) == (impl.HALF_OPEN, 0)
    assert (h.consecutive_failures, h.ewma_success, h.success_count, h.failure_counts) == before
    h.release(5.2)  # never below zero
    assert h.half_open_trials == 0
    assert h.allow_request(5.3) and h.half_open_trials == 1
    h.record_success(0.1, 5.4)
    assert h.state == impl.CLOSED


@pytest.mark.parametrize("impl", IMPLS)
def test_half_open_failure_reopens_with_fresh_timer(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=2, open_seconds=10.0)
    h.record_failure("timeout", 0.0)
    h.record_failure("timeout", 1.0)
    assert h.retry_at == 11.0
    assert h.allow_request(11.0) and h.state == impl.HALF_OPEN
    h.record_failure("timeout", 12.5)  # one failure is enough in HALF_OPEN
    assert (h.state, h.retry_at) == (impl.OPEN, 22.5)
    assert not h.allow_request(22.4)
    assert h.allow_request(22.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_late_outcomes_while_open_do_not_move_the_timer(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=1, open_seconds=10.0)
    h.record_failure("timeout", 0.0)
    h.record_failure("timeout", 3.0)
    assert h.retry_at == 10.0
    h.record_success(0.2, 4.0)
    assert h.state == impl.OPEN and h.retry_at == 10.0
    h.record_success(0.2, 10.0)  # due: HALF_OPEN first, then the success closes
    assert h.state == impl.CLOSED


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_open_seconds_is_due_immediately(impl):
    h = impl.AcquirerHealth("acq", failure_threshold=1, open_seconds=0)
    h.record_failure("connect", 7.0)
    assert h.state == impl.OPEN
    assert h.allow_request(7.0) and h.state == impl.HALF_OPEN


@pytest.mark.parametrize("impl", IMPLS)
def test_ewma_values(impl):
    h = impl.AcquirerHealth("acq", ewma_alpha=0.5)
    assert (h.ewma_success, h.ewma_latency) == (1.0, 0.0)
    h.record_success(0.4, 0.0)
    assert (h.ewma_success, h.ewma_latency) == (1.0, 0.4)  # first sample taken as is
    h.record_failure("timeout", 1.0)
    assert h.ewma_success == 0.5
    h.record_success(0.2, 2.0)
    assert h.ewma_success == 0.75
    assert h.ewma_latency == 0.4 + 0.5 * (0.2 - 0.4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"failure_threshold": 0}, ValueError, "failure_threshold must be >= 1"),
    ({"failure_threshold": 2.0}, TypeError, "failure_threshold must be an int, not float"),
    ({"half_open_max": 0}, ValueError, "half_open_max must be >= 1"),
    ({"open_seconds": -1}, ValueError, "open_seconds must be finite and >= 0"),
    ({"open_seconds": float("inf")}, ValueError, "open_seconds must be finite and >= 0"),
    ({"open_seconds": "10"}, TypeError, "open_seconds must be a real number, not str"),
    ({"ewma_alpha": 0.0}, ValueError, "ewma_alpha must be in (0, 1]"),
    ({"ewma_alpha": float("nan")}, ValueError, "ewma_alpha must not be NaN"),
])
def test_constructor_validation(impl, kwargs, exc, msg):
    with pytest.raises(exc) as ei:
        impl.AcquirerHealth("acq", **kwargs)
    assert str(ei.value) == msg


@pytest.mark.parametrize("impl", IMPLS)
def test_event_validation(impl):
    h = impl.AcquirerHealth("acq")
    with pytest.raises(ValueError, match="unknown failure kind 'decline'"):
        h.record_failure("decline", 1.0)
    with pytest.raises(ValueError, match="now must not be NaN"):
        h.record_failure("timeout", float("nan"))
    with pytest.raises(ValueError, match="latency_s must be finite and >= 0"):
        h.record_success(-0.1, 1.0)
    with pytest.raises(TypeError, match="now must be a real number, not NoneType"):
        h.allow_request(None)
    # rejected events change nothing
    assert h.failure_counts == {"connect": 0, "timeout": 0, "try_elsewhere": 0, "write": 0}
    assert (h.ewma_success, h.consecutive_failures, h.success_count) == (1.0, 0, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_read_only_attributes(impl):
    h = impl.AcquirerHealth("acq")
    for attr in ("state", "ewma_success", "name", "consecutive_failures"):
        with pytest.raises(AttributeError):
            setattr(h, attr, 0)
    assert impl.CircuitBreaker is impl.AcquirerHealth
    assert repr(h) == "<AcquirerHealth 'acq' CLOSED success=1.000 latency=0.000s>"


# -- order_candidates -------------------------------------------------------------


def names(hs):
    return [h.name for h in hs]


@pytest.mark.parametrize("impl", IMPLS)
def test_order_excludes_open_and_puts_half_open_last(impl):
    a, b, c, d = (impl.AcquirerHealth(n, failure_threshold=1, open_seconds=10.0) for n in "abcd")
    a.record_failure("connect", 0.0)  # OPEN until 10
    b.record_failure("connect", 0.0)
    b.allow_request(10.0)  # HALF_OPEN, its only trial slot taken
    c.record_failure("connect", 5.0)  # due at 15
    assert names(impl.order_candidates([a, b, c, d], 9.0, None, 0.99)) == ["d"]
    assert names(impl.order_candidates([a, b, c, d], 15.0, None, 0.0)) == ["d", "a", "c"]
    assert impl.order_candidates([], 0.0, None, 0.5) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_order_rest_by_success_then_latency_then_position(impl):
    a, b, c, d = (impl.AcquirerHealth(n, ewma_alpha=0.5) for n in "abcd")
    a.record_success(0.3, 0.0)
    b.record_success(0.1, 0.0)
    c.record_success(0.1, 0.0)
    d.record_failure("timeout", 0.0)
    # weight only on d: d goes first, then health order
    assert names(impl.order_candidates([a, b, c, d], 1.0, [0, 0, 0, 1], 0.3)) == ["d", "b", "c", "a"]
    # all weights zero: no draw, pure health order
    assert names(impl.order_candidates([a, b, c, d], 1.0, [0, 0, 0, 0], 0.3)) == ["b", "c", "a", "d"]


@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_first_choice_proportions(impl):
    hs = [impl.AcquirerHealth(n) for n in "abc"]
    weights = [5.0, 3.0, 2.0]
    counts = {"a": 0, "b": 0, "c": 0}
    n = 10000
    for i in range(n):
        counts[impl.order_candidates(hs, 0.0, weights, (i + 0.5) / n)[0].name] += 1
    assert counts == {"a": 5000, "b": 3000, "c": 2000}  # rnd evenly spread: exact split
    import random

    rng = random.Random(1)
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(n):
        counts[impl.order_candidates(hs, 0.0, weights, rng.random())[0].name] += 1
    for name, w in zip("abc", weights):
        assert abs(counts[name] / n - w / 10.0) < 0.02


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_of_excluded_candidates_do_not_count(impl):
    a, b, c = (impl.AcquirerHealth(n, failure_threshold=1) for n in "abc")
    a.record_failure("connect", 0.0)  # OPEN: its weight leaves the draw
    got = [impl.order_candidates([a, b, c], 1.0, [8, 1, 1], r / 100)[0].name for r in range(100)]
    assert got.count("b") == 50 and got.count("c") == 50


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args,exc,msg", [
    ((0.0, [1.0], 0.5), ValueError, "weights has 1 entries for 2 candidates"),
    ((0.0, [1.0, -1.0], 0.5), ValueError, "weights must be finite and >= 0"),
    ((0.0, None, 1.0), ValueError, "rnd must be in [0, 1)"),
    ((0.0, None, -0.1), ValueError, "rnd must be in [0, 1)"),
    ((0.0, [1.0, "x"], 0.5), TypeError, "weight must be a real number, not str"),
])
def test_order_validation(impl, args, exc, msg):
    hs = [impl.AcquirerHealth("a"), impl.AcquirerHealth("b")]
    with pytest.raises(exc) as ei:
        impl.order_candidates(hs, *args)
    assert str(ei.value) == msg
    with pytest.raises(TypeError, match="candidates must be AcquirerHealth, not str"):
        impl.order_candidates(["x"], 0.0, None, 0.0)


def test_many_candidates():
    # more than the Cython fast path's fixed buffer
    for m in [p.values[0] for p in IMPLS]:
        hs = [m.AcquirerHealth(str(i)) for i in range(40)]
        assert names(m.order_candidates(hs, 0.0, None, 0.5)) == ["20"] + [str(i) for i in range(40) if i != 20]


def test_public_module():
    assert health.IMPLEMENTATION in ("cython", "python")
    h = health.AcquirerHealth("x")
    assert health.order_candidates([h], 0.0) == [h]
    assert (health.CLOSED, health.OPEN, health.HALF_OPEN) == (0, 1, 2)


# -- differential: identical states and bit-identical floats ----------------------

event = st.one_of(
    st.tuples(st.just("success"), st.floats(0, 30, allow_nan=False), st.floats(0, 5, allow_nan=False)),
    st.tuples(st.just("failure"), st.sampled_from(["connect", "timeout", "try_elsewhere", "write"]),
              st.floats(0, 5, allow_nan=False)),
    st.tuples(st.just("allow"), st.none(), st.floats(0, 5, allow_nan=False)),
    st.tuples(st.just("can"), st.none(), st.floats(0, 5, allow_nan=False)),
    st.tuples(st.just("release"), st.none(), st.floats(0, 5, allow_nan=False)),
)


def snapshot(h):
    return (h.state, h.state_name, h.consecutive_failures, h.half_open_trials, h.ewma_success.hex(),
            h.ewma_latency.hex(), h.success_count, h.failure_counts, h.retry_at, repr(h))


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(1, 4), open_s=st.floats(0, 10, allow_nan=False), half=st.integers(1, 3),
    alpha=st.floats(0.001, 1.0), events=st.lists(event, max_size=60),
)
def test_differential_event_sequences(threshold, open_s, half, alpha, events):
    mods = [p.values[0] for p in IMPLS]
    hs = [m.AcquirerHealth("a", threshold, open_s, half, alpha) for m in mods]
    now = 0.0
    for kind, arg, dt in events:
        now += dt
        results = []
        for h in hs:
            if kind == "success":
                results.append(h.record_success(arg, now))
            elif kind == "failure":
                results.append(h.record_failure(arg, now))
            elif kind == "allow":
                results.append(h.allow_request(now))
            elif kind == "release":
                results.append(h.release(now))
            else:
                results.append(h.can_request(now))
            results.append(snapshot(h))
        assert all(r == results[0] for r in results[::2])
        assert all(s == results[1] for s in results[1::2])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(), n=st.integers(0, 6), rnd=st.floats(0, 1, exclude_max=True),
    use_weights=st.booleans(),
)
def test_differential_order(data, n, rnd, use_weights):
    mods = [p.values[0] for p in IMPLS]
    groups = [[m.AcquirerHealth(str(i), failure_threshold=2, open_seconds=3.0, ewma_alpha=0.3) for i in range(n)]
              for m in mods]
    now = 0.0
    for _ in range(data.draw(st.integers(0, 30))):
        i = data.draw(st.integers(0, max(n - 1, 0)))
        now += data.draw(st.floats(0, 2))
        what = data.draw(st.sampled_from(["ok", "fail", "allow"]))
        lat = data.draw(st.sampled_from([0.05, 0.1, 0.2]))
        for g in groups:
            if not g:
                continue
            if what == "ok":
                g[i].record_success(lat, now)
            elif what == "fail":
                g[i].record_failure("timeout", now)
            else:
                g[i].allow_request(now)
    weights = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, 7.0]), min_size=n, max_size=n)) if use_weights else None
    orders = [names(m.order_candidates(g, now, weights, rnd)) for m, g in zip(mods, groups)]
    assert all(o == orders[0] for o in orders)
    snaps = [[snapshot(h) for h in g] for g in groups]
    assert all(s == snaps[0] for s in snaps)
