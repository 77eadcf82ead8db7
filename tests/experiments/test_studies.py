"""The finite-n study commands run end to end at a tiny size: CSV rows appended as points finish,
sane values, and the convergence plot."""

import csv
import math

import jaxq
from jaxq.experiments.fluid_limit import main, plot_convergence


def test_convergence_study_writes_csv_and_plot(tmp_path):
    main(["convergence", "--policies", "gg-sp", "--ns", "4", "6", "--replicas", "2", "--horizon", "30",
          "--warmup", "5", "--out", str(tmp_path)])
    path = tmp_path / "convergence-canonical.csv"
    rows = list(csv.DictReader(path.open()))
    rev = [r for r in rows if r["metric"] == "revenue_bundled"]
    assert [int(r["n"]) for r in rev] == [4, 6]
    R = jaxq.load_scenario("canonical")
    for r in rev:
        assert 0 < float(r["mean"]) < float(r["lp_value"]) * 1.2 and math.isfinite(float(r["se"]))
        assert float(r["lo"]) <= float(r["mean"]) <= float(r["hi"])
    assert R.name == "canonical"
    png = plot_convergence([path], tmp_path / "fig.png")
    assert png.exists() and png.stat().st_size > 10_000
