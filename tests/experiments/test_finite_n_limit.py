"""The exact engine approaches the fluid / LP limit as n grows (MODEL.md §5, Thm 4.1 and 4.2).

Full-size numbers (n = 20 ... 2000, the n = 500 ordering, the trajectory at n = 2000) are produced by
``jaxq reproduce finite-n`` and recorded in docs/finite-n.md; these tests check the
claims at a size a CI machine can afford, and the heavy ones are marked slow."""

import numpy as np
import pytest

import jaxq
from jaxq.lp import solve_bundled, solve_separate
from jaxq.api import run

CANONICAL = jaxq.load_scenario("canonical")


def gap(res, value, metric="revenue_bundled"):
    est = res.summary[metric]
    return value - est.mean, est.se


def test_revenue_gap_shrinks_from_n20_to_n200():
    """Fast version of the fluid-limit check: the per-GPU revenue gap to R* at n = 200 is smaller
    than at n = 20 by more than 3 combined SE, and X/n approaches x*."""
    lp = solve_bundled(CANONICAL)
    small = run(CANONICAL, "gg-sp", n=20, replicas=16, horizon=400.0, warmup=100.0, seed=0)
    large = run(CANONICAL, "gg-sp", n=200, replicas=4, horizon=400.0, warmup=100.0, seed=1)
    (g20, s20), (g200, s200) = gap(small, lp.value), gap(large, lp.value)
    assert g20 - g200 > 3 * np.hypot(s20, s200), (g20, s20, g200, s200)
    err20 = np.abs(small.summary["x"].mean - lp.x).max()
    err200 = np.abs(large.summary["x"].mean - lp.x).max()
    assert err200 < err20


@pytest.mark.slow
def test_revenue_gap_at_n2000_smaller_than_at_n100():
    lp = solve_bundled(CANONICAL)
    r100 = run(CANONICAL, "gg-sp", n=100, replicas=8, horizon=400.0, warmup=100.0, seed=0)
    r2000 = run(CANONICAL, "gg-sp", n=2000, replicas=2, horizon=300.0, warmup=100.0, seed=1)
    (g100, s100), (g2000, s2000) = gap(r100, lp.value), gap(r2000, lp.value)
    assert g100 - g2000 > 3 * np.hypot(s100, s2000), (g100, s100, g2000, s2000)
    assert np.abs(r2000.summary["x"].mean - lp.x).max() < np.abs(r100.summary["x"].mean - lp.x).max()


@pytest.mark.slow
def test_prioritize_and_route_approaches_separate_lp():
    lp = solve_separate(CANONICAL)
    small = run(CANONICAL, "priority", n=20, replicas=16, horizon=400.0, warmup=100.0, seed=0)
    large = run(CANONICAL, "priority", n=500, replicas=2, horizon=300.0, warmup=100.0, seed=1)
    (g20, s20), (g500, s500) = (gap(r, lp.value, "revenue_separate") for r in (small, large))
    assert g20 - g500 > 3 * np.hypot(s20, s500)
    assert np.abs(large.summary["x"].mean - lp.x).max() < np.abs(small.summary["x"].mean - lp.x).max()
