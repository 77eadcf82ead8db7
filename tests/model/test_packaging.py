"""Scenario lookup and what the wheel ships: a non-editable install must find its scenarios, and a
path that does not exist is an error, never a silent fallback to a bundled scenario."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxq.model.config import BUNDLED, list_scenarios, resolve_scenario_path

REPO = Path(__file__).resolve().parents[2]


def test_names_resolve_to_the_bundled_scenarios(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here
    assert resolve_scenario_path("canonical") == BUNDLED / "canonical-v1.toml"
    assert {"canonical-v1", "dolly15k-v1", "qwen-4b-v1", "qwen-8b-v1"} <= set(list_scenarios())


@pytest.mark.parametrize("bad", ["/nonexistent/dir/canonical.toml", "nonexistent/canonical", "missing.toml"])
def test_a_missing_path_is_an_error(bad):
    with pytest.raises(ValueError, match="no such file"):
        resolve_scenario_path(bad)


def test_a_directory_is_an_error(tmp_path):
    folder = tmp_path / "x.toml"
    folder.mkdir()
    with pytest.raises(ValueError, match="a directory"):
        resolve_scenario_path(folder)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"not one of .*canonical-v1"):
        resolve_scenario_path("no-such-scenario")


def test_cli_missing_path_exits_2(capsys):
    from jaxq.cli import main

    assert main(["lp", "/nonexistent/dir/canonical.toml"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_wheel_ships_the_scenarios(tmp_path):
    """Build the wheel, install it (no dependencies: they are this environment's) into a folder of its
    own, and from an unrelated directory list the scenarios and solve the canonical LP with it."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True)
    (wheel,) = wheels.glob("jaxq-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("JAXQ_CONFIG_PATH", None)
    code = ("import jaxq, sys; from jaxq.cli import main; assert jaxq.__file__.startswith(sys.argv[1]), jaxq.__file__; "
            "sys.exit(main(sys.argv[2:]))")
    run = subprocess.run([sys.executable, "-c", code, str(target), "scenarios"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(name in run.stdout for name in ("canonical", "qwen-8b", "qwen-4b", "dolly15k")), run.stdout
    run = subprocess.run([sys.executable, "-c", code, str(target), "lp", "canonical"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "297.703" in run.stdout, run.stdout
