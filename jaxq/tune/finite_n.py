"""Simulation-based tuning of the gate-and-route targets at a finite n (docs/tuning.md §8).

The fluid tuner (:mod:`jaxq.tune.optimize`) works at n -> infinity. At finite n the paper's GG-SP
loses revenue the fluid cannot see (docs/finite-n.md: M = ceil(n sum x*) rounds up and the gate
spends the spare prefill capacity on the class that feeds the critically loaded decode stage). Here
the policy's parameters are chosen by maximising *simulated* revenue at the given n.

What is tuned
-------------
* **The gate's targets, as log-ratios.** :func:`jaxq.policies.occupancy_gate` admits
  argmin_i X_i / x_i*: it sees only the *direction* of x_target, so the common scale is exactly flat
  (with common random numbers a finite difference along it is exactly zero: a wasted evaluation). The
  coordinates are therefore u_j = log(x_j / x_j*) for the admissible classes other than a reference
  class (the first admissible one), whose target stays at x_ref*: ``x_target = x* exp(u)``, I_adm - 1
  numbers (one on the two-class canonical instance). Logs keep targets positive and put classes whose
  x* differ by 10x on the same step scale. Classes with x_i* = 0 stay excluded.
* **The integer M (mixed GPUs)** by a small search, M in {M* + o for o in ``m_offsets``} (default
  -2..+1 around the static plan's M* = ceil(n sum x*)), each evaluated at the start targets on one
  shared set of replica keys; the best mean is kept and the targets are tuned at it. No relaxation of
  M is attempted: it is an integer group size, and a 4-point search costs 4 evaluations.

The gradient estimate
---------------------
Central finite differences with common random numbers (``estimator="fd"``, the default), or SPSA
(``"spsa"``, Rademacher directions; two evaluations per step whatever the dimension). Not a pathwise
(reparametrisation) gradient: for a fixed sample path the revenue is piecewise *constant* in x_target
(the gate is an argmin; a small change flips no decision), so its pathwise derivative is zero almost
everywhere and says nothing about the slope of the mean. Not a likelihood ratio either: the policy is
deterministic, there is no score. Finite differences of the mean are what is left, and CRN is what
makes them usable: both sides of a difference run on the same replica keys (same arrivals, same
service draws in the engine's named streams), so the noise common to both cancels and the variance of
the difference is far below twice the variance of one revenue. Each step draws fresh keys (shared by
its +/- pair), so the noise of successive steps is independent and the averaged iterate does not
overfit one sample. With one coordinate (the canonical instance) FD and SPSA coincide.

optax Adam (cosine-decayed learning rate) takes the ascent steps on the estimate. The tuned point is
the average of the iterates over the second half of the path (Polyak-Ruppert averaging: the usual
remedy for stochastic-approximation noise; the best noisy iterate would carry a winner's-curse bias).

Validation (:func:`validate`) runs the tuned policy and the paper's GG-SP (its static plan) on *fresh*
keys, disjoint from every tuning key, on the same keys for both (CRN), and reports each policy's mean
with a 95% Student-t interval and the paired difference with its standard error and interval.

Candidates are evaluated one after another with the *same* compiled simulator
(:func:`jaxq.sim.batch.run_replicas` jits once per (engine, spec, policy, devices); new PolicyTargets
values are arguments, not constants, so they do not recompile).
"""

from __future__ import annotations

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from ..metrics.summary import replica_metrics, status_report
from ..model.scenario import Scenario
from ..policies import Policy, PolicyTargets, get_policy
from ..api import make_params
from ..sim.batch import run_replicas
from ..sim.batch import engine_spec
from ..sim.state import SimSpec

ESTIMATORS = ("fd", "spsa")
GATE_POLICIES = ("gg-sp", "gg-sp-hb")
DEFAULT_M_OFFSETS = (-2, -1, 0, 1)
# Key streams: tuning keys are fold_in(key(seed), _TUNE_TAG) (then the step, or _M_TAG for the M search);
# validation keys fold_in(key(seed), _VALIDATE_TAG): disjoint from every tuning key even for one seed.
_TUNE_TAG, _VALIDATE_TAG, _M_TAG = 0, 1, 2**30


def _check(name, value, ok, need):
    if not ok:
        raise ValueError(f"invalid field '{name}': {need}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A scenario at n under one gate policy, ready to simulate any targets (one compile, reused).

    ``revenue(keys, targets)`` returns the bundled revenue per GPU per second of each replica key.
    """

    scenario: Scenario
    n: int
    policy: Policy
    spec: SimSpec
    params: object  # SimParams of the static plan
    plan: object  # jaxq.lp.StaticPlan
    lp_value: float
    engine: str
    dt: float | None
    horizon: float
    warmup: float

    @classmethod
    def build(cls, scenario: Scenario, n: int, policy: str | Policy = "gg-sp", *, horizon: float,
              warmup: float, engine: str = "stepped", dt: float | None = None, lp_solution=None) -> Evaluator:
        name = policy if isinstance(policy, str) else getattr(policy, "name", None)
        _check("policy", name, name in GATE_POLICIES, f"must be one of {', '.join(GATE_POLICIES)} "
               "(the occupancy gate's targets are what is tuned)")
        pol = get_policy(policy) if isinstance(policy, str) else policy
        _check("policy", pol.name, pol.name in GATE_POLICIES, f"must be one of {', '.join(GATE_POLICIES)} "
               "(the occupancy gate's targets are what is tuned)")
        _check("n", n, isinstance(n, (int, np.integer)) and n >= 1, "must be an integer >= 1")
        _check("horizon", horizon, horizon > 0, "must be > 0")
        _check("warmup", warmup, 0 <= warmup < horizon, f"must satisfy 0 <= warmup < horizon = {horizon}")
        _check("engine", engine, engine in ("exact", "stepped"), "must be 'exact' or 'stepped'")
        _check("dt", dt, dt is None or engine == "stepped", "only the 'stepped' engine takes a step")
        if engine == "stepped":
            from ..sim import stepped

            dt = float(stepped.DEFAULT_DT if dt is None else dt)
            stepped.check_dt(scenario.params(), dt)
        params, lp, plan = make_params(scenario, pol, int(n), float(horizon), float(warmup), lp_solution=lp_solution)
        spec = engine_spec(engine, scenario, int(n))
        return cls(scenario=scenario.replace(**{"cluster.n": int(n)}), n=int(n), policy=pol, spec=spec,
                   params=params, plan=plan, lp_value=float(lp.value), engine=engine, dt=dt,
                   horizon=float(horizon), warmup=float(warmup))

    def targets(self, x_target=None, num_mixed=None) -> PolicyTargets:
        """The plan's targets with x_target and/or num_mixed replaced (same dtypes: no recompile)."""
        t = self.params.targets
        x = t.x_target if x_target is None else jnp.asarray(x_target, dtype=t.x_target.dtype)
        m = t.num_mixed if num_mixed is None else jnp.asarray(int(num_mixed), dtype=t.num_mixed.dtype)
        return eqx.tree_at(lambda p: (p.x_target, p.num_mixed), t, (x, m))

    def simulate(self, keys, targets: PolicyTargets):
        params = eqx.tree_at(lambda p: p.targets, self.params, targets)
        state, _ = run_replicas(keys, params, self.spec, self.policy, engine=self.engine, dt=self.dt)
        return state

    def revenue(self, keys, targets: PolicyTargets) -> np.ndarray:
        state = self.simulate(keys, targets)
        bad = status_report(state.status)
        if bad:
            raise RuntimeError(f"simulation reported failures {bad}: enlarge the waiting room or shorten the run")
        return replica_metrics(state, self.scenario, self.n, self.horizon, self.warmup)["revenue_bundled"]


def _keys(seed: int, tag: int, sub: int, replicas: int):
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), tag), sub), replicas)


def _coords(x_lp: np.ndarray):
    """(admissible classes, reference class, free classes) of the log-ratio coordinates."""
    adm = np.flatnonzero(x_lp > 0)
    if adm.size == 0:
        raise ValueError("invalid field 'x_target': the plan admits no class (all x_i* = 0); nothing to tune")
    return adm, int(adm[0]), adm[1:]


def x_from_coords(x_lp, u) -> np.ndarray:
    """x_target = x* exp(u) on the free classes; the reference class and excluded classes keep x*."""
    x_lp = np.asarray(x_lp, dtype=np.float64)
    _, _, free = _coords(x_lp)
    x = x_lp.copy()
    x[free] = x_lp[free] * np.exp(np.asarray(u, dtype=np.float64))
    return x


@dataclasses.dataclass(frozen=True)
class FiniteNResult:
    """Outcome of :func:`tune_finite_n`. ``path`` holds per-step arrays: ``u`` (steps + 1, d) the
    iterates, ``grad`` (steps, d) the estimates, ``revenue`` (steps,) the mean of each step's +/- runs
    (an estimate of the revenue near the iterate), ``diff_se`` (steps,) the standard error of the
    first coordinate's paired +/- difference. ``m_search`` maps each M tried to (mean, se)."""

    scenario: Scenario
    n: int
    policy: str
    engine: str
    dt: float | None
    horizon: float
    warmup: float
    replicas: int
    steps: int
    seed: int
    estimator: str
    learning_rate: float
    perturbation: float
    lp_value: float
    plan_num_mixed: int
    num_mixed: int
    x_lp: np.ndarray
    x_target: np.ndarray
    u: np.ndarray
    m_search: dict
    path: dict
    evaluations: int
    seconds: float
    evaluator: Evaluator = dataclasses.field(repr=False)

    @property
    def targets(self) -> PolicyTargets:
        return self.evaluator.targets(self.x_target, self.num_mixed)

    def summary(self) -> dict:
        return {"scenario": self.scenario.name, "n": self.n, "policy": self.policy, "engine": self.engine,
                "dt": self.dt, "horizon": self.horizon, "warmup": self.warmup, "replicas": self.replicas,
                "steps": self.steps, "seed": self.seed, "estimator": self.estimator,
                "learning_rate": self.learning_rate, "perturbation": self.perturbation, "lp_value": self.lp_value,
                "plan_num_mixed": self.plan_num_mixed, "num_mixed": self.num_mixed,
                "x_lp": self.x_lp.tolist(), "x_target": self.x_target.tolist(), "u": self.u.tolist(),
                "m_search": {str(k): list(v) for k, v in self.m_search.items()},
                "path": {k: np.asarray(v).tolist() for k, v in self.path.items()},
                "evaluations": self.evaluations, "seconds": self.seconds}


def tune_finite_n(scenario: Scenario, n: int, *, policy: str = "gg-sp", steps: int = 20, replicas: int = 8,
                  horizon: float = 300.0, warmup: float = 100.0, seed: int = 0, engine: str = "stepped",
                  dt: float | None = None, estimator: str = "fd", learning_rate: float = 0.1,
                  perturbation: float = 0.15, m_offsets=DEFAULT_M_OFFSETS, u0=None, log=None) -> FiniteNResult:
    """Maximise simulated bundled revenue at ``n`` over the gate's targets (log-ratio coordinates) and
    the integer M; see the module docstring. Every candidate of one step (the +/- pair of each
    difference, all M values of the search) runs on the same replica keys.

    ``perturbation`` is the finite-difference half-step c in log units (0.15: targets x 0.86 / x 1.16;
    the revenue of one path is a step function of the targets, so c must be large enough to flip many
    gate decisions). ``u0`` starts the targets elsewhere than the plan (default: at the plan, u = 0).
    ``m_offsets`` () keeps M at the plan. ``log`` (a callable taking a str) reports progress.
    """
    for name, v, ok, need in (("steps", steps, isinstance(steps, int) and steps >= 1, "must be an integer >= 1"),
                              ("replicas", replicas, isinstance(replicas, int) and replicas >= 2,
                               "must be an integer >= 2 (a standard error needs two)"),
                              ("estimator", estimator, estimator in ESTIMATORS, f"must be one of {', '.join(ESTIMATORS)}"),
                              ("learning_rate", learning_rate, learning_rate > 0, "must be > 0"),
                              ("perturbation", perturbation, 0 < perturbation <= 2, "must be in (0, 2]")):
        _check(name, v, ok, need)
    t0 = time.time()
    ev = Evaluator.build(scenario, n, policy, horizon=horizon, warmup=warmup, engine=engine, dt=dt)
    x_lp = np.asarray(ev.plan.x_target, dtype=np.float64)
    _, _, free = _coords(x_lp)
    d = free.size
    u = np.zeros(d) if u0 is None else np.asarray(u0, dtype=np.float64).reshape(-1)
    _check("u0", u0, u.shape == (d,) and np.all(np.isfinite(u)), f"must be {d} finite log-ratios (one per free class)")
    say = log or (lambda s: None)
    M0 = int(ev.plan.num_mixed)
    evaluations = 0

    # -- the integer M: a small search at the start targets, on one shared key set ----------------
    m_search = {}
    Ms = sorted({min(n, max(1, M0 + int(o))) for o in m_offsets})
    if Ms:
        keys = _keys(seed, _TUNE_TAG, _M_TAG, replicas)
        x0 = x_from_coords(x_lp, u)
        revs = {M: ev.revenue(keys, ev.targets(x0, M)) for M in Ms}
        evaluations += len(Ms)
        for M, r in revs.items():
            m_search[M] = (float(r.mean()), float(r.std(ddof=1) / math.sqrt(replicas)))
            say(f"  M = {M}: {m_search[M][0]:.3f} +- {m_search[M][1]:.3f}")
        M = max(m_search, key=lambda k: m_search[k][0])
    else:
        M = M0

    # -- Adam ascent on the CRN finite-difference estimate ------------------------------------------
    sched = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1)
    opt = optax.adam(sched)
    opt_state = opt.init(jnp.asarray(u))
    rng = np.random.default_rng(seed)
    path = {"u": [u.copy()], "grad": [], "revenue": [], "diff_se": []}
    c = float(perturbation)
    for k in range(steps):
        keys = _keys(seed, _TUNE_TAG, k, replicas)
        if estimator == "fd" or d == 0:
            dirs = np.eye(d)
        else:
            dirs = rng.choice([-1.0, 1.0], size=(1, d))
        grad, mids, ses = np.zeros(d), [], []
        for v in dirs:
            rp = ev.revenue(keys, ev.targets(x_from_coords(x_lp, u + c * v), M))
            rm = ev.revenue(keys, ev.targets(x_from_coords(x_lp, u - c * v), M))
            evaluations += 2
            diff = rp - rm
            g = float(diff.mean()) / (2 * c)
            grad += g * v if estimator == "fd" else g / v  # SPSA: g / v_j (v_j = +-1)
            mids.append(0.5 * float((rp + rm).mean()))
            ses.append(float(diff.std(ddof=1) / math.sqrt(replicas)))
        if d:
            updates, opt_state = opt.update(jnp.asarray(-grad), opt_state)  # ascent: minimise -revenue
            u = np.asarray(optax.apply_updates(jnp.asarray(u), updates))
        path["u"].append(u.copy())
        path["grad"].append(grad.copy())
        path["revenue"].append(float(np.mean(mids)) if mids else float("nan"))
        path["diff_se"].append(ses[0] if ses else float("nan"))
        say(f"  step {k:3d}: u = {np.array2string(u, precision=4)}, grad = {np.array2string(grad, precision=3)}, "
            f"revenue near iterate {path['revenue'][-1]:.3f}")
    U = np.asarray(path["u"])
    u_tuned = U[1 + steps // 2:].mean(axis=0) if steps >= 2 else U[-1]
    return FiniteNResult(
        scenario=scenario, n=int(n), policy=ev.policy.name, engine=engine, dt=ev.dt, horizon=float(horizon),
        warmup=float(warmup), replicas=replicas, steps=steps, seed=seed, estimator=estimator,
        learning_rate=float(learning_rate), perturbation=c, lp_value=ev.lp_value, plan_num_mixed=M0, num_mixed=int(M),
        x_lp=x_lp, x_target=x_from_coords(x_lp, u_tuned), u=np.asarray(u_tuned),
        m_search=m_search, path={"u": U, "grad": np.asarray(path["grad"]).reshape(steps, d),
                                 "revenue": np.asarray(path["revenue"]), "diff_se": np.asarray(path["diff_se"])},
        evaluations=evaluations, seconds=time.time() - t0, evaluator=ev)


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    se: float
    half_width: float  # of the 95% Student-t interval

    @property
    def ci(self) -> tuple[float, float]:
        return (self.mean - self.half_width, self.mean + self.half_width)

    @classmethod
    def of(cls, samples) -> Interval:
        s = np.asarray(samples, dtype=np.float64)
        se = float(s.std(ddof=1) / math.sqrt(s.size))
        return cls(float(s.mean()), se, float(stats.t.ppf(0.975, s.size - 1) * se))

    def __str__(self):
        return f"{self.mean:.3f} +- {self.half_width:.3f}"


@dataclasses.dataclass(frozen=True)
class Validation:
    """Fresh-seed comparison. ``revenue[name]`` per replica; ``estimate[name]`` mean and 95% CI;
    ``difference`` the paired tuned - baseline difference (same keys: CRN); ``significant`` whether its
    95% interval excludes 0; ``p_value`` of the paired two-sided t-test."""

    n: int
    replicas: int
    horizon: float
    warmup: float
    seed: int
    lp_value: float
    revenue: dict
    estimate: dict
    difference: Interval
    p_value: float
    seconds: float

    @property
    def significant(self) -> bool:
        lo, hi = self.difference.ci
        return lo > 0 or hi < 0


def validate(result: FiniteNResult, *, replicas: int = 16, horizon: float = 600.0, warmup: float = 150.0,
             seed: int | None = None, baseline: str = "gg-sp", extra=()) -> Validation:
    """Run the tuned policy and ``baseline`` (its own static plan; default the paper's GG-SP) on fresh
    keys fold_in(key(seed), 1) (default seed: the tuning seed + 1; tuning keys use the tag 0, so they
    never coincide), the same keys for every policy. ``extra`` names further policies run at their
    plans on the same keys (e.g. "gg-sp-hb") for reference."""
    _check("replicas", replicas, isinstance(replicas, int) and replicas >= 2, "must be an integer >= 2")
    seed = result.seed + 1 if seed is None else int(seed)
    t0 = time.time()
    keys = _keys(seed, _VALIDATE_TAG, 0, replicas)
    kw = {"horizon": horizon, "warmup": warmup, "engine": result.engine, "dt": result.dt}
    tuned_ev = Evaluator.build(result.scenario, result.n, result.evaluator.policy, **kw)
    revenue = {"tuned": tuned_ev.revenue(keys, tuned_ev.targets(result.x_target, result.num_mixed))}
    for name in (baseline, *extra):
        ev = tuned_ev if name == tuned_ev.policy.name else Evaluator.build(result.scenario, result.n, name, **kw)
        revenue[name] = ev.revenue(keys, ev.params.targets)
    diff = revenue["tuned"] - revenue[baseline]
    p = float(stats.ttest_1samp(diff, 0.0).pvalue) if np.std(diff) > 0 else (1.0 if np.all(diff == 0) else 0.0)
    return Validation(n=result.n, replicas=replicas, horizon=float(horizon), warmup=float(warmup), seed=seed,
                      lp_value=tuned_ev.lp_value, revenue=revenue,
                      estimate={k: Interval.of(v) for k, v in revenue.items()}, difference=Interval.of(diff),
                      p_value=p, seconds=time.time() - t0)
