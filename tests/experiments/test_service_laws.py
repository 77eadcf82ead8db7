"""`jaxq reproduce service-laws` at the smoke size: files, a complete manifest, sane revenues."""

import csv
import json
import math

from jaxq.experiments.reproduce import reproduce


def test_service_laws_smoke(tmp_path):
    output = reproduce("service-laws", "smoke", tmp_path)
    d = tmp_path / "service-laws-smoke"
    for name in ("service-laws.csv", "cost.csv", "service-laws.png", "manifest.json"):
        assert (d / name).exists(), name
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert {c["name"] for c in manifest["claims"]} == {"GG-SP is still the best policy under each law",
                                                       "GG-SP's revenue under each law vs exponential"}
    assert manifest["numbers"]["flagged_replicas"] == 0
    rows = list(csv.DictReader((d / "service-laws.csv").open()))
    rev = [r for r in rows if r["metric"] in ("revenue_bundled", "revenue_normalized")]
    assert {r["law"] for r in rev} == {"exponential", "deterministic", "lognormal", "lognormal-cv2"}
    assert len(rev) == 2 * 4 * 2  # metrics x laws x policies
    for r in rev:
        assert math.isfinite(float(r["mean"])) and float(r["mean"]) > 0, r
        assert float(r["lo"]) <= float(r["mean"]) <= float(r["hi"])
    assert (d / "service-laws.png").stat().st_size > 10_000
    assert output.files == ["service-laws.csv", "cost.csv", "service-laws.png"]
