"""`jaxq trace summary` and `jaxq trace fit`, through jaxq.cli.main: plots, a loadable scenario that
`jaxq lp` accepts, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from trace_helpers import write_generic

from jaxq.cli import main
from jaxq.model.config import load_scenario


def test_summary_on_the_azure_schema_fixture(three_class_file, tmp_path, capsys):
    path, (t, *_) = three_class_file
    out = tmp_path / "plots"
    assert main(["trace", "summary", str(path), "--out", str(out), "--bin", "30"]) == 0
    text = capsys.readouterr().out
    assert f"requests: {len(t):,}" in text and "azure schema" in text
    assert "rate per 30 s bin" in text and "rate per 5-minute bin" in text
    assert "correlation of log prompt and log output length" in text
    for name in ("rate.png", "lengths.png", "joint.png"):
        assert (out / name).stat().st_size > 1000
    assert f"in {out}/" in text


def test_fit_on_the_fixture_default_output_path(three_class_file, tmp_path, monkeypatch, capsys):
    path, _ = three_class_file
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "fit", str(path), "--classes", "auto", "--n", "20", "--prices", "0.2,0.4",
                 "--patience", "0.05", "--name", "three"]) == 0
    text = capsys.readouterr().out
    written = tmp_path / "results" / "trace-three" / "scenario-k3.toml"
    sc = load_scenario(written)
    assert sc.name == "three" and sc.num_classes == 3 and sc.cluster.n == 20
    assert (sc.pricing.c_p, sc.pricing.c_d) == (0.2, 0.4) and set(sc.classes.theta) == {0.05}
    assert "<- lowest BIC" in text and "records no abandonment" in text and "serves c1 100.0%" in text
    assert main(["lp", str(written)]) == 0


def test_summary_and_fits_on_the_azure_trace(azure_path, tmp_path, capsys):
    out = tmp_path / "azure"
    assert main(["trace", "summary", str(azure_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "requests: 19,366" in text and all((out / f).is_file() for f in ("rate.png", "lengths.png", "joint.png"))

    k3 = tmp_path / "k3.toml"
    assert main(["trace", "fit", str(azure_path), "--classes", "3", "--calibration", "qwen-8b", "--n", "100",
                 "--out", str(k3)]) == 0
    text = capsys.readouterr().out
    sc = load_scenario(k3)
    assert sc.num_classes == 3 and sc.classes.names == ("c1", "c2", "c3")
    assert list(sc.classes.P) == sorted(sc.classes.P)
    assert sum(sc.classes.lam) * 100 == pytest.approx(19_366 / 3501.72, rel=1e-4)  # all requests, per GPU
    assert "lam/GPU (1/s)" in text and "CV P" in text and "explain" in text
    assert main(["lp", str(k3)]) == 0

    auto = tmp_path / "auto.toml"
    assert main(["trace", "fit", str(azure_path), "--classes", "auto", "--n", "auto", "--out", str(auto)]) == 0
    text = capsys.readouterr().out
    sc = load_scenario(auto)
    assert 1 <= sc.num_classes <= 6 and "--n auto" in auto.read_text()
    assert main(["lp", str(auto)]) == 0


def test_drop_bad_prints_the_count(tmp_path, capsys):
    path = write_generic(tmp_path / "g.csv", [0.0, 1.0, 2.0, 3.0], [10, 20, 30, 40], [5, 6, 7, 8])
    path.write_text(path.read_text() + "x,1,1\n2.5,1,1\n")
    assert main(["trace", "summary", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 6, column 'arrival_s'" in err and str(path) in err
    assert main(["trace", "summary", str(path), "--out", str(tmp_path / "o"), "--drop-bad"]) == 0
    assert "dropped 2 bad rows of 6 (1 bad arrival_s, 1 arrival_s out of order)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--classes", "x", "--n", "4"], "--classes: must be an integer"),
    (["--classes", "0", "--n", "4"], "--classes: must be an integer"),
    (["--classes", "2", "--n", "many"], "--n: must be an integer >= 1 or 'auto'"),
    (["--classes", "2", "--n", "4", "--prices", "1"], "--prices: must be two numbers"),
    (["--classes", "2", "--n", "4", "--calibration", "no-such-scenario"], "unknown scenario"),
    (["--classes", "2", "--n", "4", "--patience", "-1"], "--patience"),
    (["--classes", "2", "--n", "4", "--B", "0"], "cluster.B"),
    (["--classes", "2", "--n", "4", "--out", "x.txt"], "must be a .toml file"),
    (["--classes", "labels", "--n", "4"], "class column"),
])
def test_fit_errors_are_one_line(three_class_file, tmp_path, monkeypatch, capsys, extra, match):
    path, _ = three_class_file
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "fit", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxq trace: error:") and err.count("\n") == 1 and match in err, err


def test_usage_errors(capsys):
    assert main(["trace"]) == 2
    assert main(["trace", "fit", "x.csv"]) == 2  # --classes and --n are required
    assert main(["trace", "summary", "--help"]) == 0
    assert "--drop-bad" in capsys.readouterr().out


def test_command_module_imports_no_model_or_lp():
    """`jaxq trace` loads the scenario code and the LP only when `fit` runs (jaxq itself imports JAX)."""
    code = "import sys, jaxq.traces.cli; print(sorted(m for m in sys.modules if m.startswith(('jaxq.model', 'jaxq.lp'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
