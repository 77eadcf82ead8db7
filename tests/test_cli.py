"""The ``jaxq`` dispatcher: help without importing every command, one line for an interrupt or a
closed pipe, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxq import cli


def test_top_level_help_names_every_command_and_imports_no_command():
    code = ("import sys, jaxq.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('jaxq.') and m.count('.') > 1))\n"
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in cli.COMMANDS)
    assert out.strip().splitlines()[-2] == "[]"  # no command's module (jaxq.lp.cli, jaxq.sim...) imported
    assert out.strip().splitlines()[-1] == "False"  # nor JAX (importing it takes ~1 s)


def test_float64_whether_jax_is_imported_before_or_after_jaxq():
    for code in ("import jaxq, jax.numpy as jnp", "import jax.numpy as jnp, jaxq"):
        out = subprocess.run([sys.executable, "-c", code + "; print(jnp.zeros(1).dtype)"], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == "float64", code
    assert cli.DESCRIPTION.endswith("in JAX")


@pytest.mark.parametrize("command, hint", [("sweep", "rerun the same command to resume"), ("scenarios", None)])
def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys, command, hint):
    module = cli._import(command)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    argv = [command] + (["grid.toml", "--out", "x"] if command == "sweep" else [])
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert (hint in err) if hint else ("resume" not in err)


def test_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "jaxq.cli", "scenarios"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait() in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_long_simulate_shows_its_estimated_total_and_the_same_numbers(monkeypatch, capsys):
    """A run past the progress threshold (lowered here) times two pilots first, then shows elapsed and
    estimated total on stderr and says when it is done; its numbers are those of the --quiet run."""
    from jaxq.api import cli as simulate_cli

    argv = ["simulate", "canonical", "--n", "4", "--replicas", "2", "--horizon", "50"]
    assert cli.main(argv + ["--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    monkeypatch.setattr(simulate_cli, "PROGRESS_EVENTS", 10.0)
    assert cli.main(argv) == 0
    shown = capsys.readouterr()
    assert "estimated total" in shown.err and "done in" in shown.err and "pilots of 1% and 2%" in shown.err
    table = lambda out: [ln for ln in out.splitlines() if "events in" not in ln]  # noqa: E731 (wall time differs)
    assert table(shown.out) == table(quiet.out)
