"""The exact engine (one row per GPU): closed forms (Erlang-A, Erlang-C), the peer Ciw, float32 rates.
What every engine must do (conservation, determinism, compile counts) is in test_core.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.metrics import estimate
from jaxq.api import run
from jaxq.testing.closed_forms import erlang_a, erlang_c
from jaxq.testing.peers import ciw_mgc_replicas
from jaxq.testing.scenarios import canonical, mmc_scenario

CANONICAL = canonical()


# -- closed forms and the peer -------------------------------------------------------------------

def run_mmc(lam_total, c, theta, replicas=32, horizon=1500.0, warmup=150.0, seed=0):
    s = mmc_scenario(c, lam_total, theta)
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
    pytest.importorskip("ciw")
    c, lam, theta, T, W0 = 8, 7.6, 0.5, 1500.0, 150.0
    queue, thr = ciw_mgc_replicas(c, lam, theta, T, W0, seeds=range(12))
    sim = run_mmc(lam, c, theta, horizon=T, warmup=W0, seed=2)
    for ours, theirs in ((sim["queue"], queue), (sim["throughput"], thr)):
        a, b = estimate(ours), estimate(theirs)
        assert abs(a.mean - b.mean) <= 3 * np.hypot(a.se, b.se), (a, b)



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
