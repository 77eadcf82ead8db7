"""Steady-state linear programs of the fluid model (MODEL.md §4 and §6; paper eqs. 40-49).

Decision variables, per job class i and per GPU (fluid scale): x_i (prefill occupancy), y_m,i and
y_s,i (decodes on GPUs with / without a running prefill), q_p,i and q_d,i (prefill queue, decode
buffer). Every LP is solved with scipy's HiGHS (``scipy.optimize.linprog(method="highs")``).

Shadow prices are reported as derivatives of the optimal value (a maximum) with respect to the
constraint's natural parameter: the right-hand side for the capacity rows, lam_i for the prefill
balance, and the bound eta itself for an SLI (for the TPOT bound, eta enters the coefficient too,
so the envelope theorem gives y*(B - X*), see :func:`_sli_rows`).

The average-TPOT *penalty* (eq. 48) makes the objective linear minus linear-fractional. It depends on
the solution only through X = sum_i x_i, the LP value V(X) under the extra row sum x = X is concave
in X, and the penalty g(X) = eta' N(X)/(B - X) is convex on [0, 1] (N, B - X affine, and
N(0)+ B N' = B(B-1)(tau - 1/gamma) > 0 whenever tau > 1/gamma). So V - g is concave in one variable
and we maximise it exactly by bisection on the sign of a supergradient, V'(X) (the dual of the row
sum x = X, from HiGHS) minus g'(X): a parametric search, converged to 1e-13 in X.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Literal

import numpy as np
from scipy.optimize import linprog

from ..model.scenario import Scenario

Objective = Literal["bundled", "separate"]
_ROW_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Bound:
    """A hard SLI constraint g <= eta."""

    eta: float


@dataclasses.dataclass(frozen=True)
class Penalty:
    """An SLI penalty weight*g subtracted from the objective."""

    weight: float


SLITerm = Bound | Penalty | None


@dataclasses.dataclass(frozen=True)
class SLI:
    """Service-level constraints or penalties (MODEL.md §6). Any of them imposes q_d = 0.

    prefill_fairness: on max_{i,j} (x_i - x_j)        (eqs. 43, 44)
    decode_fairness:  on max_{i,j} (y_s,i - y_s,j)    (eqs. 45, 46)
    tpot:             on [tau (B-1) X + (B/gamma)(1-X)] / [(B-1) X + B (1-X)], X = sum x  (eqs. 47, 48)
    """

    prefill_fairness: SLITerm = None
    decode_fairness: SLITerm = None
    tpot: SLITerm = None

    def __post_init__(self):
        for name in ("prefill_fairness", "decode_fairness", "tpot"):
            term = getattr(self, name)
            if term is None:
                continue
            if not isinstance(term, (Bound, Penalty)):
                raise ValueError(f"invalid SLI field '{name}': must be Bound(eta), Penalty(weight) or None, got {term!r}")
            value = term.eta if isinstance(term, Bound) else term.weight
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                what = "eta" if isinstance(term, Bound) else "weight"
                raise ValueError(f"invalid SLI field '{name}.{what}': must be a finite number >= 0, got {value!r}")

    @property
    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in ("prefill_fairness", "decode_fairness", "tpot"))


@dataclasses.dataclass(frozen=True)
class LPSolution:
    """Result of a steady-state LP. When ``status != "optimal"`` every number is NaN and ``message``
    says why: no garbage numbers."""

    status: str
    message: str
    objective: str
    value: float  # optimal objective (revenue minus SLI penalties), per GPU per second
    revenue: float  # the revenue part alone
    x: np.ndarray
    y_m: np.ndarray
    y_s: np.ndarray
    q_p: np.ndarray
    q_d: np.ndarray
    shadow_prices: dict[str, float]
    slacks: dict[str, float]
    penalties: dict[str, float]
    tpot: float  # eq. 47 ratio at the solution
    prop_3_2: bool  # gamma*tau >= (B-1)/B

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    @property
    def active(self) -> dict[str, bool]:
        return {k: abs(s) <= 1e-7 for k, s in self.slacks.items()}

    @property
    def throughput(self) -> np.ndarray:
        """Per-class decode completions per GPU per second, mu_m y_m + mu_s y_s."""
        return self._mu_m * self.y_m + self._mu_s * self.y_s

    # set after construction (rates of the scenario) so throughput needs no scenario argument
    _mu_m: np.ndarray = dataclasses.field(default=None, repr=False)
    _mu_s: np.ndarray = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class _LP:
    """An LP in linprog's minimisation form, with named rows (for duals and slacks)."""

    c: np.ndarray  # maximise c @ z  (negated when solved)
    A_ub: list
    b_ub: list
    ub_names: list
    A_eq: list
    b_eq: list
    eq_names: list
    bounds: list
    num_vars: int

    def add_ub(self, name, row, rhs):
        self.A_ub.append(np.asarray(row, float)); self.b_ub.append(float(rhs)); self.ub_names.append(name)

    def add_eq(self, name, row, rhs):
        self.A_eq.append(np.asarray(row, float)); self.b_eq.append(float(rhs)); self.eq_names.append(name)

    def add_var(self, cost: float, bounds=(0, None)) -> int:
        """Append a variable; returns its index (existing rows get a zero coefficient)."""
        self.c = np.append(self.c, cost)
        self.A_ub = [np.append(r, 0.0) for r in self.A_ub]
        self.A_eq = [np.append(r, 0.0) for r in self.A_eq]
        self.bounds.append(bounds)
        self.num_vars += 1
        return self.num_vars - 1

    def zeros(self):
        return np.zeros(self.num_vars)

    def solve(self):
        return linprog(
            -self.c,
            A_ub=np.array(self.A_ub) if self.A_ub else None,
            b_ub=np.array(self.b_ub) if self.b_ub else None,
            A_eq=np.array(self.A_eq) if self.A_eq else None,
            b_eq=np.array(self.b_eq) if self.b_eq else None,
            bounds=self.bounds,
            method="highs",
        )


def _indices(num_classes: int):
    i = np.arange(num_classes)
    return {"x": i, "y_m": i + num_classes, "y_s": i + 2 * num_classes, "q_p": i + 3 * num_classes,
            "q_d": i + 4 * num_classes}


def objective_coefficients(scenario: Scenario, objective: Objective) -> dict[str, np.ndarray]:
    """Per-variable revenue rates: bundled (eq. 40) pays w_i per decode completion; separate (eq. 42)
    pays c_p P_i per prefill completion and c_d D_i per decode completion."""
    r, P, D = scenario.rates, scenario.classes.P, scenario.classes.D
    c_p, c_d = scenario.pricing.c_p, scenario.pricing.c_d
    if objective == "bundled":
        w = scenario.w
        return {"x": np.zeros_like(P), "y_m": w * r.mu_m, "y_s": w * r.mu_s}
    if objective == "separate":
        return {"x": c_p * P * r.mu_p, "y_m": c_d * D * r.mu_m, "y_s": c_d * D * r.mu_s}
    raise ValueError(f"invalid LP field 'objective': must be 'bundled' or 'separate', got {objective!r}")


def build_lp(scenario: Scenario, objective: Objective = "bundled", *, q_d_zero: bool = False,
             zero_patience: Literal["strict", "relax"] = "strict") -> _LP:
    """The LP of eq. 40 (bundled) or eq. 42 (separate) with the shared feasible set.

    ``zero_patience``: with theta_i = 0 the balance rows are hard throughput constraints and the LP is
    infeasible when class i cannot all be served ("strict", the model as written); "relax" turns them
    into <= (the surplus is shed at admission), MODEL.md §4.1 [RECON].
    """
    if zero_patience not in ("strict", "relax"):
        raise ValueError(f"invalid LP field 'zero_patience': must be 'strict' or 'relax', got {zero_patience!r}")
    num = scenario.num_classes
    idx = _indices(num)
    r, lam, theta = scenario.rates, scenario.classes.lam, scenario.classes.theta
    B = float(scenario.cluster.B)
    coef = objective_coefficients(scenario, objective)
    c = np.zeros(5 * num)
    for k in ("x", "y_m", "y_s"):
        c[idx[k]] = coef[k]
    lp = _LP(c=c, A_ub=[], b_ub=[], ub_names=[], A_eq=[], b_eq=[], eq_names=[],
             bounds=[(0, None)] * (5 * num), num_vars=5 * num)
    if q_d_zero:
        for j in idx["q_d"]:
            lp.bounds[j] = (0, 0)
    row = lp.zeros(); row[idx["x"]] = 1
    lp.add_ub("prefill_capacity", row, 1.0)
    row = lp.zeros(); row[idx["y_m"]] = 1; row[idx["x"]] = -(B - 1)
    lp.add_ub("mixed_capacity", row, 0.0)
    row = lp.zeros(); row[idx["y_s"]] = 1; row[idx["x"]] = B
    lp.add_ub("solo_capacity", row, B)
    for i in range(num):
        relax = zero_patience == "relax" and theta[i] == 0
        row = lp.zeros(); row[idx["x"][i]] = r.mu_p[i]; row[idx["q_p"][i]] = theta[i]
        (lp.add_ub if relax else lp.add_eq)(f"prefill_balance[{i}]", row, lam[i])
        row = lp.zeros(); row[idx["x"][i]] = r.mu_p[i]; row[idx["q_d"][i]] = -theta[i]
        row[idx["y_m"][i]] = -r.mu_m[i]; row[idx["y_s"][i]] = -r.mu_s[i]
        if relax:
            lp.add_ub(f"decode_balance[{i}]", -row, 0.0)
        else:
            lp.add_eq(f"decode_balance[{i}]", row, 0.0)
    return lp


def tpot_ratio(scenario: Scenario, X):
    """Average TPOT of eq. 47 as a function of total prefill occupancy X (seconds per token)."""
    B, tau, gamma = float(scenario.cluster.B), scenario.tau, scenario.timing.gamma
    return (tau * (B - 1) * X + (B / gamma) * (1 - X)) / ((B - 1) * X + B * (1 - X))


def _pairs(num):
    return [(i, j) for i, j in itertools.permutations(range(num), 2)]


def _sli_rows(lp: _LP, scenario: Scenario, sli: SLI) -> dict:
    """Add the hard SLI rows and the penalty epigraph variables; returns bookkeeping for duals."""
    num = scenario.num_classes
    idx = _indices(num)
    info = {}
    for name, key in (("prefill_fairness", "x"), ("decode_fairness", "y_s")):
        term = getattr(sli, name)
        if term is None:
            continue
        t = None
        if isinstance(term, Penalty):
            t = lp.add_var(-term.weight)
            info[name] = ("penalty", t)
        rows = []
        for i, j in _pairs(num):
            row = lp.zeros(); row[idx[key][i]] = 1; row[idx[key][j]] = -1
            if t is None:
                lp.add_ub(f"{name}[{i},{j}]", row, term.eta)
            else:
                row[t] = -1
                lp.add_ub(f"{name}[{i},{j}]", row, 0.0)
            rows.append(f"{name}[{i},{j}]")
        if t is None:
            info[name] = ("bound", rows)
    if isinstance(sli.tpot, Bound):
        B, tau, gamma, eta = float(scenario.cluster.B), scenario.tau, scenario.timing.gamma, sli.tpot.eta
        row = lp.zeros(); row[idx["x"]] = tau * (B - 1) - B / gamma + eta
        lp.add_ub("tpot", row, eta * B - B / gamma)
        info["tpot"] = ("bound", ["tpot"])
    return info


def _failed(status: str, message: str, objective: str, num: int, prop: bool) -> LPSolution:
    nan = np.full(num, np.nan)
    return LPSolution(status=status, message=message, objective=objective, value=math.nan, revenue=math.nan,
                      x=nan, y_m=nan, y_s=nan, q_p=nan, q_d=nan, shadow_prices={}, slacks={}, penalties={},
                      tpot=math.nan, prop_3_2=prop)


_STATUS = {0: "optimal", 1: "iteration_limit", 2: "infeasible", 3: "unbounded", 4: "numerical_difficulties"}


def _run(lp: _LP, scenario: Scenario, objective: str, sli: SLI, info: dict, extra_shadow=None) -> LPSolution:
    num = scenario.num_classes
    res = lp.solve()
    prop = scenario.prop_3_2_holds()
    if res.status != 0:
        status = _STATUS.get(res.status, "failed")
        hint = {
            "infeasible": " (no steady state satisfies the constraints: check SLI bounds against their "
                          "minimum, or classes with theta = 0 whose load exceeds capacity)",
            "unbounded": " (the objective can grow without limit: check prices and rates)",
        }.get(status, "")
        return _failed(status, f"HiGHS: {res.message}{hint}", objective, num, prop)
    z = res.x
    idx = _indices(num)
    ub_dual = -np.asarray(res.ineqlin.marginals) if lp.A_ub else np.zeros(0)
    eq_dual = -np.asarray(res.eqlin.marginals) if lp.A_eq else np.zeros(0)
    ub_slack = np.asarray(res.ineqlin.residual) if lp.A_ub else np.zeros(0)
    duals = dict(zip(lp.ub_names, ub_dual)) | dict(zip(lp.eq_names, eq_dual))
    slacks = dict(zip(lp.ub_names, ub_slack))
    shadow = {k: float(duals[k]) for k in ("prefill_capacity", "mixed_capacity", "solo_capacity")}
    for i in range(num):
        shadow[f"lam[{i}]"] = float(duals[f"prefill_balance[{i}]"])
    X = float(z[idx["x"]].sum())
    penalties = {}
    for name, (kind, data) in info.items():
        if kind == "bound":
            price = sum(float(duals[r]) for r in data)
            if name == "tpot":
                price *= float(scenario.cluster.B) - X  # eta also multiplies X in the row
            shadow[name] = price
            slacks[name] = min(slacks.pop(r) for r in data)
        else:
            penalties[name] = float(-lp.c[data] * z[data])
    for r in list(slacks):
        if "[" in r and r.split("[")[0] in ("prefill_fairness", "decode_fairness"):
            slacks.pop(r)
    if extra_shadow:
        shadow.update(extra_shadow)
    revenue = float(lp.c[: 5 * num] @ z[: 5 * num])
    value = float(lp.c @ z)
    if isinstance(sli.tpot, Penalty):
        penalties["tpot"] = sli.tpot.weight * float(tpot_ratio(scenario, X))
        value -= penalties["tpot"]
    clean = lambda a: np.where(np.abs(a) < 1e-12, 0.0, a)  # noqa: E731  (HiGHS prints -0.0 and 1e-17)
    r = scenario.rates
    return LPSolution(
        status="optimal", message=res.message, objective=objective, value=value, revenue=revenue,
        x=clean(z[idx["x"]]), y_m=clean(z[idx["y_m"]]), y_s=clean(z[idx["y_s"]]), q_p=clean(z[idx["q_p"]]),
        q_d=clean(z[idx["q_d"]]), shadow_prices=shadow, slacks=slacks, penalties=penalties,
        tpot=float(tpot_ratio(scenario, X)), prop_3_2=prop, _mu_m=r.mu_m, _mu_s=r.mu_s,
    )


def solve_lp(scenario: Scenario, objective: Objective = "bundled", sli: SLI | None = None, *,
             zero_patience: Literal["strict", "relax"] = "strict") -> LPSolution:
    """Solve the bundled (eq. 40) or separate (eq. 42) LP, optionally with SLIs (eq. 49: q_d = 0
    imposed whenever an SLI is present)."""
    sli = sli or SLI()
    if not isinstance(sli, SLI):
        raise ValueError(f"invalid LP field 'sli': must be an SLI(...), got {sli!r}")
    lp = build_lp(scenario, objective, q_d_zero=sli.any, zero_patience=zero_patience)
    info = _sli_rows(lp, scenario, sli)
    if isinstance(sli.tpot, Penalty):
        return _solve_tpot_penalty(lp, scenario, objective, sli, info)
    return _run(lp, scenario, objective, sli, info)


def solve_bundled(scenario: Scenario, **kw) -> LPSolution:
    return solve_lp(scenario, "bundled", **kw)


def solve_separate(scenario: Scenario, **kw) -> LPSolution:
    return solve_lp(scenario, "separate", **kw)


def _solve_tpot_penalty(lp: _LP, scenario: Scenario, objective, sli: SLI, info) -> LPSolution:
    """Exact maximisation of V(X) - eta' g(X) by bisection on a supergradient (module docstring)."""
    num = scenario.num_classes
    idx = _indices(num)
    weight = sli.tpot.weight
    B, tau, gamma = float(scenario.cluster.B), scenario.tau, scenario.timing.gamma

    def g_prime(X):
        # d/dX of (a + b X)/(B - X) with a = B/gamma, b = tau (B-1) - B/gamma
        a, b = B / gamma, tau * (B - 1) - B / gamma
        return weight * (a + b * B) / (B - X) ** 2

    # Feasible range of X: two LPs with objective +-sum x on the same constraints.
    rng = []
    for sign in (-1.0, 1.0):
        probe = dataclasses.replace(lp, c=np.zeros(lp.num_vars), bounds=list(lp.bounds))
        probe.c[idx["x"]] = sign
        res = probe.solve()
        if res.status != 0:
            return _run(lp, scenario, objective, SLI(sli.prefill_fairness, sli.decode_fairness, None), info)
        rng.append(float(res.x[idx["x"]].sum()))
    lo, hi = rng

    def fixed(X):
        fx = dataclasses.replace(lp, A_eq=list(lp.A_eq), b_eq=list(lp.b_eq), eq_names=list(lp.eq_names))
        row = fx.zeros(); row[idx["x"]] = 1
        fx.add_eq("total_prefill", row, X)
        res = fx.solve()
        return fx, res

    def slope(X):
        _, res = fixed(X)
        return -float(res.eqlin.marginals[-1]) - g_prime(X)

    if hi - lo > 1e-13:
        if slope(lo) <= 0:
            hi = lo
        elif slope(hi) >= 0:
            lo = hi
        while hi - lo > 1e-13:
            mid = 0.5 * (lo + hi)
            if slope(mid) > 0:
                lo = mid
            else:
                hi = mid
    X_star = 0.5 * (lo + hi)
    fx, _ = fixed(X_star)
    sol = _run(fx, scenario, objective, sli, info)
    return sol


def solve_sli(scenario: Scenario, *, prefill_fairness: SLITerm = None, decode_fairness: SLITerm = None,
              tpot: SLITerm = None, objective: Objective = "bundled") -> LPSolution:
    """The SLI problem of eq. 49 (q_d = 0 imposed)."""
    return solve_lp(scenario, objective, SLI(prefill_fairness, decode_fairness, tpot))
