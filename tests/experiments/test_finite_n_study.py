"""`jaxq reproduce finite-n` at its smoke size: outputs exist and are sane (the quick size's numbers are in
docs/finite-n.md)."""

from __future__ import annotations

import math

import pytest

from jaxq.experiments.reproduce import reproduce
from jaxq.testing.outputs import check_outputs as _check_outputs
from jaxq.testing.outputs import finite_estimates as _finite_estimates
from jaxq.testing.outputs import rows as _rows


def test_finite_n_smoke(tmp_path):
    out = reproduce("finite-n", "smoke", tmp_path)
    m = _check_outputs(out, ["rounding.csv", "window.csv", "trajectory.csv", "finite-n-gap.png",
                             "finite-n-ordering.png", "finite-n-trajectory.png"])
    window = _rows(out.dir / "window.csv")
    gap = {(r["policy"], int(r["n"])) for r in window if r["study"] == "gap"}
    assert gap == {(p, n) for p in ("gg-sp", "gg-sp-hb", "priority") for n in (6, 10)}
    assert {r["policy"] for r in window if r["study"] == "ordering"} == {"gi-wsp"}  # the smoke size's one baseline
    for r in _finite_estimates(window, "revenue_bundled"):
        assert 0 < float(r["mean"]) < 305.0 + 1e-9  # never above the full-service revenue sum_i lam_i w_i
    # the rounding table is LP arithmetic: M = ceil(n sum x*), so the spare slot lies in [0, 1/n)
    for r in _rows(out.dir / "rounding.csv"):
        n, spare = int(r["n"]), float(r["spare_prefill_per_gpu"])
        assert 0 <= spare < 1 / n and float(r["decode_capacity"]) <= float(r["decode_capacity_fluid"]) + 1e-9
        assert 0 <= float(r["extra_class0_demand"]) <= float(r["extra_class0_demand_uncapped"]) + 1e-12
    traj = _rows(out.dir / "trajectory.csv")
    assert {r["variable"] for r in traj} == {"q_p", "x", "q_d", "y_mixgroup", "y_sologroup"}
    assert all(float(r["mean"]) >= 0 and math.isfinite(float(r["fluid_M_over_n"])) for r in traj)
    assert len(m["claims"]) == 6 and all(c["evidence"] for c in m["claims"])
    rounding = _rows(out.dir / "rounding.csv")
    assert all(0 < float(r["fluid_fraction_of_R_star"]) <= 1 + 1e-6 for r in rounding)


def test_rounding_matches_the_static_plan():
    """The finite-n study's rounding arithmetic against static_plan's M and the numbers docs/finite-n.md
    derives by hand (spare slot 0.00079 per GPU and +20.2 tokens/s at n = 500; capped at +31.7 below)."""
    import jaxq
    from jaxq.experiments.finite_n import rounding_rows
    from jaxq.lp import solve_bundled, static_plan

    scenario = jaxq.load_scenario("canonical")
    lp = solve_bundled(scenario)
    rows = {r["n"]: r for r in rounding_rows(scenario, lp, [20, 469, 500, 2000])}
    for n, r in rows.items():
        assert r["num_mixed"] == static_plan(lp, scenario, n=n).num_mixed
    assert rows[500]["spare_prefill_per_gpu"] == pytest.approx(0.00079, abs=5e-6)
    assert rows[500]["extra_class0_demand"] == pytest.approx(20.2, abs=0.05) and not rows[500]["capped"]
    assert rows[20]["capped"] and rows[20]["extra_class0_demand"] == pytest.approx(31.7, abs=0.05)
    # the fluid with m = M/n: the rounding costs 1.45% of R* at n = 500 and almost nothing at n = 469
    assert rows[500]["fluid_fraction_of_R_star"] == pytest.approx(0.98547, abs=2e-4)
    assert rows[469]["fluid_fraction_of_R_star"] > 0.9995
