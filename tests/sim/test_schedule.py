"""Piecewise-constant arrival rates (``[arrivals]``, :class:`jaxq.model.scenario.ArrivalSchedule`):
the exact engine's counts per piece are Poisson with mean n lam_i f_{i,s} (piece length) within 4 SE;
the stepped engine agrees with it per piece within 4 combined SE; a one-piece schedule with factor 1 is
bit-identical to none on every engine; a zero last piece stops arrivals; the cumulative factor and its
inverse against NumPy; no retrace for new factors; invalid tables raise naming the field."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.api import make_params, run
from jaxq.model import scenario_from_dict
from jaxq.model.scenario import ArrivalSchedule
from jaxq.policies import get_policy
from jaxq.sim import ENGINES, engine_spec, runner
from jaxq.sim.state import ARRIVED
from jaxq.sim.stepped import arrival_means
from jaxq.testing.scenarios import canonical

CANONICAL = canonical()
N, REPLICAS = 5, 64
# pieces of 40 s; class 1 has its own profile (one row per class)
BREAKS = [0.0, 40.0, 80.0, 120.0]
FACTORS = [[1.0, 2.0, 0.0, 0.5], [0.5, 1.5, 1.0, 0.0]]
SCHEDULED = CANONICAL.replace(arrivals=ArrivalSchedule(BREAKS, FACTORS))


@functools.cache
def counts_per_piece(engine, scenario=SCHEDULED, seed=0):
    """Arrivals per piece and class, summed over replicas: one run per piece with the warm-up at its
    start and the horizon at its end (``counts`` are the arrivals after the warm-up)."""
    out = []
    for start, end in zip(BREAKS, BREAKS[1:] + [160.0]):
        res = run(scenario, "fi-wsp", n=N, replicas=REPLICAS, horizon=end, warmup=start, seed=seed, engine=engine)
        assert not res.status, res.status
        out.append(np.asarray(res.state.counts)[:, ARRIVED].sum(axis=0))
    return np.stack(out, axis=1)  # (I, pieces)


def expected_per_piece():
    lam = CANONICAL.classes.lam[:, None]
    return REPLICAS * N * lam * np.asarray(FACTORS) * 40.0


def test_exact_engine_counts_per_piece_are_poisson_with_the_scheduled_mean():
    got, want = counts_per_piece("exact"), expected_per_piece()
    assert np.all(got[want == 0] == 0)
    z = (got - want)[want > 0] / np.sqrt(want[want > 0])  # Poisson SE from the expected count
    assert np.all(np.abs(z) <= 4), (got, want, z)


def test_stepped_engine_agrees_with_the_exact_one_per_piece():
    exact, stepped = counts_per_piece("exact"), counts_per_piece("stepped", seed=1)
    want = expected_per_piece()
    assert np.all(stepped[want == 0] == 0)
    z = (stepped - exact)[want > 0] / np.sqrt(exact + stepped)[want > 0]  # two Poisson counts: combined SE
    assert np.all(np.abs(z) <= 4), (exact, stepped, z)
    z_mean = (stepped - want)[want > 0] / np.sqrt(want[want > 0])
    assert np.all(np.abs(z_mean) <= 4), (stepped, want, z_mean)


def test_stepped_arrival_means_integrate_the_schedule_across_misaligned_steps():
    """The steps' means add up to n lam F(T) when breakpoints fall inside steps."""
    sched = ArrivalSchedule([0.0, 0.013, 0.05, 0.0999], [[1.0, 3.0, 0.0, 2.0], [0.2, 0.0, 1.0, 1.0]])
    lam, dt, steps = jnp.asarray([0.5, 2.0]), 0.02, 10
    arrays = sched.arrays()
    total = sum(arrival_means(7, lam, arrays, k * dt, (k + 1) * dt, dt) for k in range(steps))
    np.testing.assert_allclose(np.asarray(total), 7 * np.asarray(lam) * sched.integral(steps * dt), rtol=1e-12)


def test_zero_last_piece_stops_arrivals():
    sc = CANONICAL.replace(arrivals=ArrivalSchedule([0.0, 30.0], [1.0, 0.0]))
    early = run(sc, "fi-wsp", n=N, replicas=4, horizon=30.0, warmup=0.0, seed=3)
    late = run(sc, "fi-wsp", n=N, replicas=4, horizon=200.0, warmup=0.0, seed=3)
    a, b = np.asarray(early.state.totals)[:, ARRIVED], np.asarray(late.state.totals)[:, ARRIVED]
    assert np.all(a > 0)
    np.testing.assert_array_equal(a, b)  # nothing after t = 30 s
    assert np.all(np.isinf(np.asarray(late.state.next_arrival)))
    assert not late.status and np.all(np.asarray(late.state.t) == 200.0)
    stepped = run(sc, "fi-wsp", n=N, replicas=4, horizon=200.0, warmup=30.0, seed=3, engine="stepped")
    assert np.all(np.asarray(stepped.state.counts)[:, ARRIVED] == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_one_piece_schedule_is_bit_identical_to_none(engine):
    kw = {"n": 6, "replicas": 3, "horizon": 60.0, "warmup": 10.0, "seed": 11, "room": 128, "engine": engine}
    a = run(CANONICAL, "fi-wsp", **kw).state
    b = run(CANONICAL.replace(arrivals=ArrivalSchedule([0.0], [1.0])), "fi-wsp", **kw).state
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_piece_factor_scales_the_rate():
    """One piece with factor f is the constant rate f lam: the exact engine's arrivals are those of
    lam' = f lam on the same key."""
    kw = {"n": 6, "replicas": 3, "horizon": 60.0, "warmup": 10.0, "seed": 2, "room": 128}
    a = run(CANONICAL.replace(arrivals=ArrivalSchedule([0.0], [[0.5], [2.0]])), "fi-wsp", **kw)
    b = run(CANONICAL.replace(**{"classes.lam": CANONICAL.classes.lam * [0.5, 2.0]}), "fi-wsp", **kw)
    np.testing.assert_array_equal(np.asarray(a.state.totals), np.asarray(b.state.totals))


def test_cumulative_factor_and_its_inverse():
    sched = ArrivalSchedule([0.0, 10.0, 25.0, 40.0, 70.0], [[2.0, 0.0, 0.5, 0.0, 1.0], [1.0, 1.0, 0.0, 3.0, 0.0]])
    arrays = sched.arrays()
    ts = np.linspace(0.0, 100.0, 401)
    F = np.stack([sched.integral(t) for t in ts])
    np.testing.assert_allclose(np.stack([np.asarray(arrays.integral(t)) for t in ts]), F, rtol=1e-13, atol=1e-12)
    for c in range(2):
        for y in np.linspace(0.01, F[-1, c] - 0.01, 97):  # the earliest time F reaches y, from NumPy
            got = float(arrays.invert(c, y))
            dense = np.linspace(0.0, 100.0, 1_000_001)
            want = dense[np.argmax(np.interp(dense, ts, F[:, c]) >= y)]
            assert abs(got - want) <= 2e-4, (c, y, got, want)
            assert abs(float(arrays.integral(got, c)) - y) <= 1e-12 * max(1.0, y)
        # class 1 has rate 0 after t = 70 s: beyond F(70) the next arrival never comes
    assert np.isinf(float(arrays.invert(1, F[-1, 1] + 1e-6)))
    assert float(arrays.invert(0, F[-1, 0] + 1.0)) == pytest.approx(100.0 + 1.0, rel=1e-12)


def test_mean_rate_for_the_lp():
    sched = ArrivalSchedule(BREAKS, FACTORS)
    np.testing.assert_allclose(SCHEDULED.mean_lam(160.0), CANONICAL.classes.lam * np.mean(FACTORS, axis=1))
    np.testing.assert_allclose(SCHEDULED.mean_lam(60.0), CANONICAL.classes.lam * (sched.integral(60.0) / 60.0))
    np.testing.assert_allclose(SCHEDULED.peak_lam, CANONICAL.classes.lam * [2.0, 1.5])
    np.testing.assert_array_equal(CANONICAL.mean_lam(100.0), CANONICAL.classes.lam)


@pytest.mark.parametrize("engine", ["exact", "stepped"])
def test_new_factors_do_not_retrace(engine):
    policy = get_policy("gg-sp")
    spec = engine_spec(engine, CANONICAL, N, room=128)
    single = runner(engine, spec, policy)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batch(keys, params):
        return jax.vmap(lambda k: single(k, params)[0])(keys)

    for factors in (FACTORS, [[0.1, 3.0, 1.0, 2.0], [1.0, 0.0, 0.0, 1.0]]):
        sc = CANONICAL.replace(arrivals=ArrivalSchedule([0.0, 5.0, 7.0, 12.5], factors))
        params = make_params(sc, policy, N, horizon=20.0, warmup=0.0)[0]
        out = batch(jax.random.split(jax.random.key(0), 2), params)
        assert np.all(np.asarray(out.status) == 0)


# -- invalid tables -------------------------------------------------------------------------------

def _toml_dict(arrivals):
    d = {"name": "t", "version": 1,
         "cluster": {"n": 4, "B": 16, "C": 256}, "timing": {"alpha": 0.0174, "beta": 6.2e-5, "gamma": 45.45},
         "prices": {"c_p": 0.1, "c_d": 0.2, "scheme": "bundled"},
         "classes": {"P": [300.0, 3000.0], "D": [1000.0, 400.0], "lam": [0.5, 0.5], "theta": [0.1, 0.1]}}
    if arrivals is not None:
        d["arrivals"] = arrivals
    return d


def test_valid_tables_load():
    one_row = scenario_from_dict(_toml_dict({"breakpoints": [0.0, 600.0, 1200.0], "factors": [1.0, 1.5, 0.8]}))
    assert one_row.arrivals.factors.shape == (2, 3)
    per_class = scenario_from_dict(_toml_dict({"breakpoints": [0, 600], "factors": [[1.0, 0.0], [0.0, 2.0]]}))
    np.testing.assert_array_equal(per_class.arrivals.factors, [[1.0, 0.0], [0.0, 2.0]])
    assert scenario_from_dict(_toml_dict(None)).arrivals is None
    assert per_class.params().arrivals.factors.shape == (2, 2)


@pytest.mark.parametrize("table, field", [
    ({"breakpoints": [0.0, 600.0]}, "arrivals.factors"),  # missing key
    ({"breakpoints": [0.0], "factors": [1.0], "shape": 1}, "arrivals.shape"),  # unknown key
    ({"breakpoints": [10.0, 600.0], "factors": [1.0, 1.0]}, "arrivals.breakpoints"),  # not from 0
    ({"breakpoints": [0.0, 600.0, 300.0], "factors": [1.0, 1.0, 1.0]}, "arrivals.breakpoints"),  # unsorted
    ({"breakpoints": [0.0, 0.0], "factors": [1.0, 1.0]}, "arrivals.breakpoints"),  # not strictly
    ({"breakpoints": [0.0, float("inf")], "factors": [1.0, 1.0]}, "arrivals.breakpoints[1]"),
    ({"breakpoints": [], "factors": []}, "arrivals.breakpoints"),
    ({"breakpoints": "0, 1", "factors": [1.0]}, "arrivals.breakpoints"),
    ({"breakpoints": [0.0, 1.0], "factors": [1.0, -0.5]}, "arrivals.factors[1]"),
    ({"breakpoints": [0.0, 1.0], "factors": [1.0, float("nan")]}, "arrivals.factors[1]"),
    ({"breakpoints": [0.0, 1.0], "factors": [0.0, 0.0]}, "arrivals.factors"),  # never arrives
    ({"breakpoints": [0.0, 1.0], "factors": [[1.0, 1.0], [0.0, 0.0]]}, "arrivals.factors[1]"),
    ({"breakpoints": [0.0, 1.0], "factors": [1.0, 1.0, 1.0]}, "arrivals.factors"),  # row length
    ({"breakpoints": [0.0, 1.0], "factors": [[1.0, 1.0], [1.0]]}, "arrivals.factors[1]"),
    ({"breakpoints": [0.0, 1.0], "factors": [[1.0, 1.0]] * 3}, "arrivals.factors"),  # rows != classes
    ({"breakpoints": [0.0, 1.0], "factors": [True, 1.0]}, "arrivals.factors[0]"),
    ("yes", "arrivals"),
    ({"breakpoints": [0.0, 1.0], "factors": [[1.0, 1.0], "ab"]}, "arrivals.factors[1]"),
])
def test_invalid_tables_raise_naming_the_field(table, field):
    with pytest.raises(ValueError, match=re.escape(f"'{field}'")):
        scenario_from_dict(_toml_dict(table))
