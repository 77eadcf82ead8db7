"""Steady-state LPs: MODEL.md §8 numbers, independent routes to the same optimum, SLI monotonicity,
shadow prices against finite differences, and clear reports of infeasible problems."""

import math

import numpy as np
import pytest
from scipy.optimize import linprog

import jaxq
from jaxq.lp import SLI, Bound, Penalty, build_lp, solve_bundled, solve_lp, solve_separate, solve_sli, static_plan, tpot_ratio
from jaxq.model import JobClasses


@pytest.fixture(scope="module")
def canonical():
    return jaxq.load_scenario("canonical")


# -- MODEL.md §8.1 and §8.2 ----------------------------------------------------------------------

def test_bundled_matches_model_md(canonical):
    sol = solve_bundled(canonical)
    assert sol.ok
    assert sol.value == pytest.approx(297.7032, rel=1e-4)
    np.testing.assert_allclose(sol.x, [0.018258, 0.194953], rtol=1e-4)
    np.testing.assert_allclose(sol.q_p, [0.317253, 0.0], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(sol.q_d, [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(sol.throughput, [0.468275, 0.5], rtol=1e-5)
    assert sol.tpot == pytest.approx(0.024285, rel=1e-4)
    # the loss against full service is exactly class 0's prefill abandonment
    assert 305.0 - sol.value == pytest.approx(0.1 * sol.q_p[0] * 230.0, rel=1e-9)
    assert static_plan(sol, canonical, 500).num_mixed == 107
    assert sol.prop_3_2


def test_separate_matches_model_md(canonical):
    sol = solve_separate(canonical)
    assert sol.ok
    assert sol.value == pytest.approx(298.5866, rel=1e-4)
    np.testing.assert_allclose(sol.x, [0.019495, 0.194953], rtol=1e-4)
    np.testing.assert_allclose(sol.q_p, [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(sol.q_d, [0.0, 0.80168], rtol=1e-4, atol=1e-9)
    assert static_plan(sol, canonical, 500).num_mixed == 108


def test_static_plan_targets(canonical):
    sol = solve_bundled(canonical)
    plan = static_plan(sol, canonical, 20)
    assert plan.num_mixed == math.ceil(20 * 0.213211)
    np.testing.assert_allclose(plan.q_p_target, 20 * sol.q_p)
    # p_s = mu_s y_s / (mu_m y_m + mu_s y_s); the y split is degenerate so check the identity, not numbers
    r = canonical.rates
    np.testing.assert_allclose(plan.p_solo * sol.throughput, r.mu_s * sol.y_s, rtol=1e-12)
    assert plan.fluid_mixed_fraction == pytest.approx(0.213211, rel=1e-5)
    with pytest.raises(ValueError, match="'n'"):
        static_plan(sol, canonical, 0)


# -- independent routes --------------------------------------------------------------------------

def reduced_lp_value(s):
    """EC Sec 8 reduced LP (52), written here from scratch: q_d eliminated, decode balance as <=,
    variables (x, y_m, y_s, q_p)."""
    num = s.num_classes
    r, B, w = s.rates, s.cluster.B, s.w
    nv = 4 * num
    X, YM, YS, QP = (slice(k * num, (k + 1) * num) for k in range(4))
    c = np.zeros(nv); c[YM] = -w * r.mu_m; c[YS] = -w * r.mu_s
    A_ub, b_ub = [], []
    row = np.zeros(nv); row[X] = 1; A_ub.append(row); b_ub.append(1)
    row = np.zeros(nv); row[YM] = 1; row[X] = -(B - 1); A_ub.append(row); b_ub.append(0)
    row = np.zeros(nv); row[YS] = 1; row[X] = B; A_ub.append(row); b_ub.append(B)
    A_eq, b_eq = [], []
    for i in range(num):
        row = np.zeros(nv); row[X.start + i] = -r.mu_p[i]; row[YM.start + i] = r.mu_m[i]; row[YS.start + i] = r.mu_s[i]
        A_ub.append(row); b_ub.append(0)
        row = np.zeros(nv); row[X.start + i] = r.mu_p[i]; row[QP.start + i] = s.classes.theta[i]
        A_eq.append(row); b_eq.append(s.classes.lam[i])
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, method="highs")
    assert res.status == 0
    return -res.fun


def random_scenario(rng, num):
    base = jaxq.load_scenario("canonical")
    return base.replace(
        classes=JobClasses(P=rng.uniform(200, 3000, num), D=rng.uniform(200, 3000, num),
                           lam=rng.uniform(0.25, 0.5, num), theta=rng.uniform(0.05, 0.5, num)),
        **{"timing.alpha": rng.uniform(0.015, 0.02), "timing.beta": 10 ** rng.uniform(-5, -3),
           "timing.gamma": rng.uniform(10, 50)},
    )


@pytest.mark.parametrize("seed", range(8))
def test_bundled_equals_reduced_lp(seed, canonical):
    s = canonical if seed == 0 else random_scenario(np.random.default_rng(seed), 1 + seed % 4)
    assert solve_bundled(s).value == pytest.approx(reduced_lp_value(s), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("lam", [0.05, 0.3, 2.0, 10.0])
def test_one_class_closed_form(lam, canonical):
    """One class: for fixed x the decode throughput is min(mu_p x, mu_m (B-1) x + mu_s B (1-x)); when
    gamma*tau > (B-1)/B the second term falls in x, so the optimum is full service if lam/mu_p is left
    of the crossing x_hat = mu_s B / (mu_p + mu_s B - mu_m (B-1)), else the crossing."""
    s = canonical.replace(classes=JobClasses(P=[1500.0], D=[700.0], lam=[lam], theta=[0.2]))
    r, B = s.rates, s.cluster.B
    mu_p, mu_m, mu_s = r.mu_p[0], r.mu_m[0], r.mu_s[0]
    assert mu_s * B > mu_m * (B - 1)
    x_hat = mu_s * B / (mu_p + mu_s * B - mu_m * (B - 1))
    x = min(lam / mu_p, x_hat, 1.0)
    expected = s.w[0] * mu_p * x
    sol = solve_bundled(s)
    assert sol.value == pytest.approx(expected, rel=1e-9)
    assert sol.x[0] == pytest.approx(x, rel=1e-7)


# -- SLIs ----------------------------------------------------------------------------------------

SLI_PATHS = {
    "prefill_fairness": np.linspace(0.25, 0.0, 11),
    "decode_fairness": np.linspace(12.0, 0.0, 13),
    "tpot": np.linspace(0.0250, 1 / 45.45 + 1e-5, 11),
}


@pytest.mark.parametrize("name", SLI_PATHS)
def test_tightening_never_raises_value(name, canonical):
    values = [solve_sli(canonical, **{name: Bound(eta)}).value for eta in SLI_PATHS[name]]
    assert all(np.isfinite(values))
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0]  # the tight end really costs something


@pytest.mark.parametrize("name,slack_eta", [("prefill_fairness", 0.5), ("decode_fairness", 20.0), ("tpot", 0.03)])
def test_slack_bound_leaves_value_unchanged(name, slack_eta, canonical):
    base = solve_bundled(canonical).value  # q_d* = 0 here (Prop 3.2), so imposing q_d = 0 costs nothing
    sol = solve_sli(canonical, **{name: Bound(slack_eta)})
    assert sol.value == pytest.approx(base, rel=1e-12)
    assert sol.shadow_prices[name] == pytest.approx(0.0, abs=1e-9)
    assert not sol.active[name]


@pytest.mark.parametrize("name,eta", [("prefill_fairness", 0.1), ("decode_fairness", 2.0), ("tpot", 0.0235)])
def test_sli_dual_matches_finite_difference(name, eta, canonical):
    sol = solve_sli(canonical, **{name: Bound(eta)})
    assert sol.active[name]
    h = 1e-6 * eta
    up = solve_sli(canonical, **{name: Bound(eta + h)}).value
    down = solve_sli(canonical, **{name: Bound(eta - h)}).value
    fd = (up - down) / (2 * h)
    assert sol.shadow_prices[name] > 0
    assert sol.shadow_prices[name] == pytest.approx(fd, rel=1e-3)


@pytest.mark.parametrize("row", ["mixed_capacity", "solo_capacity"])
def test_capacity_dual_matches_finite_difference(row, canonical):
    sol = solve_bundled(canonical)

    def value(delta):
        lp = build_lp(canonical, "bundled")
        k = lp.ub_names.index(row)
        lp.b_ub[k] += delta
        return -lp.solve().fun

    h = 1e-6
    fd = (value(h) - value(-h)) / (2 * h)
    assert sol.shadow_prices[row] == pytest.approx(fd, rel=1e-3)


@pytest.mark.parametrize("i", [0, 1])
def test_lambda_dual_matches_finite_difference(i, canonical):
    sol = solve_bundled(canonical)
    h = 1e-6

    def value(delta):
        lam = canonical.classes.lam.copy(); lam[i] += delta
        return solve_bundled(canonical.replace(**{"classes.lam": lam})).value

    fd = (value(h) - value(-h)) / (2 * h)
    assert sol.shadow_prices[f"lam[{i}]"] == pytest.approx(fd, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("weight", [1e3, 2e4, 1e5, 1e6])
def test_tpot_penalty_is_the_exact_maximum(weight, canonical):
    """V(X) - weight*TPOT(X) over a dense grid of X never beats the parametric search's answer, and the
    best grid point is within the grid's resolution of it."""
    sol = solve_sli(canonical, tpot=Penalty(weight))
    assert sol.ok
    assert sol.value == pytest.approx(sol.revenue - weight * sol.tpot, rel=1e-12)
    grid_best = -np.inf
    for X in np.linspace(0.0, 0.2132, 400):
        lp = build_lp(canonical, "bundled", q_d_zero=True)
        row = lp.zeros(); row[: canonical.num_classes] = 1
        lp.add_eq("total", row, X)
        res = lp.solve()
        if res.status == 0:
            grid_best = max(grid_best, -res.fun - weight * tpot_ratio(canonical, X))
    assert grid_best <= sol.value + 1e-9 * abs(sol.value)
    assert sol.value - grid_best <= 0.05 * (1 + weight * 1e-4)


def test_tpot_penalty_moves_x_when_heavy(canonical):
    light = solve_sli(canonical, tpot=Penalty(1e3))
    heavy = solve_sli(canonical, tpot=Penalty(1e6))
    assert heavy.x.sum() < light.x.sum() - 1e-3
    assert heavy.tpot < light.tpot


@pytest.mark.parametrize("name", ["prefill_fairness", "decode_fairness"])
def test_fairness_penalty_equals_best_bound(name, canonical):
    """max_z V(z) - w*g(z) = max_eta [V_bound(eta) - w*eta]: the penalty LP against a scan of bounds."""
    weight = 60.0 if name == "prefill_fairness" else 2.0
    sol = solve_sli(canonical, **{name: Penalty(weight)})
    etas = SLI_PATHS[name]
    scan = max(solve_sli(canonical, **{name: Bound(e)}).value - weight * e for e in np.linspace(etas[0], 0, 200))
    assert scan <= sol.value + 1e-9 * abs(sol.value)
    assert sol.value - scan < 0.02 * weight


# -- failures are reported, not garbage ------------------------------------------------------------

def test_infeasible_tpot_below_one_over_gamma(canonical):
    sol = solve_sli(canonical, tpot=Bound(0.5 / canonical.timing.gamma))
    assert sol.status == "infeasible" and not sol.ok
    assert "infeasible" in sol.message.lower()
    assert np.isnan(sol.value) and np.all(np.isnan(sol.x))
    with pytest.raises(ValueError, match="infeasible"):
        static_plan(sol, canonical)


def test_zero_patience_overload(canonical):
    s = canonical.replace(**{"classes.theta": [0.0, 0.0], "classes.lam": [5.0, 5.0]})
    strict = solve_bundled(s)
    assert strict.status == "infeasible"
    relaxed = solve_bundled(s, zero_patience="relax")
    assert relaxed.ok and np.all(relaxed.throughput <= s.classes.lam + 1e-9)
    light = canonical.replace(**{"classes.theta": [0.0, 0.0], "classes.lam": [0.1, 0.1]})
    assert solve_bundled(light).ok  # theta = 0 is fine when everyone can be served


def test_bad_sli_arguments(canonical):
    with pytest.raises(ValueError, match="'tpot.eta'"):
        solve_sli(canonical, tpot=Bound(float("nan")))
    with pytest.raises(ValueError, match="'prefill_fairness'"):
        SLI(prefill_fairness=0.1)
    with pytest.raises(ValueError, match="'objective'"):
        solve_lp(canonical, "auction")


def test_prop_3_2_reported(canonical):
    slow_solo = canonical.replace(**{"timing.gamma": 20.0})  # gamma*tau = 0.67 < 15/16
    assert not slow_solo.prop_3_2_holds()
    assert solve_bundled(slow_solo).prop_3_2 is False
