"""Tune policy parameters with optax (docs/tuning.md §5): Adam on the fluid fixed-point objective.

Each step evaluates the objective and its implicit gradient at the fixed point of the current
parameters (:func:`jaxq.tune.value_and_grad`, one compile), warm-started from the previous step's
fixed point, and applies one Adam update with a cosine-decayed learning rate. The path (value,
revenue, penalties, parameters, solver diagnostics per step) is recorded on the host.

The tuned parameters are the best *converged* iterate of the path: every evaluation is an exact
fixed point (not a noisy estimate), so keeping the best one is free.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..fluid.solve import empty_state, policy_params
from ..lp import Penalty, solve_bundled, solve_sli
from ..lp.steady_state import LPSolution
from ..model.scenario import Scenario
from .objectives import (
    DEFAULT_KIND,
    LP_PENALTY,
    PENALTIES,
    Evaluation,
    Objective,
    value_and_grad,
)
from .params import TunableParams
from .steady import check_kind

DEFAULT_STEPS = 150
DEFAULT_LEARNING_RATE = 0.2
DEFAULT_PERTURB = 0.25


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the LP says about an objective.

    lp             the LP solved for it (the SLI problem of eq. 49 with the penalty, or the bundled LP
                   for revenue and for the latency penalty, which no LP expresses)
    lp_value       the LP's optimal penalised value (None for latency)
    params         the LP's own policy parameters (static plan of ``lp``) as tunable coordinates
    fluid          the fluid objective at those parameters (:class:`Evaluation`)
    """

    lp: LPSolution
    lp_value: float | None
    params: TunableParams
    admissible: np.ndarray
    fluid: Evaluation

    @property
    def value(self) -> float:
        """The LP-based answer the tuned value is compared with: the LP optimum where an LP expresses
        the objective, else the fluid objective under the LP's (bundled) policy."""
        return self.lp_value if self.lp_value is not None else float(self.fluid.value)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    scenario: str
    objective: Objective
    kind: str
    convention: str
    steps: int
    learning_rate: float
    perturb: float
    path: dict[str, np.ndarray]  # per evaluation k = 0..steps (k = steps: after the last update)
    best: int  # index into path of the tuned (best converged) iterate
    params: TunableParams
    start: TunableParams
    admissible: np.ndarray
    reference: Reference
    seconds: float
    model: object = dataclasses.field(repr=False, default=None)  # ModelParams, to show constrained values

    @property
    def value(self) -> float:
        return float(self.path["value"][self.best])

    @property
    def revenue(self) -> float:
        return float(self.path["revenue"][self.best])

    @property
    def rel_diff(self) -> float:
        """(tuned - reference) / |reference|: >= 0 means the tuned policy is at least as good."""
        ref = self.reference.value
        return (self.value - ref) / abs(ref) if ref != 0 else self.value - ref

    def summary(self) -> dict:
        """JSON-ready numbers."""
        v = lambda p, adm: {k: np.asarray(a).tolist() for k, a in p.values(self.model, adm).items()}
        ref = self.reference
        return {
            "scenario": self.scenario, "objective": self.objective.name, "weight": self.objective.weight,
            "kind": self.kind, "convention": self.convention, "steps": self.steps,
            "learning_rate": self.learning_rate, "perturb": self.perturb, "seconds": self.seconds,
            "tuned": {"value": self.value, "revenue": self.revenue, "step": self.best,
                      "penalties": dict(zip(PENALTIES, self.path["penalties"][self.best].tolist())),
                      "params": v(self.params, self.admissible)},
            "start": {"value": float(self.path["value"][0]), "params": v(self.start, self.admissible)},
            "lp": {"value": ref.lp_value, "revenue": ref.lp.revenue, "fluid_value": float(ref.fluid.value),
                   "fluid_revenue": float(ref.fluid.revenue), "params": v(ref.params, ref.admissible)},
            "reference_value": ref.value, "rel_diff": self.rel_diff,
            "path": {k: np.asarray(a).tolist() for k, a in self.path.items()},
        }


def lp_reference(scenario: Scenario, objective: Objective, kind: str, *, convention: str = "B") -> Reference:
    """Solve the objective's LP and evaluate the fluid objective at the LP's own policy parameters."""
    if objective.name in LP_PENALTY:
        lp = solve_sli(scenario, **{LP_PENALTY[objective.name]: Penalty(objective.weight)})
    else:
        lp = solve_bundled(scenario)
    if not lp.ok:
        raise ValueError(f"the {objective.name} LP is {lp.status}: {lp.message}")
    base = policy_params(kind, scenario, lp)
    raw = TunableParams.from_policy(base, scenario.params())
    info, _ = value_and_grad(raw, objective.weights(), scenario.params(), base, empty_state(scenario.num_classes),
                             kind=kind, convention=convention)
    lp_value = lp.value if objective.name in LP_PENALTY or objective.name == "revenue" else None
    return Reference(lp=lp, lp_value=lp_value, params=raw, admissible=np.asarray(base.admissible), fluid=info)


def default_optimizer(learning_rate: float = DEFAULT_LEARNING_RATE, steps: int = DEFAULT_STEPS, *, b2: float = 0.9,
                      final: float = 0.01) -> optax.GradientTransformation:
    """Adam (b2 = 0.9, docs/tuning.md §5) with a cosine decay to ``final`` x ``learning_rate``."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=final), b2=b2)


def _check_run(steps, learning_rate):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"invalid tune field 'steps': must be an integer >= 0, got {steps!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"invalid tune field 'learning_rate': must be a finite number > 0, got {learning_rate!r}")


def tune(scenario: Scenario, objective: Objective | str = "revenue", weight: float | None = None, *,
         kind: str | None = None, convention: str = "B", steps: int = DEFAULT_STEPS,
         learning_rate: float = DEFAULT_LEARNING_RATE, perturb: float = DEFAULT_PERTURB,
         start: TunableParams | None = None, optimizer: optax.GradientTransformation | None = None,
         callback=None) -> TuneResult:
    """Maximise ``objective`` (revenue minus ``weight`` x penalty at the fluid fixed point) over the
    policy's (mixed fraction, gate targets, router probabilities) with Adam.

    The policy kind defaults to "gate" (GG-SP), or "sli" (randomized router) for decode fairness.
    The start is the bundled LP's own parameters moved by ``perturb`` (:meth:`TunableParams.perturbed`)
    unless ``start`` is given; the tuner never sees the penalised LP's answer. ``callback(k, info)``
    is called after each evaluation (host side)."""
    if not isinstance(objective, Objective):
        objective = Objective(objective, weight)
    elif weight is not None:
        objective = Objective(objective.name, weight)
    kind = DEFAULT_KIND[objective.name] if kind is None else kind
    check_kind(kind, convention)
    _check_run(steps, learning_rate)
    t_start = time.perf_counter()
    model = scenario.params()
    base = policy_params(kind, scenario, solve_bundled(scenario))
    admissible = np.asarray(base.admissible)
    if start is None:
        start = TunableParams.from_policy(base, model).perturbed(model, perturb)
    reference = lp_reference(scenario, objective, kind, convention=convention)
    weights = objective.weights()
    if optimizer is None:
        optimizer = default_optimizer(learning_rate, steps)
    raw = start
    opt_state = optimizer.init(raw)
    y = empty_state(scenario.num_classes)
    rows = []
    for k in range(steps + 1):
        info, grad = value_and_grad(raw, weights, model, base, y, kind=kind, convention=convention)
        vals = raw.values(model, base.admissible)
        gnorm = float(optax.tree.norm(grad))
        rows.append({
            "value": float(info.value), "revenue": float(info.revenue), "penalties": np.asarray(info.penalties),
            "mixed_fraction": vals["mixed_fraction"], "x_target": vals["x_target"], "p_solo": vals["p_solo"],
            "solo_share": vals["solo_share"],
            "x": np.asarray(info.y.x), "q_p": np.asarray(info.y.q_p),
            "residual": float(info.residual), "converged": bool(info.converged), "t_end": float(info.t_end),
            "num_steps": int(info.num_steps), "grad_norm": gnorm,
            "raw": raw,
        })
        if callback is not None:
            callback(k, info)
        y = info.y  # warm start: the next fixed point is near this one
        if k == steps:
            break
        neg = jax.tree_util.tree_map(lambda g: -g, grad)  # optax minimises
        if not bool(info.converged) or not np.isfinite(gnorm):
            neg = jax.tree_util.tree_map(jnp.zeros_like, neg)  # do not step on an unreliable gradient
        updates, opt_state = optimizer.update(neg, opt_state, raw)
        raw = optax.apply_updates(raw, updates)
    path = {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0] if key != "raw"}
    score = np.where(path["converged"], path["value"], -np.inf)
    best = int(np.argmax(score)) if np.any(path["converged"]) else len(rows) - 1
    return TuneResult(
        scenario=scenario.name, objective=objective, kind=kind, convention=convention, steps=int(steps),
        learning_rate=float(learning_rate), perturb=float(perturb), path=path, best=best,
        params=rows[best]["raw"], start=start, admissible=admissible, reference=reference,
        seconds=time.perf_counter() - t_start, model=model,
    )


__all__ = ["DEFAULT_LEARNING_RATE", "DEFAULT_PERTURB", "DEFAULT_STEPS", "Reference", "TuneResult", "lp_reference",
           "tune"]
