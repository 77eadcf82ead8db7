"""The general-service engine: exponential laws reproduce the exact engine, the peer Ciw on M/D/c+M and
M/LN/c+M, conservation and per-slot consistency for every policy, determinism and clear errors."""

import math

import equinox as eqx
import jax
import numpy as np
import pytest

import jaxq
from jaxq.metrics import estimate
from jaxq.model import JobClasses
from jaxq.policies import POLICIES, get_policy
from jaxq.sim import SimSpec
from jaxq.sim import simulate as simulate_exact
from jaxq.sim.api import make_params, run, single_runner
from jaxq.sim.general import (
    GeneralSpec,
    ServiceLaw,
    draw_length,
    phase_speeds,
    remaining_work,
    run_single,
    simulate,
)
from jaxq.sim.state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ARRIVED,
    CAPACITY_VIOLATED,
    DECODE_DONE,
    DECODE_STARTED,
    INT_X,
    INT_YM,
    INT_YS,
    LOST,
)

CANONICAL = jaxq.load_scenario("canonical")
LAWS = {"deterministic": ServiceLaw("deterministic", "deterministic"),
        "lognormal": ServiceLaw("lognormal", "lognormal", cv=1.5)}


def test_speeds_give_the_exact_engines_rates():
    """A phase of mean length at the engine's speed lasts 1/mu (MODEL.md eq. 4)."""
    m = CANONICAL.params()
    prefill, slow, fast = phase_speeds(m)
    r = CANONICAL.rates
    np.testing.assert_allclose(prefill / CANONICAL.classes.P, r.mu_p, rtol=1e-14)
    np.testing.assert_allclose(slow / CANONICAL.classes.D, r.mu_m, rtol=1e-14)
    np.testing.assert_allclose(fast / CANONICAL.classes.D, r.mu_s, rtol=1e-14)


@pytest.mark.parametrize("kind,cv", [("exponential", 1.0), ("deterministic", 1.0), ("lognormal", 1.0),
                                     ("lognormal", 2.0)])
def test_length_laws_have_the_stated_mean_and_cv(kind, cv):
    keys = jax.random.split(jax.random.key(0), 200_000)
    x = np.asarray(jax.vmap(lambda k: draw_length(k, kind, 300.0, cv))(keys))
    want_cv = {"exponential": 1.0, "deterministic": 0.0}.get(kind, cv)
    # the sample mean within 5 SE of 300; the sample cv within 5% (lognormal cv 2 has heavy tails: 10%)
    assert abs(x.mean() - 300.0) <= 5 * 300.0 * max(want_cv, 1e-9) / math.sqrt(x.size) + 1e-9
    assert abs(x.std() / x.mean() - want_cv) <= (0.1 if cv > 1 else 0.05) * max(want_cv, 1e-9) + 1e-12


# -- 1. exponential laws: the exact engine in distribution ---------------------------------------

@pytest.mark.parametrize("name", ["gg-sp", "fi-wsp"])
def test_exponential_law_agrees_with_the_exact_engine(name):
    kw = {"n": 20, "replicas": 16, "horizon": 300.0, "warmup": 60.0}
    a = run(CANONICAL, name, seed=0, **kw)
    b = run(CANONICAL, name, seed=1, engine="general", **kw)
    assert a.engine == "exact" and b.engine == "general"
    assert not a.status and not b.status
    for key in ("throughput", "x", "q_p", "y_m", "y_s", "revenue_bundled"):
        ea, eb = estimate(a.metrics[key]), estimate(b.metrics[key])
        z = np.abs(ea.mean - eb.mean) / np.hypot(ea.se, eb.se)
        assert np.all(z <= 4), (key, ea, eb, z)


def test_same_key_same_arrivals_as_the_exact_engine():
    """Common random numbers: the arrival stream is the exact engine's, whatever the law."""
    policy = get_policy("gg-sp")
    params, _, _ = make_params(CANONICAL, policy, 6, horizon=100.0, warmup=10.0)
    spec = SimSpec(2, 6, room=128)
    keys = jax.random.split(jax.random.key(5), 2)
    exact, _ = simulate_exact(keys, params, spec, policy)
    gen, _ = simulate(keys, params, GeneralSpec.from_spec(spec, 16), policy, law="deterministic")
    np.testing.assert_array_equal(np.asarray(exact.totals)[:, ARRIVED], np.asarray(gen.totals)[:, ARRIVED])


# -- 2. the peer: Ciw on M/G/c+M -------------------------------------------------------------------

def mgc_scenario(lam_total, c, theta):
    """tests/sim/test_engine.py's M/M/c+M special case: one class, FI-WSP, B = 1, P = 1 token (the
    prefill lasts ~tau/C = 1.3e-4 s, negligible), D = gamma (the decode lasts D/gamma, mean 1 s)."""
    g = CANONICAL.timing.gamma
    return CANONICAL.replace(classes=JobClasses(P=[1.0], D=[g], lam=[lam_total / c], theta=[theta]),
                             **{"cluster.B": 1, "cluster.n": c})


def ciw_service(law: ServiceLaw):
    import ciw

    if law.output == "deterministic":
        return ciw.dists.Deterministic(1.0)
    s2 = math.log1p(law.cv**2)  # Ciw's Lognormal takes the underlying normal's mean and sd
    return ciw.dists.Lognormal(-0.5 * s2, math.sqrt(s2))


@pytest.mark.parametrize("which", list(LAWS))
def test_ciw_agrees_on_the_mgc_special_case(which):
    ciw = pytest.importorskip("ciw")
    law = LAWS[which]
    c, lam, theta, T, W0 = 8, 7.6, 0.5, 1500.0, 150.0
    queue, thr = [], []
    for seed in range(16):
        net = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=lam)],
                                 service_distributions=[ciw_service(law)], number_of_servers=[c],
                                 reneging_time_distributions=[ciw.dists.Exponential(rate=theta)])
        ciw.seed(seed)
        q = ciw.Simulation(net, tracker=ciw.trackers.SystemPopulation())
        q.simulate_until_max_time(T)
        probs = q.statetracker.state_probabilities(observation_period=(W0, T))
        queue.append(sum(max(k - c, 0) * p for k, p in probs.items()))
        done = [r for r in q.get_all_records() if r.record_type == "service" and W0 <= r.exit_date <= T]
        thr.append(len(done) / (T - W0))
    res = run(mgc_scenario(lam, c, theta), "fi-wsp", n=c, replicas=16, horizon=T, warmup=W0, seed=3, room=512,
              service=law)
    assert res.engine == "general" and res.service == law and not res.status
    ours = {"queue": res.metrics["q_p"][:, 0] * c, "throughput": res.metrics["throughput"][:, 0] * c}
    for key, theirs in (("queue", queue), ("throughput", thr)):
        a, b = estimate(ours[key]), estimate(theirs)
        assert abs(a.mean - b.mean) <= 3 * np.hypot(a.se, b.se), (key, a, b)


# -- 3. conservation, capacity and slot consistency, every policy ------------------------------------

def check_state(state, params, policy, spec):
    t = np.asarray(state.totals)
    num = t.shape[-1]
    pre = np.asarray(state.prefill_class)
    X = (pre[..., None] == np.arange(num)).sum(-2)
    decodes = np.asarray(state.decodes)
    inside = np.asarray(state.q_p) + X + np.asarray(state.q_d).sum(-2) + decodes.sum(-2)
    out = t[:, ABANDON_PREFILL] + t[:, ABANDON_DECODE] + t[:, DECODE_DONE] + t[:, LOST]
    np.testing.assert_array_equal(t[:, ARRIVED], out + inside)
    assert np.all(np.asarray(state.status) == 0), np.asarray(state.status)
    assert np.all(t >= 0) and np.all(decodes >= 0)
    B = int(params.model.B)
    ndec = decodes.sum(-1)
    if policy.partitioned:
        mixed = np.arange(spec.num_gpus) < int(params.targets.num_mixed)
        assert np.all(ndec[:, mixed] <= B - 1) and np.all(ndec[:, ~mixed] <= B)
        assert not np.any(pre[:, ~mixed] >= 0)
    else:
        assert np.all(ndec + (pre >= 0) <= B)
    # the per-slot work agrees with the per-GPU counts; finish times are +inf exactly where nothing runs
    cls = np.asarray(state.decode_class)
    np.testing.assert_array_equal((cls[..., None] == np.arange(num)).sum(-2), decodes)
    finish, pfinish = np.asarray(state.decode_finish), np.asarray(state.prefill_finish)
    np.testing.assert_array_equal(np.isinf(finish), cls < 0)
    np.testing.assert_array_equal(np.isinf(pfinish), pre < 0)
    left_p, left_d = (np.asarray(a) for a in remaining_work(spec, params, state))
    assert np.all(left_d >= 0) and np.all(left_p >= 0) and np.all(left_d[cls < 0] == 0)


@pytest.mark.parametrize("law", list(LAWS))
@pytest.mark.parametrize("name", list(POLICIES))
def test_conservation_every_policy(name, law):
    policy = get_policy(name)
    n = 6
    params, _, _ = make_params(CANONICAL, policy, n, horizon=300.0, warmup=50.0)
    spec = GeneralSpec(2, n, room=128, num_buffers=policy.num_buffers, max_batch=16)
    state, _ = simulate(jax.random.split(jax.random.key(1), 3), params, spec, policy, law=LAWS[law])
    check_state(state, params, policy, spec)
    assert np.all(np.asarray(state.totals)[:, ARRIVED] > 100)
    assert np.all(np.asarray(state.totals)[:, DECODE_DONE] > 0)


def test_deterministic_lengths_are_deterministic():
    """B = 1, one GPU, deterministic lengths: every prefill lasts P tau/C and every decode D/gamma
    (convention B: no prefill runs beside it), so Little's law on the counts gives them to within the
    jobs straddling the window's ends."""
    s = mgc_scenario(0.2, 1, 0.1).replace(**{"classes.P": [2560.0], "classes.D": [90.0]})
    res = run(s, "fi-wsp", n=1, replicas=2, horizon=2000.0, warmup=0.0, service="deterministic")
    assert not res.status
    integ, counts = np.asarray(res.state.integrals), np.asarray(res.state.counts)
    prefill_time = 2560.0 * s.tau / 256.0
    decode_time = 90.0 / s.timing.gamma
    np.testing.assert_allclose(integ[:, INT_X, 0] / counts[:, ADMITTED, 0], prefill_time, rtol=0.01)
    np.testing.assert_allclose((integ[:, INT_YM, 0] + integ[:, INT_YS, 0]) / counts[:, DECODE_STARTED, 0], decode_time,
                               rtol=0.01)


# -- 4. determinism, errors, failures as data --------------------------------------------------------

def test_same_key_bit_identical_and_one_compile_per_shape():
    policy = get_policy("gi-wsp")
    params, _, _ = make_params(CANONICAL, policy, 6, horizon=100.0, warmup=10.0)
    spec = GeneralSpec(2, 6, room=128, max_batch=16)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batch(keys, params):
        return jax.vmap(lambda k: run_single(k, params, spec, policy, law="lognormal")[0])(keys)

    keys = jax.random.split(jax.random.key(7), 2)
    a, b = batch(keys, params), batch(keys, params)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = make_params(CANONICAL.replace(**{"classes.lam": [0.3, 0.7], "cluster.B": 8}), policy, 6,
                        horizon=50.0, warmup=5.0)[0]
    c = batch(jax.random.split(jax.random.key(1), 2), other)  # new numbers, same shapes: no retrace
    assert np.all(np.asarray(c.status) == 0) and np.all(np.asarray(c.decodes).sum(-1) <= 8)


def test_invalid_laws_and_engines_raise():
    with pytest.raises(ValueError, match="'prompt'.*exponential, deterministic, lognormal"):
        ServiceLaw("gamma")
    with pytest.raises(ValueError, match="'output'"):
        ServiceLaw("deterministic", "pareto")
    with pytest.raises(ValueError, match="'cv'"):
        ServiceLaw("lognormal", "lognormal", cv=0.0)
    with pytest.raises(ValueError, match="'service'.*lognormal"):
        ServiceLaw.of("weibull")
    with pytest.raises(ValueError, match="'service'"):
        run(CANONICAL, "gg-sp", n=5, replicas=2, horizon=10.0, service=3)
    with pytest.raises(ValueError, match="'service'"):
        run(CANONICAL, "gg-sp", n=5, replicas=2, horizon=10.0, engine="stepped", service="deterministic")
    with pytest.raises(ValueError, match="'service'"):
        single_runner("stepped", 0.02, service="lognormal")
    with pytest.raises(ValueError, match="'max_batch'"):
        GeneralSpec(2, 5, max_batch=0)
    with pytest.raises(ValueError, match="'dt'"):
        single_runner("general", 0.02)
    # a string means that law for both phases; exponential is the default
    assert ServiceLaw.of("deterministic") == ServiceLaw("deterministic", "deterministic")
    assert ServiceLaw.of(None).is_exponential and not ServiceLaw.of("lognormal").is_exponential


def test_too_few_slots_is_reported_not_raised():
    """max_batch below the scenario's B: a decode that finds no slot raises a status bit."""
    policy = get_policy("fi-wsp")
    params, _, _ = make_params(CANONICAL, policy, 2, horizon=200.0, warmup=0.0)
    state, _ = simulate(jax.random.split(jax.random.key(0), 2), params, GeneralSpec(2, 2, room=128, max_batch=2),
                        policy, law="deterministic")
    assert np.all(np.asarray(state.status) & CAPACITY_VIOLATED)


def test_single_runner_general():
    fn = single_runner("general", service="deterministic")
    policy = get_policy("gg-sp")
    params, _, _ = make_params(CANONICAL, policy, 4, horizon=20.0, warmup=0.0)
    state, _ = fn(jax.random.key(0), params, GeneralSpec(2, 4, room=64, max_batch=16), policy)
    assert float(state.t) == 20.0 and int(state.status) == 0
