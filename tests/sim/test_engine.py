"""The exact engine: conservation and capacity for every policy, closed forms (Erlang-A, Erlang-C),
the peer Ciw, determinism, batching and compile counts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.metrics import estimate, replica_metrics
from jaxq.model import JobClasses
from jaxq.policies import POLICIES, get_policy
from jaxq.sim import SimSpec, simulate
from jaxq.sim.api import make_params, run
from jaxq.sim.engine import run_single
from jaxq.sim.state import ABANDON_DECODE, ABANDON_PREFILL, ARRIVED, DECODE_DONE, LOST, MIXED, OVERFLOW, SOLO
from jaxq.testing.closed_forms import erlang_a, erlang_c

CANONICAL = jaxq.load_scenario("canonical")


def in_system(state):
    """Jobs in the system per class from the final state: (R, I)."""
    num = state.q_p.shape[-1]
    X = jnp.sum(state.prefill_class[..., None] == jnp.arange(num)[None, None, :], axis=-2)
    return np.asarray(state.q_p + X + jnp.sum(state.q_d, axis=-2) + jnp.sum(state.decodes, axis=-2))


def check_conservation_and_capacity(state, params, policy, spec, allow_overflow=False):
    t = np.asarray(state.totals)
    out = t[:, ABANDON_PREFILL] + t[:, ABANDON_DECODE] + t[:, DECODE_DONE] + t[:, LOST]
    np.testing.assert_array_equal(t[:, ARRIVED], out + in_system(state))
    assert np.all(t >= 0) and np.all(np.asarray(state.decodes) >= 0)
    status = np.asarray(state.status)
    # a full waiting room is data, not a failure (long queues: small theta, large lam): it must then have
    # lost jobs (counted in the balance above); any other bit is a failure
    assert np.all((status & ~(OVERFLOW if allow_overflow else 0)) == 0), status
    np.testing.assert_array_equal((status & OVERFLOW) != 0, t[:, LOST].sum(-1) > 0)
    B = int(params.model.B)
    pre = np.asarray(state.prefill_class) >= 0
    ndec = np.asarray(state.decodes).sum(-1)
    if policy.partitioned:
        mixed = np.arange(spec.num_gpus) < int(params.targets.num_mixed)
        assert np.all(ndec[:, mixed] <= B - 1) and np.all(ndec[:, ~mixed] <= B)
        assert not np.any(pre[:, ~mixed])
    else:
        assert np.all(ndec + pre <= B)


@pytest.mark.parametrize("name", list(POLICIES))
def test_conservation_every_policy(name):
    s = CANONICAL
    policy = get_policy(name)
    params, _, _ = make_params(s, policy, 6, horizon=300.0, warmup=50.0)
    spec = SimSpec(2, 6, room=128, num_buffers=policy.num_buffers)
    state, _ = simulate(jax.random.split(jax.random.key(1), 4), params, spec, policy)
    check_conservation_and_capacity(state, params, policy, spec)
    assert np.all(np.asarray(state.totals)[:, ARRIVED] > 100)


_SPEC = SimSpec(2, 5, room=256)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(list(POLICIES)),
    B=st.integers(1, 6),
    lam=st.lists(st.floats(0.05, 2.0), min_size=2, max_size=2),
    theta=st.lists(st.floats(0.01, 2.0), min_size=2, max_size=2),
    P=st.lists(st.floats(20, 3000), min_size=2, max_size=2),
    D=st.lists(st.floats(20, 2000), min_size=2, max_size=2),
    gamma=st.floats(10, 60),
    seed=st.integers(0, 2**30),
)
def test_property_random_configurations(name, B, lam, theta, P, D, gamma, seed):
    """Random valid configurations of one shape (so one compile per policy): conservation, capacity and
    no status flag on every replica; the engine checks capacity after every event (status bit)."""
    s = CANONICAL.replace(classes=JobClasses(P=P, D=D, lam=lam, theta=theta),
                          **{"cluster.B": B, "timing.gamma": gamma})
    policy = get_policy(name)
    params, _, _ = make_params(s, policy, 5, horizon=60.0, warmup=0.0)
    spec = SimSpec(2, 5, room=256, num_buffers=policy.num_buffers)
    state, _ = simulate(jax.random.split(jax.random.key(seed), 2), params, spec, policy)
    check_conservation_and_capacity(state, params, policy, spec, allow_overflow=True)


# -- closed forms and the peer -------------------------------------------------------------------

def mmc_scenario(lam_total, c, theta):
    """One class, FI-WSP, B = 1: each GPU is one server; P = 1 token makes the prefill last
    1/mu_p = tau/C = 1.3e-4 s (a 1.3e-4 relative bias on the service time, far below the tests' SE),
    D = gamma makes the decode exp(1). The prefill queue is then M/M/c+M."""
    g = CANONICAL.timing.gamma
    return CANONICAL.replace(classes=JobClasses(P=[1.0], D=[g], lam=[lam_total / c], theta=[theta]),
                             **{"cluster.B": 1, "cluster.n": c})


def run_mmc(lam_total, c, theta, replicas=32, horizon=1500.0, warmup=150.0, seed=0):
    s = mmc_scenario(lam_total, c, theta)
    res = run(s, "fi-wsp", n=c, replicas=replicas, horizon=horizon, warmup=warmup, seed=seed, room=512)
    assert not res.status
    m = res.metrics
    return {"queue": m["q_p"][:, 0] * c, "abandon": m["abandon_prefill_fraction"][:, 0],
            "wait": m["wait_probability"][:, 0], "throughput": m["throughput"][:, 0] * c}


def within(samples, target, k):
    e = estimate(samples)
    assert abs(e.mean - target) <= k * e.se, f"{e.mean} vs {target}: {abs(e.mean - target) / e.se:.2f} SE"


def test_erlang_a():
    c, lam, theta = 8, 7.6, 0.5
    exact = erlang_a(c, lam, 1.0, theta)
    sim = run_mmc(lam, c, theta)
    within(sim["queue"], exact.mean_queue, 3)
    within(sim["abandon"], exact.p_abandon, 3)
    within(sim["wait"], exact.p_wait, 3)


def test_erlang_c():
    c, lam = 8, 6.0
    exact = erlang_c(c, lam, 1.0)
    sim = run_mmc(lam, c, 0.0, seed=1)
    within(sim["wait"], exact.p_wait, 3)
    within(sim["queue"], exact.mean_queue, 3)


def test_ciw_agrees_on_the_mmc_special_case():
    ciw = pytest.importorskip("ciw")
    c, lam, theta, T, W0 = 8, 7.6, 0.5, 1500.0, 150.0
    queue, thr = [], []
    for seed in range(12):
        net = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=lam)],
                                 service_distributions=[ciw.dists.Exponential(rate=1.0)],
                                 number_of_servers=[c], reneging_time_distributions=[ciw.dists.Exponential(rate=theta)])
        ciw.seed(seed)
        q = ciw.Simulation(net, tracker=ciw.trackers.SystemPopulation())
        q.simulate_until_max_time(T)
        probs = q.statetracker.state_probabilities(observation_period=(W0, T))
        queue.append(sum(max(k - c, 0) * p for k, p in probs.items()))
        done = [r for r in q.get_all_records() if r.record_type == "service" and W0 <= r.exit_date <= T]
        thr.append(len(done) / (T - W0))
    sim = run_mmc(lam, c, theta, horizon=T, warmup=W0, seed=2)
    for ours, theirs in ((sim["queue"], queue), (sim["throughput"], thr)):
        a, b = estimate(ours), estimate(theirs)
        assert abs(a.mean - b.mean) <= 3 * np.hypot(a.se, b.se), (a, b)


# -- determinism, batching, compile counts ---------------------------------------------------------

def small_setup(name="gg-sp", n=6, horizon=100.0):
    policy = get_policy(name)
    params, _, _ = make_params(CANONICAL, policy, n, horizon=horizon, warmup=10.0)
    return policy, params, SimSpec(2, n, room=128, num_buffers=policy.num_buffers)


@pytest.mark.parametrize("name", ["gg-sp", "sli", "fi-wsp"])
def test_same_key_bit_identical_and_batch_equals_loop(name):
    policy, params, spec = small_setup(name)
    keys = jax.random.split(jax.random.key(7), 3)
    a, _ = simulate(keys, params, spec, policy)
    b, _ = simulate(keys, params, spec, policy)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    single = jax.jit(lambda k: run_single(k, params, spec, policy)[0])
    for r in range(3):
        one = single(keys[r])
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(one)):
            x, y = np.asarray(x)[r], np.asarray(y)
            if np.issubdtype(x.dtype, np.integer):  # the whole event path: bit-identical
                np.testing.assert_array_equal(x, y)
            else:  # XLA may order the float accumulations differently in the batched program
                np.testing.assert_allclose(x, y, rtol=1e-12)


def test_compiles_once_per_shape():
    policy, params, spec = small_setup()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batch(keys, params):
        return jax.vmap(lambda k: run_single(k, params, spec, policy)[0])(keys)

    keys = jax.random.split(jax.random.key(0), 2)
    batch(keys, params)
    other = make_params(CANONICAL.replace(**{"classes.lam": [0.3, 0.7], "cluster.B": 8}), policy, 6,
                        horizon=50.0, warmup=5.0)[0]
    batch(jax.random.split(jax.random.key(1), 2), other)  # new numbers, same shapes: no retrace


def test_common_random_numbers_across_policies():
    """Two policies on one key see the same arrival stream."""
    out = []
    for name in ("gg-sp", "fi-wsp"):
        policy, params, spec = small_setup(name)
        state, _ = simulate(jax.random.split(jax.random.key(3), 2), params, spec, policy)
        out.append(np.asarray(state.totals)[:, ARRIVED])
    np.testing.assert_array_equal(out[0], out[1])


def test_long_horizon_time_is_float64():
    policy, params, spec = small_setup(horizon=2e4, n=2)
    state, _ = simulate(jax.random.split(jax.random.key(0), 1), params, spec, policy)
    assert state.t.dtype == jnp.float64
    assert float(state.t[0]) == 2e4


def test_recorded_trajectory_shapes_and_levels():
    policy, params, spec = small_setup()
    times = tuple(np.linspace(10, 100, 10))
    state, traj = simulate(jax.random.split(jax.random.key(0), 2), params, spec, policy, times)
    assert traj.shape == (2, 10, 6, 2)
    assert np.all(np.asarray(traj) >= 0)
    m = replica_metrics(state, CANONICAL.replace(**{"cluster.n": 6}), 6, 100.0, 10.0)
    assert np.all(np.isfinite(m["revenue_bundled"]))


def test_groups_follow_static_plan():
    policy, params, spec = small_setup()
    state, _ = simulate(jax.random.split(jax.random.key(0), 2), params, spec, policy)
    M = int(params.targets.num_mixed)
    pre = np.asarray(state.prefill_class)
    assert not np.any(pre[:, M:] >= 0)  # prefills only ever on G_mix
    assert MIXED != SOLO


def test_float32_agrees_with_float64_within_statistical_error():
    """Rates and draws in float32 (time and integrals stay float64): the same means within 4 combined
    SE on every per-class metric that matters for revenue."""
    kw = dict(n=10, replicas=24, horizon=400.0, warmup=100.0)
    a = run(CANONICAL, "gg-sp", seed=0, **kw)
    b = run(CANONICAL, "gg-sp", seed=1, dtype="float32", **kw)
    assert not a.status and not b.status
    assert b.state.t.dtype == jnp.float64
    for key in ("revenue_bundled", "throughput", "x", "q_p", "q_d", "y_m", "y_s"):
        ea, eb = estimate(a.metrics[key]), estimate(b.metrics[key])
        assert np.all(np.abs(ea.mean - eb.mean) <= 4 * np.hypot(ea.se, eb.se)), (key, ea, eb)
