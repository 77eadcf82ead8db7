"""Tests of the reference simulator (jaxq.testing.reference) and the closed forms it is checked
against (jaxq.testing.closed_forms).

Statistical checks state k x SE, with SE the standard error across independent seeds (fixed seeds, so
the tests are deterministic). Tests marked ``slow`` run longer horizons / more seeds: ``--run-slow``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

import jaxq
from jaxq.testing import (
    POLICIES,
    PolicyTargets,
    benchmark_reference,
    erlang_a,
    erlang_c,
    replicate_reference,
    simulate_reference,
    stationary_distribution,
)
from jaxq.testing import reference as ref

K_SE = 3.0  # tolerance in standard errors for the statistical checks

# MODEL.md §8.1: the canonical instance's bundled-LP solution
X_STAR = [0.018258, 0.194953]
Q_P_STAR = [0.317253, 0.0]
Y_M = [0.0, 3.198172]
Y_S = [10.303073, 2.285544]


def canonical(n: int):
    return jaxq.load_scenario("canonical").replace(**{"cluster.n": n})


def canonical_targets(n: int) -> PolicyTargets:
    return PolicyTargets.from_plan(canonical(n), X_STAR, Q_P_STAR, y_m=Y_M, y_s=Y_S)


def mmc_scenario(c: int, lam_total: float, theta: float):
    """The M/M/c+M reduction: one class, B = 1, P = 1 token (prefill ~1.3e-4 s), D = gamma (mu_s = 1).
    Run it under FI-WSP: each GPU holds one job, which prefills and then decodes in the same slot."""
    base = jaxq.load_scenario("canonical")
    return base.replace(**{
        "cluster.n": c, "cluster.B": 1,
        "classes.P": [1.0], "classes.D": [base.timing.gamma], "classes.lam": [lam_total / c],
        "classes.theta": [theta], "classes.names": ("only",),
    })


def within(mean, se, target, k=K_SE):
    return abs(float(mean) - float(target)) <= k * float(se)


# ===================================================================================================
# Closed forms
# ===================================================================================================
@pytest.mark.parametrize("c,lam,mu", [(1, 0.5, 1.0), (2, 1.0, 1.0), (10, 8.0, 1.0), (50, 45.0, 1.0),
                                      (500, 480.0, 1.0), (7, 3.0, 0.5)])
def test_erlang_a_theta_to_zero_is_erlang_c(c, lam, mu):
    ec = erlang_c(c, lam, mu)
    assert erlang_a(c, lam, mu, 0.0) == ec
    ea = erlang_a(c, lam, mu, 1e-9)
    assert ea.p_wait == pytest.approx(ec.p_wait, rel=1e-6)
    assert ea.mean_queue == pytest.approx(ec.mean_queue, rel=1e-6)
    assert ea.p_abandon == pytest.approx(0.0, abs=1e-6)
    assert ea.throughput == pytest.approx(lam, rel=1e-6)


def test_erlang_c_requires_stability():
    with pytest.raises(ValueError, match="lam < c\\*mu"):
        erlang_c(3, 3.0, 1.0)
    with pytest.raises(ValueError, match="lam < c\\*mu"):
        erlang_a(3, 4.0, 1.0, 0.0)
    erlang_a(3, 4.0, 1.0, 0.1)  # with abandonment, any load is stable


def test_mm1_formulas():
    for rho in (0.1, 0.5, 0.9, 0.99):
        m = erlang_c(1, rho, 1.0)
        assert m.p_wait == pytest.approx(rho, rel=1e-12)
        assert m.mean_queue == pytest.approx(rho**2 / (1 - rho), rel=1e-10)
        assert m.mean_in_system == pytest.approx(rho / (1 - rho), rel=1e-10)
        assert m.mean_wait == pytest.approx(rho / (1 - rho), rel=1e-10)  # W_q = rho / (mu - lam)


def test_erlang_c_known_value():
    # c = 2, a = 1: P(wait) = (a^2/2)/(1-rho) / (1 + a + (a^2/2)/(1-rho)) = 1/3, E[Q] = P(wait) rho/(1-rho)
    m = erlang_c(2, 1.0, 1.0)
    assert m.p_wait == pytest.approx(1 / 3, rel=1e-12)
    assert m.mean_queue == pytest.approx(1 / 3, rel=1e-12)


def test_mm1_with_abandonment_direct_sum():
    # c = 1: pi_k proportional to lam^k / prod_{j=1..k} (mu + (j-1) theta); summed naively here
    lam, mu, theta = 1.3, 1.0, 0.4
    w, weights = 1.0, [1.0]
    for k in range(1, 400):
        w *= lam / (mu + (k - 1) * theta)
        weights.append(w)
    p = np.asarray(weights) / sum(weights)
    k = np.arange(len(p))
    m = erlang_a(1, lam, mu, theta)
    assert m.p_wait == pytest.approx(1 - p[0], rel=1e-12)
    assert m.mean_queue == pytest.approx(float((p * np.maximum(k - 1, 0)).sum()), rel=1e-10)
    assert m.throughput == pytest.approx(mu * (1 - p[0]), rel=1e-10)


@pytest.mark.parametrize("c,a", [(1, 0.7), (5, 4.0), (20, 30.0)])
def test_erlang_a_with_theta_equal_mu_is_poisson(c, a):
    # theta = mu makes every death rate k*mu: the M/M/infinity queue, N ~ Poisson(a)
    m = erlang_a(c, a, 1.0, 1.0)
    k = np.arange(0, 400)
    logp = k * math.log(a) - a - np.array([math.lgamma(x + 1) for x in k])
    p = np.exp(logp)
    assert m.p_wait == pytest.approx(float(p[c:].sum()), rel=1e-10)
    assert m.mean_queue == pytest.approx(float((p * np.maximum(k - c, 0)).sum()), rel=1e-9)
    assert m.mean_in_system == pytest.approx(a, rel=1e-10)


def test_erlang_a_identities_and_truncation():
    for c, lam, mu, theta in [(10, 10.0, 1.0, 0.3), (100, 120.0, 1.0, 0.05), (3, 0.5, 2.0, 5.0)]:
        m = erlang_a(c, lam, mu, theta)
        p = stationary_distribution(c, lam, mu, theta)
        assert p.sum() == pytest.approx(1.0, abs=1e-14)
        K = len(p) - 1
        r = lam / (c * mu + (K + 1 - c) * theta)  # the ratios decrease: the tail is below geometric
        assert K >= c and r < 1 and p[-1] * r / (1 - r) < 1e-16
        assert m.throughput == pytest.approx(mu * m.mean_busy, rel=1e-10)  # flow balance
        assert 0 <= m.p_abandon < 1 and 0 <= m.p_wait <= 1


# ===================================================================================================
# The reference simulator on the M/M/c+M reduction
# ===================================================================================================
def _check_against_erlang(c, lam, theta, horizon, warmup, seeds):
    sc = mmc_scenario(c, lam, theta)
    assert sc.rates.mu_s[0] == pytest.approx(1.0)
    rep = replicate_reference(sc, "fi-wsp", None, horizon=horizon, warmup=warmup, seeds=seeds)
    exact = erlang_a(c, lam, 1.0, theta)
    m, se = rep.mean, rep.se
    # bookkeeping of the reduction: no decode buffer, no decode next to a prefill (B = 1), and
    # "in service" = X + Y_s (a job in prefill holds its GPU)
    assert np.all(m["avg_Q_d"] == 0) and np.all(m["avg_Y_m"] == 0)
    busy = np.array([r.avg_X[0] + r.avg_Y_s[0] for r in rep.results])
    table = {
        "mean queue": (m["avg_Q_p"][0], se["avg_Q_p"][0], exact.mean_queue),
        "P(wait)": (m["frac_waited"][0], se["frac_waited"][0], exact.p_wait),
        "P(abandon)": (m["frac_abandon_prefill"][0], se["frac_abandon_prefill"][0], exact.p_abandon),
        "busy servers": (busy.mean(), busy.std(ddof=1) / math.sqrt(len(busy)), exact.mean_busy),
        "throughput": (m["rate_decode_completions"][0], se["rate_decode_completions"][0],
                       exact.throughput),
    }
    for name, (mean, s, target) in table.items():
        assert within(mean, s, target), f"{name}: simulated {mean:.5f} +- {s:.5f}, exact {target:.5f}"
    return table


def test_reference_matches_erlang_a():
    _check_against_erlang(c=10, lam=10.0, theta=0.3, horizon=1100.0, warmup=100.0, seeds=8)


def test_reference_matches_erlang_c():
    _check_against_erlang(c=10, lam=8.0, theta=0.0, horizon=1100.0, warmup=100.0, seeds=8)


@pytest.mark.slow
@pytest.mark.parametrize("c,lam,theta", [(1, 0.8, 0.0), (1, 1.2, 0.5), (10, 10.0, 0.3), (10, 8.0, 0.0),
                                         (50, 55.0, 0.5), (100, 100.0, 0.2)])
def test_reference_matches_erlang_long(c, lam, theta):
    horizon = 1.2e5 / (3 * lam)  # ~120k events per seed
    _check_against_erlang(c=c, lam=lam, theta=theta, horizon=horizon, warmup=horizon / 20, seeds=12)


# ===================================================================================================
# Invariants on random configurations, every policy, both conventions
# ===================================================================================================
def _random_case(case_seed: int):
    """A small random configuration: 1-3 classes, 1-6 GPUs, B in 1..4, some classes without patience
    (theta = 0) or without prefill target (x* = 0); cases 0-1 are light, the others heavier."""
    rng = np.random.default_rng(case_seed)
    I = int(rng.integers(1, 4))
    n = int(rng.integers(1, 7))
    B = int(rng.integers(1, 5))
    load = 0.3 if case_seed < 2 else 1.5
    lam = rng.uniform(0.1, load, I)
    theta = np.where(rng.random(I) < 0.3, 0.0, rng.uniform(0.05, 2.0, I))
    sc = jaxq.load_scenario("canonical").replace(**{
        "cluster.n": n, "cluster.B": B,
        "classes.P": rng.uniform(1.0, 3000.0, I), "classes.D": rng.uniform(5.0, 200.0, I),
        "classes.lam": lam, "classes.theta": theta, "classes.names": tuple(f"c{i}" for i in range(I)),
    })
    x_star = np.where(rng.random(I) < 0.2, 0.0, rng.uniform(0.01, 0.5, I))
    num_mixed = 0 if case_seed == 5 else int(rng.integers(1, n + 1))
    targets = PolicyTargets(num_mixed=num_mixed, x_star=x_star, q_p_star=rng.uniform(0, 1, I),
                            p_solo=rng.uniform(0, 1, I))
    horizon = 1500.0 / (3 * n * lam.sum())  # ~1500 events
    return sc, targets, horizon


@pytest.mark.parametrize("convention", ["B", "A"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case_seed", range(10))
def test_invariants_every_event(policy, convention, case_seed):
    sc, targets, horizon = _random_case(case_seed)
    res = simulate_reference(sc, policy, targets, horizon=horizon, warmup=horizon / 3, seed=case_seed,
                             convention=convention, debug=True)  # debug: checks after every event
    c = res.conservation
    assert np.all(c.balance() == 0)
    # the same balance over the window
    out = res.abandon_prefill + res.abandon_decode + res.decode_completions
    assert np.all(res.arrivals - out == res.final.in_system - res.in_system_at_warmup)
    f = res.final
    for grp, p, d in zip(f.gpu_group, f.gpu_prefill_class, f.gpu_decodes):
        cap = {"mix": sc.cluster.B - 1, "solo": sc.cluster.B, "any": sc.cluster.B - (p >= 0)}[grp]
        assert sum(d) <= cap
    if policy in ("fi-wsp", "gi-wsp"):
        assert np.all(f.Q_d == 0) and np.all(res.avg_Q_d == 0)
    if policy in ("gg-sp", "sli", "gi-wsp", "gf-wsp"):  # xi gate: x_i* = 0 classes never admitted
        assert np.all(res.conservation.prefill_completions[targets.x_star == 0] == 0)
        assert np.all(res.final.X[targets.x_star == 0] == 0)


@pytest.mark.parametrize("policy", POLICIES)
def test_invariants_canonical_small(policy):
    sc = canonical(8)
    tg = PolicyTargets.from_plan(sc, X_STAR, Q_P_STAR, y_m=Y_M, y_s=Y_S)
    res = simulate_reference(sc, policy, tg, horizon=60.0, warmup=10.0, seed=3, debug=True)
    assert np.all(res.conservation.balance() == 0)
    assert res.num_events > 500


def test_debug_mode_catches_a_capacity_violation(monkeypatch):
    sc, targets, horizon = canonical(4), canonical_targets(4), 50.0
    monkeypatch.setattr(ref._Sim, "has_free_decode_slot", lambda self, g: True)
    with pytest.raises(AssertionError):
        simulate_reference(sc, "gg-sp", targets, horizon=horizon, warmup=0.0, seed=0, debug=True)


def test_same_seed_same_result_and_seeds_differ():
    sc, tg = canonical(6), canonical_targets(6)
    a = simulate_reference(sc, "sli", tg, horizon=40.0, warmup=5.0, seed=11)
    b = simulate_reference(sc, "sli", tg, horizon=40.0, warmup=5.0, seed=11)
    c = simulate_reference(sc, "sli", tg, horizon=40.0, warmup=5.0, seed=12)
    assert a.num_events == b.num_events and np.array_equal(a.avg_Q_p, b.avg_Q_p)
    assert a.final.gpu_decodes == b.final.gpu_decodes
    assert a.num_events != c.num_events


def test_argument_validation():
    sc = canonical(4)
    tg = canonical_targets(4)
    with pytest.raises(ValueError, match="policy"):
        simulate_reference(sc, "nope", tg, horizon=1, warmup=0, seed=0)
    with pytest.raises(ValueError, match="convention"):
        simulate_reference(sc, "gg-sp", tg, horizon=1, warmup=0, seed=0, convention="C")
    with pytest.raises(ValueError, match="warmup"):
        simulate_reference(sc, "gg-sp", tg, horizon=1, warmup=1, seed=0)
    with pytest.raises(ValueError, match="needs targets"):
        simulate_reference(sc, "gg-sp", None, horizon=1, warmup=0, seed=0)
    with pytest.raises(ValueError, match="p_solo"):
        simulate_reference(sc, "sli", PolicyTargets(1, X_STAR, Q_P_STAR), horizon=1, warmup=0, seed=0)
    with pytest.raises(ValueError, match="num_mixed"):
        simulate_reference(sc, "gg-sp", PolicyTargets(5, X_STAR, Q_P_STAR), horizon=1, warmup=0, seed=0)
    with pytest.raises(ValueError, match="x_star"):
        PolicyTargets(1, [-1.0, 0.0], Q_P_STAR)


def test_targets_from_plan_match_model_md():
    assert canonical_targets(500).num_mixed == 107
    tg = canonical_targets(20)
    assert tg.num_mixed == 5
    r = canonical(20).rates
    expected = r.mu_s * np.array(Y_S) / (r.mu_m * np.array(Y_M) + r.mu_s * np.array(Y_S))
    np.testing.assert_allclose(tg.p_solo, expected)
    assert tg.p_solo[0] == 1.0
    np.testing.assert_allclose(tg.q_p_star, Q_P_STAR)


# ===================================================================================================
# The rules themselves, on hand-built states
# ===================================================================================================
class _FakeSim:
    def __init__(self, n, X, qp, x_star=None, q_p_star=None, ratio=None):
        self.n, self.I, self.X, self.qp, self.ratio = n, len(X), X, qp, ratio
        self.targets = PolicyTargets(0, x_star or [1.0] * len(X), q_p_star or [0.0] * len(X))


def test_gate_xi_rule():
    # xi = (X - n x*)/x*: class 0 (-1.0/0.1=-10) beats class 1 ((1-2)/0.2=-5)
    s = _FakeSim(10, X=[0, 1], qp=[[(0.0, 0)], [(0.0, 1)]], x_star=[0.1, 0.2])
    assert ref.gate_xi(s) == 0
    s.qp[0] = []  # only waiting classes count
    assert ref.gate_xi(s) == 1
    # a tie in xi goes to the larger Q_p - n q_p*
    s = _FakeSim(10, X=[1, 1], qp=[[(0.0, 0)], [(0.0, 1), (0.1, 2)]], x_star=[0.1, 0.1])
    assert ref.gate_xi(s) == 1
    s.targets = PolicyTargets(0, [0.1, 0.1], [0.0, 0.2])  # Qdagger_1 = 2: deviations 1 vs 0
    assert ref.gate_xi(s) == 0
    s.targets = PolicyTargets(0, [0.1, 0.1], [0.1, 0.2])  # deviations 0 vs 0: lowest index
    assert ref.gate_xi(s) == 0
    # x* = 0: never admitted, even alone
    s = _FakeSim(10, X=[0, 5], qp=[[(0.0, 0)], []], x_star=[0.0, 0.5])
    assert ref.gate_xi(s) is None


def test_gate_priority_and_fcfs_rules():
    s = _FakeSim(4, X=[0, 0, 0], qp=[[(3.0, 0)], [(1.0, 1)], [(2.0, 2)]], ratio=[3.0, 0.1, 3.0])
    assert ref.gate_priority(s) == 0  # largest D/P, tie to the lowest index
    s.qp[0] = []
    assert ref.gate_priority(s) == 2
    s = _FakeSim(4, X=[0, 0, 0], qp=[[(3.0, 0)], [(1.0, 1)], [(2.0, 2)]], ratio=[3.0, 0.1, 3.0])
    assert ref.gate_fcfs(s) == 1  # earliest arrival across classes
    s.qp = [[], [], []]
    assert ref.gate_fcfs(s) is None and ref.gate_priority(s) is None


def _sim(policy, n, B, num_mixed, p_solo=None, convention="B", I=1):
    sc = canonical(n).replace(**{"cluster.B": B})
    if I == 1:
        sc = sc.replace(**{"classes.P": [300.0], "classes.D": [1000.0], "classes.lam": [0.5],
                           "classes.theta": [0.1], "classes.names": ("a",)})
    tg = PolicyTargets(num_mixed, [0.5] * I, [0.0] * I, p_solo=p_solo)
    opts = dict(prefill_gpu="uniform", gf_decode_placement="uniform", wsp_max_prefills=None)
    return ref._Sim(sc, ref._RULES[policy](), tg, convention, random.Random(0), 0.0, opts)


def test_greedy_router_solo_first_then_mixed_then_buffer():
    s = _sim("gg-sp", n=3, B=2, num_mixed=1)  # GPU 0 mix (1 decode slot), GPUs 1, 2 solo (2 each)
    s.add_decode(1, 0)
    s.add_decode(1, 0)  # GPU 1 full
    for _ in range(4):
        s.enter_buffer("shared", 0)
    s.rule.dispatch(s)
    assert s.dec == [[1], [2], [2]]  # solo GPU 2 filled first (2), then the mixed GPU (1)
    assert len(s.buffers["shared"][0]) == 1  # the last one waits
    s.remove_decode(2, 0)
    s.rule.dispatch(s)  # a freed slot takes the buffer's head
    assert s.dec == [[1], [2], [2]] and len(s.buffers["shared"][0]) == 0


def test_static_gate_fills_only_mixed_prefill_slots():
    s = _sim("gg-sp", n=4, B=3, num_mixed=2)
    for k in range(5):
        s.qp[0].append((0.0, k))
    s.rule.dispatch(s)
    assert s.pf == [0, 0, -1, -1] and len(s.qp[0]) == 3


def test_sli_router_uses_the_drawn_group_only():
    s = _sim("sli", n=3, B=2, num_mixed=1, p_solo=[0.0])  # always target G_mix
    for _ in range(3):
        s.rule.on_prefill_completion(s, 0, 0)
    s.rule.dispatch(s)
    assert s.dec == [[1], [0], [0]]  # the solo GPUs stay empty
    assert len(s.buffers["mix"][0]) == 2 and len(s.buffers["solo"][0]) == 0
    s = _sim("sli", n=3, B=2, num_mixed=1, p_solo=[1.0])  # always target G_solo
    for _ in range(5):
        s.rule.on_prefill_completion(s, 0, 0)
    s.rule.dispatch(s)
    assert s.dec == [[0], [2], [2]] and len(s.buffers["solo"][0]) == 1


def test_coupled_immediate_keeps_decode_on_its_gpu():
    s = _sim("fi-wsp", n=3, B=2, num_mixed=0)
    s.qp[0].append((0.0, 0))
    s.rule.dispatch(s)
    (g,) = [h for h in range(3) if s.pf[h] == 0]
    s.t = 1.0
    ref._apply_event(s, "prefill_completion", 0, None)
    assert s.dec[g] == [1] and s.pf[g] == -1 and sum(map(sum, s.dec)) == 1


def test_gf_wsp_is_prefill_first():
    s = _sim("gf-wsp", n=1, B=2, num_mixed=0)
    s.add_decode(0, 0)  # one free slot left on the only GPU
    s.enter_buffer("shared", 0)  # a waiting decode...
    s.qp[0].append((0.0, 0))  # ... and a waiting prefill
    s.rule.dispatch(s)
    assert s.pf == [0] and s.dec == [[1]] and len(s.buffers["shared"][0]) == 1


def test_conventions_decode_rate():
    for conv, expect in (("B", [False, False]), ("A", [True, False])):
        s = _sim("gg-sp", n=2, B=2, num_mixed=1, convention=conv)
        assert [s.is_slow(g) for g in range(2)] == expect  # no prefill running anywhere
    s = _sim("gg-sp", n=2, B=2, num_mixed=1, convention="B")
    s.add_decode(0, 0)
    s.start_prefill(0, 0)
    assert s.is_slow(0) and s.Yslow == [1] and s.Ym == [1] and s.Ys == [0]
    s.finish_prefill(0)
    assert not s.is_slow(0) and s.Yfast == [1] and s.Ys == [1]
    s = _sim("gg-sp", n=2, B=2, num_mixed=1, convention="A")
    s.add_decode(0, 0)
    assert s.Yslow == [1] and s.Ys == [1]  # slow rate, but reported as Y_s (no prefill running)


# ===================================================================================================
# Little's law and rate identities on the canonical instance
# ===================================================================================================
def _little_checks(n, horizon, warmup, seeds, policy="gg-sp"):
    sc, tg = canonical(n), canonical_targets(n)
    rep = replicate_reference(sc, policy, tg, horizon=horizon, warmup=warmup, seeds=seeds)
    mu_p, theta = sc.rates.mu_p, sc.classes.theta
    diffs = {
        # Little on the prefill stage: L = lambda * W with W = 1/mu_p
        "X": [r.avg_X - r.prefill_admissions / r.window / mu_p for r in rep.results],
        # each waiting job abandons at rate theta: abandonment rate = theta * E[Q_p]
        "abandon": [r.abandon_prefill / r.window - theta * r.avg_Q_p for r in rep.results],
        # Little on the prefill queue with the measured waits (edge effects only)
        "Q_p": [r.avg_Q_p - r.prefill_wait_sum / r.window for r in rep.results],
    }
    for name, d in diffs.items():
        d = np.asarray(d)
        mean, se = d.mean(axis=0), d.std(axis=0, ddof=1) / math.sqrt(len(d))
        assert np.all(np.abs(mean) <= K_SE * se + 1e-12), f"{name}: {mean} vs SE {se}"
    return rep


def test_littles_law_canonical_n20():
    _little_checks(n=20, horizon=300.0, warmup=50.0, seeds=5)


@pytest.mark.slow
def test_gg_sp_canonical_n50_near_lp():
    """At n = 50 GG-SP should be within a few % of R* = 297.70 with X/n near x* (MODEL.md §8.3)."""
    rep = _little_checks(n=50, horizon=2000.0, warmup=300.0, seeds=4)
    assert abs(rep.mean["revenue_bundled"] - 297.7032) / 297.7032 < 0.05
    np.testing.assert_allclose(rep.mean["avg_X"] / 50, X_STAR, atol=0.03)


def test_benchmark_helper_runs():
    out = benchmark_reference(canonical(20), "gg-sp", canonical_targets(20), horizon=5.0)
    assert out["events"] > 0 and out["events_per_second"] > 0
