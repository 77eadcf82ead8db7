"""Scenario builders the tests and benchmarks share: special cases with closed forms or peers."""

from __future__ import annotations

from ..model.config import load_scenario
from ..model.scenario import JobClasses, Scenario


def canonical() -> Scenario:
    """The paper's canonical instance (MODEL.md §7.2)."""
    return load_scenario("canonical")


def mmc_scenario(c: int, lam_total: float, theta: float, base: Scenario | None = None) -> Scenario:
    """M/M/c+M through the general model: one class, B = 1 (each GPU is one server), a 1-token prompt
    (the prefill lasts tau/C = 1.3e-4 s on the canonical timing, a 1.3e-4 relative bias on the service
    time) and D = gamma (the decode lasts D/gamma, mean 1 s). Under FI-WSP the prefill queue is then the
    M/M/c+M queue (Erlang-A; Erlang-C at theta = 0)."""
    base = canonical() if base is None else base
    g = base.timing.gamma
    return base.replace(classes=JobClasses(P=[1.0], D=[g], lam=[lam_total / c], theta=[theta]),
                        **{"cluster.B": 1, "cluster.n": c})
