"""The JAX engine against the independent plain-Python reference simulator (jaxq.testing): every
per-class mean metric agrees within 4 combined standard errors, for every policy, on the canonical
instance at n = 20 and on a three-class instance. The default run covers three policies on the
canonical instance; ``--run-slow`` runs the whole matrix."""

import numpy as np
import pytest

import jaxq
from jaxq.metrics import estimate
from jaxq.model import JobClasses
from jaxq.api import run
from jaxq.testing.reference import PolicyTargets as RefTargets
from jaxq.testing.reference import replicate_reference

CANONICAL = jaxq.load_scenario("canonical")
THREE = CANONICAL.replace(classes=JobClasses(P=[300.0, 1500.0, 3000.0], D=[1000.0, 600.0, 300.0],
                                             lam=[0.3, 0.3, 0.3], theta=[0.1, 0.2, 0.1],
                                             names=["short-prompt", "middle", "long-prompt"]))
INSTANCES = {"canonical-n20": (CANONICAL, 20), "three-class-n12": (THREE, 12)}
REF_NAME = {"priority": "prioritize"}

# engine metric -> (reference metric, scale applied to the reference value)
PAIRS = {
    "throughput": ("rate_decode_completions", "per_gpu"),
    "prefill_rate": ("rate_prefill_completions", "per_gpu"),
    "admission_rate": ("rate_prefill_admissions", "per_gpu"),
    "q_p": ("avg_Q_p", "per_gpu"),
    "x": ("avg_X", "per_gpu"),
    "q_d": ("avg_Q_d", "per_gpu"),
    "y_m": ("avg_Y_m", "per_gpu"),
    "y_s": ("avg_Y_s", "per_gpu"),
    "abandon_prefill_fraction": ("frac_abandon_prefill", None),
    "wait_probability": ("frac_waited", None),
    "revenue_bundled": ("revenue_bundled", None),
    "revenue_separate": ("revenue_separate", None),
}


def compare(instance, policy, horizon=400.0, warmup=100.0, ref_seeds=32, replicas=48):
    scenario, n = INSTANCES[instance]
    ours = run(scenario, policy, n=n, replicas=replicas, horizon=horizon, warmup=warmup, seed=11)
    assert not ours.status
    sc = scenario.replace(**{"cluster.n": n})
    # the same static plan, handed to the reference through its own targets type
    from jaxq.lp import solve_lp, static_plan

    lp = solve_lp(sc, "separate" if policy == "priority" else "bundled")
    plan = static_plan(lp, sc, n)
    targets = RefTargets(num_mixed=plan.num_mixed, x_star=plan.x_target, q_p_star=lp.q_p, p_solo=plan.p_solo)
    ref = replicate_reference(sc, REF_NAME.get(policy, policy), targets, horizon=horizon, warmup=warmup,
                              seeds=ref_seeds, base_seed=1000)
    worst = (0.0, None)
    for ours_key, (ref_key, scale) in PAIRS.items():
        a = estimate(ours.metrics[ours_key])
        m, se = ref.mean[ref_key], ref.se[ref_key]
        if scale == "per_gpu":
            m, se = m / n, se / n
        combined = np.hypot(a.se, se)
        diff = np.abs(a.mean - m)
        ok = (diff <= 4 * combined) | ((diff < 1e-12) & (combined == 0))
        z = np.max(np.where(combined > 0, diff / np.where(combined > 0, combined, 1), 0))
        worst = max(worst, (float(z), ours_key))
        assert np.all(ok), f"{policy} {ours_key}: engine {a.mean} ± {a.se} vs reference {m} ± {se}"
    return worst


@pytest.mark.parametrize("policy", ["gg-sp", "sli", "fi-wsp"])
def test_engine_matches_reference_fast(policy):
    compare("canonical-n20", policy, horizon=300.0, warmup=60.0, ref_seeds=24, replicas=32)


@pytest.mark.slow
@pytest.mark.parametrize("instance", list(INSTANCES))
@pytest.mark.parametrize("policy", ["gg-sp", "priority", "sli", "fi-wsp", "gi-wsp", "gf-wsp", "fg-sp"])
def test_engine_matches_reference_full(instance, policy):
    compare(instance, policy)
