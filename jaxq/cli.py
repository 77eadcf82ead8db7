"""The ``jaxq`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, and imports only the
module of the command being run (so ``jaxq --help`` does not import JAX)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Modules are imported lazily so `jaxq --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "lp": ("jaxq.lp.cli", "solve the steady-state LPs of a scenario and print them"),
    "fluid": ("jaxq.fluid.cli", "integrate the fluid model under a policy and plot it"),
    "simulate": ("jaxq.api.cli", "simulate the exact CTMC under a policy, with confidence intervals"),
    "calibrate": ("jaxq.model.calibration_cli", "fit alpha, beta, gamma from measurements"),
    "bandit": ("jaxq.bandits.cli", "run an offline-to-online linear bandit experiment"),
    "scenarios": ("jaxq.model.scenarios_cli", "list the bundled scenarios"),
    "bench": ("jaxq.benchmarks.bench", "measure simulation speed (engines, peers, scaling) and write a JSON record"),
    "sweep": ("jaxq.sweep.cli", "run a grid of scenarios x settings in batches, resumable, to CSV + manifest"),
    "reproduce": ("jaxq.experiments.reproduce", "reproduce one of the paper's experiments: data, figures, claims"),
    "tune": ("jaxq.tune.cli", "tune policy parameters by gradient through the fluid model (optax)"),
    "trace": ("jaxq.traces.cli", "read an LLM request trace: summary and plots, fit the paper's model to it"),
}


DESCRIPTION = ("jaxq: LLM inference on GPU clusters as a many-server queue (exact, time-stepped and fluid "
               "models, LPs, policies) in JAX")
# commands whose interrupted runs pick up where they stopped when rerun
RESUMABLE = {"sweep"}


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (the usage is a ``--help`` away), exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(available: dict[str, object]) -> argparse.ArgumentParser:
    """The parser; ``available`` maps command names to their modules (None: listed in the help only)."""
    parser = OneLineParser(prog="jaxq", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in available.items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        if module is not None:
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _import(name: str):
    """The module of command ``name``, or None when an optional dependency of it is missing."""
    modname = COMMANDS[name][0]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if not (err.name and modname.startswith(err.name)):  # a real import error inside it
            raise
        return None


def _host_devices() -> None:
    """On a CPU, XLA runs one batched program on one thread. Splitting the host into one device per
    core lets the commands shard replicas over them (``jax.sharding``), which is the only way they use
    every core. Must run before JAX initialises its backend; an explicit XLA_FLAGS setting wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(cores, 1)}".strip()


def _parse(parser, argv):
    """Parsed arguments, or the exit code argparse asked for (--help: 0, bad arguments: 2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:  # top-level help, or an unknown command: argparse says which
        return _parse(build_parser(dict.fromkeys(COMMANDS)), argv) or 2
    _host_devices()
    module = _import(command)
    if module is None:
        print(f"jaxq {command}: error: the command's module {COMMANDS[command][0]} is not installed", file=sys.stderr)
        return 2
    args = _parse(build_parser({command: module}), argv)
    if isinstance(args, int):
        return args
    try:
        return int(args._module.run(args) or 0)
    except ValueError as err:  # invalid configuration: a clear message, no traceback
        print(f"jaxq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ": rerun the same command to resume" if command in RESUMABLE else ""
        print(f"\njaxq {command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
