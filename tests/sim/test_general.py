"""The general-service engine: exponential laws reproduce the exact engine, the peer Ciw on M/D/c+M and
M/LN/c+M, per-slot consistency, deterministic lengths, the earliest-finish search, clear errors.
What every engine must do (conservation, determinism, compile counts) is in test_core.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.metrics import estimate
from jaxq.policies import get_policy
from jaxq.sim import SimSpec, engine_spec, run_replicas, runner
from jaxq.api import make_params, run
from jaxq.sim.general import ServiceLaw, draw_length, first_argmin, first_argmin_2d, phase_speeds, remaining_work
from jaxq.sim.state import ADMITTED, ARRIVED, CAPACITY_VIOLATED, DECODE_STARTED, INT_X, INT_YM, INT_YS
from jaxq.testing.checks import check_final_states
from jaxq.testing.peers import ciw_mgc_replicas
from jaxq.testing.scenarios import canonical, mmc_scenario

CANONICAL = canonical()
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

@pytest.mark.parametrize("name", ["gg-sp", pytest.param("fi-wsp", marks=pytest.mark.slow)])
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
    keys = jax.random.split(jax.random.key(5), 2)
    exact, _ = run_replicas(keys, params, engine_spec("exact", CANONICAL, 6, 128), policy)
    gen, _ = run_replicas(keys, params, engine_spec("general", CANONICAL, 6, 128), policy, engine="general",
                          service="deterministic")
    np.testing.assert_array_equal(np.asarray(exact.totals)[:, ARRIVED], np.asarray(gen.totals)[:, ARRIVED])


# -- 2. the peer: Ciw on M/G/c+M (the M/M/c+M special case of jaxq.testing.scenarios) ---------------

def ciw_service(law: ServiceLaw):
    import ciw

    if law.output == "deterministic":
        return ciw.dists.Deterministic(1.0)
    s2 = math.log1p(law.cv**2)  # Ciw's Lognormal takes the underlying normal's mean and sd
    return ciw.dists.Lognormal(-0.5 * s2, math.sqrt(s2))


@pytest.mark.parametrize("which", list(LAWS))
def test_ciw_agrees_on_the_mgc_special_case(which):
    pytest.importorskip("ciw")
    law = LAWS[which]
    c, lam, theta, T, W0 = 8, 7.6, 0.5, 1500.0, 150.0
    queue, thr = ciw_mgc_replicas(c, lam, theta, T, W0, seeds=range(16), service=ciw_service(law))
    res = run(mmc_scenario(c, lam, theta), "fi-wsp", n=c, replicas=16, horizon=T, warmup=W0, seed=3, room=512,
              service=law)
    assert res.engine == "general" and res.service == law and not res.status
    ours = {"queue": res.metrics["q_p"][:, 0] * c, "throughput": res.metrics["throughput"][:, 0] * c}
    for key, theirs in (("queue", queue), ("throughput", thr)):
        a, b = estimate(ours[key]), estimate(theirs)
        assert abs(a.mean - b.mean) <= 3 * np.hypot(a.se, b.se), (key, a, b)


# -- 3. per-slot work consistent with the per-GPU counts --------------------------------------------

@pytest.mark.parametrize("name", ["gg-sp", "sli", "fi-wsp", "gf-wsp"])
def test_per_slot_work_agrees_with_the_gpus(name):
    """Both non-exponential laws through one compiled program (the law is data): the shared checks,
    and the per-slot classes and finish times agree with the per-GPU counts (+inf exactly where nothing
    runs, remaining work never negative)."""
    policy = get_policy(name)
    n = 6
    params, _, _ = make_params(CANONICAL, policy, n, horizon=300.0, warmup=50.0)
    spec = engine_spec("general", CANONICAL, n, room=128)
    single = runner("general", spec, policy)
    laws = jax.tree_util.tree_map(lambda *a: jnp.repeat(jnp.stack(a), 2, axis=0), *[law.arrays() for law in LAWS.values()])
    keys = jnp.tile(jax.random.split(jax.random.key(1), 2), 2)
    state = jax.jit(jax.vmap(lambda k, law: single(k, params, law=law)[0]))(keys, laws)
    check_final_states(state, params, spec, policy, "general")
    jobs = state.gpus
    num = CANONICAL.num_classes
    cls, decodes, pre = np.asarray(jobs.decode_class), np.asarray(jobs.decodes), np.asarray(jobs.prefill_class)
    np.testing.assert_array_equal((cls[..., None] == np.arange(num)).sum(-2), decodes)
    np.testing.assert_array_equal(np.isinf(np.asarray(jobs.decode_finish)), cls < 0)
    np.testing.assert_array_equal(np.isinf(np.asarray(jobs.prefill_finish)), pre < 0)
    left_p, left_d = (np.asarray(a) for a in remaining_work(spec, params, state))
    assert np.all(left_d >= 0) and np.all(left_p >= 0) and np.all(left_d[cls < 0] == 0)


def test_deterministic_lengths_are_deterministic():
    """B = 1, one GPU, deterministic lengths: every prefill lasts P tau/C and every decode D/gamma
    (convention B: no prefill runs beside it), so Little's law on the counts gives them to within the
    jobs straddling the window's ends."""
    s = mmc_scenario(1, 0.2, 0.1).replace(**{"classes.P": [2560.0], "classes.D": [90.0]})
    res = run(s, "fi-wsp", n=1, replicas=2, horizon=2000.0, warmup=0.0, service="deterministic")
    assert not res.status
    integ, counts = np.asarray(res.state.integrals), np.asarray(res.state.counts)
    prefill_time = 2560.0 * s.tau / 256.0
    decode_time = 90.0 / s.timing.gamma
    np.testing.assert_allclose(integ[:, INT_X, 0] / counts[:, ADMITTED, 0], prefill_time, rtol=0.01)
    np.testing.assert_allclose((integ[:, INT_YM, 0] + integ[:, INT_YS, 0]) / counts[:, DECODE_STARTED, 0], decode_time,
                               rtol=0.01)


# -- 4. determinism, errors, failures as data --------------------------------------------------------

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
    policy = get_policy("gg-sp")
    with pytest.raises(ValueError, match="'service'"):
        runner("stepped", engine_spec("stepped", CANONICAL, 5), policy, service="lognormal")
    with pytest.raises(ValueError, match="'max_batch'"):
        SimSpec(2, 5, max_batch=0)
    with pytest.raises(ValueError, match="'max_batch'"):
        runner("general", SimSpec(2, 5), policy)
    with pytest.raises(ValueError, match="'dt'"):
        runner("general", engine_spec("general", CANONICAL, 5), policy, dt=0.02)
    # a string means that law for both phases; exponential is the default
    assert ServiceLaw.of("deterministic") == ServiceLaw("deterministic", "deterministic")
    assert ServiceLaw.of(None).is_exponential and not ServiceLaw.of("lognormal").is_exponential


def test_too_few_slots_is_reported_not_raised():
    """max_batch below the scenario's B: a decode that finds no slot raises a status bit."""
    policy = get_policy("fi-wsp")
    params, _, _ = make_params(CANONICAL, policy, 2, horizon=200.0, warmup=0.0)
    state, _ = run_replicas(jax.random.split(jax.random.key(0), 2), params, SimSpec(2, 2, room=128, max_batch=2),
                            policy, engine="general", service="deterministic")
    assert np.all(np.asarray(state.status) & CAPACITY_VIOLATED)


def test_first_argmin_matches_argmin_with_ties_and_infinities():
    """The earliest-finish search: the same index as argmin (the first minimum)."""
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 16), (7, 3), (500, 16)]:
        for _ in range(20):
            x = rng.integers(0, 4, shape).astype(float)  # many ties
            x[rng.random(shape) < 0.5] = np.inf
            if rng.random() < 0.2:
                x[:] = np.inf  # nothing running: argmin gives 0
            row, col = (int(v) for v in first_argmin_2d(jnp.asarray(x)))
            assert (row, col) == divmod(int(np.argmin(x.ravel())), shape[1])
            assert int(first_argmin(jnp.asarray(x[0]))) == int(np.argmin(x[0]))
