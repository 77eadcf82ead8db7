"""Static planning (MODEL.md §4.3): turn an LP solution into the targets the policies use."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..model.scenario import Scenario
from .steady_state import LPSolution

# M = ceil(n * sum x*) must not round 107.000000000001 up to 108: HiGHS solutions carry ~1e-12 noise.
_CEIL_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """Targets for an n-GPU cluster from an LP solution.

    num_mixed      M = ceil(n sum_i x_i*): GPUs in G_mix (one slot reserved for prefill)
    x_target       x_i* (per GPU); the gate's occupancy targets are n x_i*
    q_p_target     Q-dagger_{P,i} = n q_p,i*  [RECON, MODEL.md §4.3], the gate's tie-break reference
    y_m_target, y_s_target   n y*_m,i, n y*_s,i (the SLI router's reference)
    p_solo         p_s,i = mu_s y_s* / (mu_m y_m* + mu_s y_s*), 1 when the denominator is 0 (§5.3)
    priority       D_i / P_i (prioritize-and-route admits the largest first)
    """

    n: int
    num_mixed: int
    x_target: np.ndarray
    q_p_target: np.ndarray
    y_m_target: np.ndarray
    y_s_target: np.ndarray
    p_solo: np.ndarray
    priority: np.ndarray

    @property
    def mixed_fraction(self) -> float:
        """M / n, the finite-n fraction of mixed GPUs."""
        return self.num_mixed / self.n

    @property
    def fluid_mixed_fraction(self) -> float:
        """sum_i x_i*, the n -> infinity limit of M / n."""
        return float(np.sum(self.x_target))


def static_plan(solution: LPSolution, scenario: Scenario, n: int | None = None) -> StaticPlan:
    """Static planning for ``n`` GPUs (default: the scenario's cluster.n)."""
    if not solution.ok:
        raise ValueError(f"cannot plan from an LP whose status is {solution.status!r}: {solution.message}")
    n = scenario.cluster.n if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"invalid planning field 'n': must be an integer >= 1, got {n!r}")
    total = float(np.sum(solution.x))
    num_mixed = min(int(n), max(0, math.ceil(n * total - _CEIL_SLACK)))
    r = scenario.rates
    dm, ds = r.mu_m * solution.y_m, r.mu_s * solution.y_s
    denom = dm + ds
    p_solo = np.where(denom > 0, ds / np.where(denom > 0, denom, 1.0), 1.0)
    return StaticPlan(
        n=int(n), num_mixed=num_mixed, x_target=solution.x.copy(), q_p_target=n * solution.q_p,
        y_m_target=n * solution.y_m, y_s_target=n * solution.y_s, p_solo=p_solo,
        priority=scenario.classes.D / scenario.classes.P,
    )
