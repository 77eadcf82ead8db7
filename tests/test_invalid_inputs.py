"""Every bad input is one line on stderr naming the field, exit code 2, no traceback; the valid
neighbours of the bad inputs still run. Generated with hypothesis: scenario files (wrong types,
out-of-range values, missing and unknown keys, malformed TOML), argument sets of ``jaxq simulate``, and
sweep grids with bad axes. More than 200 invalid inputs in all, in well under a minute (nothing is
traced: every check comes before the engines)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxq.cli import main

BASE = tomllib.loads((Path(__file__).resolve().parents[1] / "jaxq" / "scenarios" / "canonical-v1.toml").read_text())
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# field -> kind: "int1" integer >= 1, "pos" real > 0, "vec+" per-class vector > 0, "vec0" per-class >= 0
FIELDS = {("cluster", "n"): "int1", ("cluster", "B"): "int1", ("cluster", "C"): "int1",
          ("timing", "alpha"): "pos", ("timing", "beta"): "pos", ("timing", "gamma"): "pos",
          ("classes", "P"): "vec+", ("classes", "D"): "vec+", ("classes", "lam"): "vec+", ("classes", "theta"): "vec0"}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def to_toml(data: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _copy():
    return {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}


def bad_value(kind):
    scalar_bad = st.sampled_from(["abc", True, [1.0], math.nan, math.inf, -math.inf])
    if kind == "int1":
        return st.one_of(scalar_bad, st.integers(-10**6, 0), st.sampled_from([0.5, 2.5, -3.0]))
    if kind == "pos":
        return st.one_of(scalar_bad, st.floats(-1e6, 0.0), st.just(0))
    elem_bad = st.sampled_from(["x", True, math.nan, math.inf]) | st.floats(-1e3, -1e-6)
    if kind == "vec+":
        elem_bad = elem_bad | st.just(0.0)
    return st.one_of(st.sampled_from(["abc", 1.0, [], [1.0], [1.0, 2.0, 3.0]]),
                     st.tuples(elem_bad, st.integers(0, 1)).map(lambda t: [t[0], 1.0] if t[1] == 0 else [1.0, t[0]]))


@st.composite
def invalid_scenarios(draw):
    """(TOML text, text the error must contain)."""
    data = _copy()
    how = draw(st.sampled_from(["value", "value", "value", "missing", "unknown", "malformed"]))
    if how == "value":
        (section, key), kind = draw(st.sampled_from(sorted(FIELDS.items())))
        data[section][key] = draw(bad_value(kind))
        return to_toml(data), f"{section}.{key}"
    if how == "missing":
        section, key = draw(st.sampled_from(sorted(FIELDS)))
        del data[section][key]
        return to_toml(data), key
    if how == "unknown":
        section = draw(st.sampled_from(["cluster", "timing", "classes", "prices"]))
        key = draw(st.sampled_from(["speed", "n_gpus", "Lam", "extra"]))
        data[section][key] = 1
        return to_toml(data), key
    text = to_toml(data)
    broken = draw(st.sampled_from(["[cluster\n", "n = = 3\n", 'name = "unterminated\n', "[classes]\nP = [1,\n"]))
    return broken + text, "TOML"


def _one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "error" in err, err
    assert needle in err, (needle, err)


@FAST
@given(case=invalid_scenarios())
def test_invalid_scenario_files(case, tmp_path_factory, capsys):
    text, needle = case
    path = tmp_path_factory.mktemp("sc") / "bad.toml"
    path.write_text(text)
    capsys.readouterr()
    _one_line_error(capsys, main(["lp", str(path)]), needle)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.floats(0.5, 1.5), n=st.integers(1, 2000))
def test_valid_neighbours_still_run(scale, n, tmp_path_factory, capsys):
    data = _copy()
    data["classes"]["lam"] = [v * scale for v in data["classes"]["lam"]]
    data["cluster"]["n"] = n
    path = tmp_path_factory.mktemp("sc") / "ok.toml"
    path.write_text(to_toml(data))
    capsys.readouterr()
    assert main(["lp", str(path)]) == 0
    assert "error" not in capsys.readouterr().err


SIMULATE_BAD = [
    (["--n", "0"], "'n'"), (["--n", "-3"], "'n'"), (["--n", "x"], "--n"), (["--n", "2.5"], "--n"),
    (["--replicas", "0"], "'replicas'"), (["--replicas", "many"], "--replicas"),
    (["--horizon", "0"], "'horizon'"), (["--horizon", "-5"], "'horizon'"), (["--horizon", "nan"], "'horizon'"),
    (["--horizon", "10", "--warmup", "20"], "'warmup'"), (["--warmup", "-1"], "'warmup'"),
    (["--engine", "quantum"], "--engine"), (["--policy", "nonsense"], "policy"),
    (["--policy", "missing_file.py:X"], "policy"), (["--policy", "os:path"], "policy"),
    (["--dt", "0.02"], "'dt'"), (["--engine", "stepped", "--dt", "-1"], "'dt'"),
    (["--engine", "stepped", "--dt", "5"], "dt"), (["--service", "gamma"], "--service"),
    (["--service", "lognormal", "--service-cv", "-1"], "cv"), (["--seed", "x"], "--seed"),
    (["--convention", "C"], "--convention"), (["--n", "3000000000"], "'n'"),
]


@pytest.mark.parametrize("argv, needle", SIMULATE_BAD)
def test_invalid_simulate_arguments(argv, needle, capsys):
    _one_line_error(capsys, main(["simulate", "canonical", *argv]), needle)


@FAST
@given(argv=st.lists(st.sampled_from(SIMULATE_BAD), min_size=1, max_size=3))
def test_invalid_simulate_argument_sets(argv, capsys):
    """Several bad arguments at once: still one line, naming one of them."""
    flat = [a for args, _ in argv for a in args]
    capsys.readouterr()
    rc = main(["simulate", "canonical", *flat])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err


GRID_BAD = [
    ('[grid]\n"cluster.speed" = [1, 2]\n', "cluster.speed"), ('[grid]\n"classes.lam" = []\n', "classes.lam"),
    ('[grid]\npolicy = ["gg-sp", "nope"]\n', "nope"), ('[grid]\n"cluster.n" = [0, 10]\n', "cluster.n"),
    ('[grid]\n"classes.lam" = "fast"\n', "classes.lam"), ('[base]\nreplicas = 0\n', "replicas"),
    ('[base]\nengine = "warp"\n', "engine"), ('[grid]\n"cluster.n" = [[1]]\n', "cluster.n"),
    ('[base]\nhorizon = -1.0\n', "horizon"), ('[grid]\nbogus = [1]\n', "bogus"),
]


@pytest.mark.parametrize("grid, needle", GRID_BAD)
def test_invalid_sweep_grids(grid, needle, tmp_path, capsys):
    path = tmp_path / "grid.toml"
    path.write_text('scenario = "canonical"\n' + grid)
    _one_line_error(capsys, main(["sweep", str(path), "--out", str(tmp_path / "out")]), needle)


OTHER_BAD = [
    (["reproduce", "nonsense"], "experiment"), (["reproduce", "convergence", "--size", "huge"], "--size"),
    (["tune", "canonical", "--steps", "0"], "'steps'"), (["tune", "canonical", "--lr", "0"], "'lr'"),
    (["tune", "canonical", "--objective", "speed"], "--objective"), (["tune", "canonical", "--perturb", "2"], "'perturb'"),
    (["fluid", "canonical", "--tol", "-1"], "'tol'"), (["fluid", "canonical", "--horizon", "0"], "'horizon'"),
    (["fluid", "canonical", "--points", "1"], "'points'"), (["fluid", "canonical", "--policy", "magic"], "--policy"),
    (["lp", "/nonexistent/dir/canonical.toml"], "no such file"), (["lp", "no-such-scenario"], "no-such-scenario"),
    (["simulate", "/nonexistent.toml"], "no such file"), (["sweep", "/nonexistent/grid.toml"], "grid"),
]


@pytest.mark.parametrize("argv, needle", OTHER_BAD)
def test_invalid_arguments_of_the_other_commands(argv, needle, capsys):
    _one_line_error(capsys, main(argv), needle)
