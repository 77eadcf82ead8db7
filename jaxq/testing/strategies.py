"""Hypothesis strategies the tests share (hypothesis is a test dependency: import this module only
from tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from ..model.scenario import JobClasses, Scenario


def _pair(lo, hi):
    return st.lists(st.floats(lo, hi), min_size=2, max_size=2)


@st.composite
def two_class_scenarios(draw, base: Scenario, min_prompt: float = 300.0, max_batch: int = 6) -> Scenario:
    """Valid two-class variants of ``base`` (same shapes, so one compile per engine and policy): batch
    size 1..max_batch, rates, patience, prompt and output lengths and gamma drawn over wide ranges.
    ``min_prompt`` >= 300 keeps every phase slower than 1/dt at the stepped engine's default step."""
    return base.replace(classes=JobClasses(P=draw(_pair(min_prompt, 3000)), D=draw(_pair(20, 2000)),
                                           lam=draw(_pair(0.05, 2.0)), theta=draw(_pair(0.01, 2.0))),
                        **{"cluster.B": draw(st.integers(1, max_batch)), "timing.gamma": draw(st.floats(10, 60))})
