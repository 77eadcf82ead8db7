"""Simulation-based tuning at finite n (jaxq.tune.finite_n): common random numbers, no recompiles, a
short tuning run, the validation statistics and argument checks. Tiny n and horizons: a few seconds
of simulation on one core (the compile of the stepped engine dominates)."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from jaxq.model.config import load_scenario
from jaxq.sim.batch import _program
from jaxq.sim.state import ARRIVED
from jaxq.tune.finite_n import Evaluator, tune_finite_n, validate, x_from_coords

N, HORIZON, WARMUP = 10, 30.0, 10.0


@pytest.fixture(scope="module")
def scenario():
    return load_scenario("canonical")


@pytest.fixture(scope="module")
def ev(scenario):
    return Evaluator.build(scenario, N, "gg-sp", horizon=HORIZON, warmup=WARMUP, engine="stepped")


def _keys(seed, r=3):
    return jax.random.split(jax.random.key(seed), r)


def test_common_random_numbers(ev):
    keys = _keys(7)
    base = ev.targets()
    a, b = ev.revenue(keys, base), ev.revenue(keys, base)
    np.testing.assert_array_equal(a, b)  # same keys, same targets: bit-identical
    other = ev.targets(x_from_coords(ev.plan.x_target, [0.8]), int(ev.plan.num_mixed) - 1)
    s0, s1 = ev.simulate(keys, base), ev.simulate(keys, other)
    # different targets see the same arrival streams (each class's arrivals are their own stream)
    np.testing.assert_array_equal(np.asarray(s0.totals[:, ARRIVED]), np.asarray(s1.totals[:, ARRIVED]))
    assert not np.array_equal(np.asarray(s0.counts), np.asarray(s1.counts))  # ... and act differently
    # and different keys give different arrivals
    s2 = ev.simulate(_keys(8), base)
    assert not np.array_equal(np.asarray(s0.totals[:, ARRIVED]), np.asarray(s2.totals[:, ARRIVED]))


def test_gate_sees_only_the_direction_of_the_targets(ev):
    """Why the tuner fixes one class's target: a common scale of x_target changes nothing."""
    keys = _keys(3)
    x = np.asarray(ev.plan.x_target)
    np.testing.assert_array_equal(ev.revenue(keys, ev.targets(x)), ev.revenue(keys, ev.targets(2.5 * x)))


def test_new_targets_do_not_recompile(ev):
    keys = _keys(11, r=2)
    ev.revenue(keys, ev.targets())
    fn = _program(ev.engine, ev.spec, ev.policy, ev.dt, None, None, tuple(jax.local_devices()), 2)
    size = fn._cache_size()
    for u, M in ((0.3, 3), (-0.5, 5), (1.0, 4)):
        ev.revenue(keys, ev.targets(x_from_coords(ev.plan.x_target, [u]), M))
    assert fn._cache_size() == size == 1


@pytest.mark.parametrize("estimator", ["fd", "spsa"])
def test_tuner_runs_and_records_a_path(scenario, estimator):
    r = tune_finite_n(scenario, N, steps=3, replicas=2, horizon=HORIZON, warmup=WARMUP, seed=1,
                      estimator=estimator, m_offsets=(-1, 0), u0=[0.2])
    d = 1  # two classes: one log-ratio
    assert r.path["u"].shape == (4, d) and r.path["grad"].shape == (3, d) and r.path["revenue"].shape == (3,)
    assert np.all(np.isfinite(r.path["u"])) and np.all(np.isfinite(r.path["grad"]))
    assert np.all(np.isfinite(r.path["revenue"])) and np.all(r.path["revenue"] > 0)
    assert np.all(np.isfinite(r.x_target)) and np.all(r.x_target > 0)
    assert set(r.m_search) == {r.plan_num_mixed - 1, r.plan_num_mixed} and r.num_mixed in r.m_search
    assert r.evaluations == 2 + 2 * 3
    # the reference class keeps its LP target; the tuned point is the average of the second half
    assert r.x_target[0] == r.x_lp[0]
    np.testing.assert_allclose(r.u, r.path["u"][2:].mean(axis=0))
    np.testing.assert_allclose(r.x_target[1], r.x_lp[1] * np.exp(r.u[0]))
    assert r.summary()["num_mixed"] == r.num_mixed


def test_validate_paired_difference(scenario):
    r = tune_finite_n(scenario, N, steps=1, replicas=2, horizon=HORIZON, warmup=WARMUP, seed=2, m_offsets=(),
                      u0=[0.6])
    v = validate(r, replicas=4, horizon=HORIZON, warmup=WARMUP)
    diff = v.revenue["tuned"] - v.revenue["gg-sp"]
    se = diff.std(ddof=1) / math.sqrt(4)
    assert v.difference.mean == pytest.approx(diff.mean())
    assert v.difference.se == pytest.approx(se)
    assert v.difference.half_width == pytest.approx(stats.t.ppf(0.975, 3) * se)
    lo, hi = v.difference.ci
    assert lo <= v.difference.mean <= hi
    assert v.significant == (lo > 0 or hi < 0)
    assert 0.0 <= v.p_value <= 1.0 and (v.p_value < 0.05) == v.significant
    for k in ("tuned", "gg-sp"):
        assert v.estimate[k].mean == pytest.approx(v.revenue[k].mean())
    # fresh keys: validation never reuses a tuning key, even for the same seed
    v0 = validate(r, replicas=4, horizon=HORIZON, warmup=WARMUP, seed=r.seed)
    assert not np.array_equal(v0.revenue["gg-sp"], v.revenue["gg-sp"])


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"),
    ({"replicas": 1}, "replicas"),
    ({"estimator": "adjoint"}, "estimator"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"perturbation": -0.1}, "perturbation"),
    ({"policy": "fcfs"}, "policy"),
    ({"warmup": HORIZON}, "warmup"),
    ({"horizon": -1.0}, "horizon"),
    ({"engine": "general"}, "engine"),
    ({"u0": [0.1, 0.2]}, "u0"),
])
def test_invalid_arguments(scenario, kwargs, field):
    base = {"steps": 1, "replicas": 2, "horizon": HORIZON, "warmup": WARMUP}
    base.update(kwargs)
    with pytest.raises(ValueError, match=f"'{field}'"):
        tune_finite_n(scenario, N, **base)
