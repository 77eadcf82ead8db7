"""What every engine must do, whatever the policy: conservation, capacity and the plan's groups on every
(engine, policy) pair and on random configurations; determinism and batch = loop; one compile per
shape; common random numbers across policies; recorded trajectories."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxq.policies import POLICIES, get_policy
from jaxq.sim import ENGINES, engine_spec, run_replicas, runner
from jaxq.api import make_params
from jaxq.sim.state import ARRIVED, DECODE_DONE
from jaxq.testing.checks import check_final_states
from jaxq.testing.scenarios import canonical
from jaxq.testing.strategies import two_class_scenarios

CANONICAL = canonical()
N = 6
SERVICE = {"general": "lognormal"}  # the general engine on its least exponential law


def setup(engine, name, scenario=CANONICAL, horizon=300.0):
    policy = get_policy(name)
    params, _, _ = make_params(scenario, policy, N, horizon=horizon, warmup=50.0 if horizon > 50 else 0.0)
    return policy, params, engine_spec(engine, CANONICAL, N, room=128)


def simulate(engine, policy, params, spec, seed, replicas=3):
    keys = jax.random.split(jax.random.key(seed), replicas)
    state, _ = run_replicas(keys, params, spec, policy, engine=engine, service=SERVICE.get(engine))
    return state


# every policy on the exact engine and every router (greedy, split, coupled, any free slot) on every
# engine by default; every pair with --run-slow
ROUTERS = ("gg-sp", "sli", "fi-wsp", "gf-wsp")
SLOW = pytest.mark.slow
PAIRS = [(e, p) if e == "exact" or p in ROUTERS else pytest.param(e, p, marks=SLOW)
         for e in ENGINES for p in POLICIES]


@pytest.mark.parametrize("engine, name", PAIRS)
def test_conservation_capacity_and_groups(engine, name):
    policy, params, spec = setup(engine, name)
    state = simulate(engine, policy, params, spec, seed=1)
    check_final_states(state, params, spec, policy, engine)
    totals = np.asarray(state.totals)
    assert np.all(totals[:, ARRIVED] > 100) and np.all(totals[:, DECODE_DONE] > 0)
    np.testing.assert_allclose(np.asarray(state.t), 300.0, rtol=1e-12)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine=st.sampled_from(ENGINES), name=st.sampled_from(ROUTERS), scenario=two_class_scenarios(CANONICAL),
       seed=st.integers(0, 2**30))
def test_property_random_configurations(engine, name, scenario, seed):
    """Random valid configurations in the shapes of the test above (no new compile): conservation,
    capacity and groups on every replica; a full waiting room (long queues) is data, not a failure."""
    policy, params, spec = setup(engine, name, scenario)
    state = simulate(engine, policy, params, spec, seed)
    check_final_states(state, params, spec, policy, engine, allow_overflow=True)


# the population engine's determinism is also pinned by its fingerprints (tests/sim/test_fingerprints.py)
@pytest.mark.parametrize("engine", [e if e != "population" else pytest.param(e, marks=SLOW) for e in ENGINES])
def test_same_key_bit_identical_and_batch_equals_loop(engine):
    policy, params, spec = setup(engine, "sli", horizon=100.0)
    a = simulate(engine, policy, params, spec, seed=7)
    b = simulate(engine, policy, params, spec, seed=7)
    leaves = lambda s: [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
                        for x in jax.tree_util.tree_leaves(s)]
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    single = runner(engine, spec, policy, service=SERVICE.get(engine))
    one = jax.jit(lambda k: single(k, params)[0])
    for r, key in enumerate(jax.random.split(jax.random.key(7), 3)):
        for x, y in zip(leaves(a), leaves(one(key))):
            x, y = np.asarray(x)[r], np.asarray(y)
            if np.issubdtype(x.dtype, np.integer):  # the whole event path: bit-identical
                np.testing.assert_array_equal(x, y)
            else:  # XLA may order the float accumulations differently in the batched program
                np.testing.assert_allclose(x, y, rtol=1e-12)


# the two kinds of engine by default (the event engines share their loop and params handling)
@pytest.mark.parametrize("engine", [e if e in ("exact", "stepped") else pytest.param(e, marks=SLOW) for e in ENGINES])
def test_compiles_once_per_shape(engine):
    policy, params, spec = setup(engine, "gg-sp", horizon=50.0)
    single = runner(engine, spec, policy, service=SERVICE.get(engine))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batch(keys, params):
        return jax.vmap(lambda k: single(k, params)[0])(keys)

    batch(jax.random.split(jax.random.key(0), 2), params)
    # new numbers (rates, B below the spec's) of the same shapes: no retrace
    other = make_params(CANONICAL.replace(**{"classes.lam": [0.3, 0.7], "cluster.B": 8}), policy, N,
                        horizon=40.0, warmup=5.0)[0]
    out = batch(jax.random.split(jax.random.key(1), 2), other)
    assert np.all(np.asarray(out.status) == 0)


def test_common_random_numbers_across_policies_and_event_engines():
    """Two policies (and the three event engines) on one key see the same arrival stream; the stepped
    engine has its own, common to its policies."""
    arrivals = {}
    for engine in ENGINES:
        for name in ("gg-sp", "fi-wsp"):
            policy, params, spec = setup(engine, name, horizon=100.0)
            arrivals[engine, name] = np.asarray(simulate(engine, policy, params, spec, seed=3).totals)[:, ARRIVED]
    for engine in ENGINES:
        np.testing.assert_array_equal(arrivals[engine, "gg-sp"], arrivals[engine, "fi-wsp"])
    for engine in ("population", "general"):
        np.testing.assert_array_equal(arrivals[engine, "gg-sp"], arrivals["exact", "gg-sp"])


@pytest.mark.parametrize("engine", ["exact", "stepped"])
def test_recorded_trajectory(engine):
    policy, params, spec = setup(engine, "gg-sp", horizon=100.0)
    keys = jax.random.split(jax.random.key(0), 2)
    times = tuple(np.linspace(10, 100, 10))
    state, traj = run_replicas(keys, params, spec, policy, engine=engine, record_times=times)
    assert traj.shape == (2, 10, 6, 2) and np.all(np.asarray(traj) >= 0)
    np.testing.assert_array_equal(np.asarray(traj)[:, -1, 0], np.asarray(state.q_p))  # the last is the final state


def test_long_horizon_time_is_float64():
    """2e4 s, where float32 time would be 2 ms coarse; light traffic, so that the events are few."""
    policy = get_policy("gg-sp")
    light = CANONICAL.replace(**{"classes.lam": [0.05, 0.05]})
    spec = engine_spec("exact", light, 2, room=128)
    params = make_params(light, policy, 2, horizon=2e4, warmup=0.0)[0]
    state, _ = run_replicas(jax.random.split(jax.random.key(0), 1), params, spec, policy)
    assert state.t.dtype == jnp.float64 and float(state.t[0]) == 2e4
