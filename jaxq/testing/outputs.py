"""Checks of what a `jaxq reproduce` experiment writes (tidy CSVs, figures, the manifest), shared by
the experiments' tests."""

from __future__ import annotations

import csv
import json
import math


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def manifest(output):
    return json.loads((output.dir / "manifest.json").read_text())


def check_outputs(output, expected_files):
    m = manifest(output)
    assert m["complete"] is True and m["finished_at"]
    assert m["experiment"] == output.experiment and m["size"] == "smoke"
    for name in expected_files:
        assert name in m["files"], name
    for name in m["files"]:
        path = output.dir / name
        assert path.exists() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return m


def finite_estimates(table, metric):
    picked = [r for r in table if r["metric"] == metric]
    assert picked, metric
    for r in picked:
        mean, lo, hi = float(r["mean"]), float(r["lo"]), float(r["hi"])
        assert math.isfinite(mean) and lo <= mean <= hi, r
    return picked
