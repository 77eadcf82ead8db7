"""The ``jaxq`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches."""

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
}


def build_parser(available: dict[str, object]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in available.items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _host_devices() -> None:
    """On a CPU, XLA runs one batched program on one thread. Splitting the host into one device per
    core lets the commands shard replicas over them (``jax.sharding``), which is the only way they use
    every core. Must run before JAX initialises its backend; an explicit XLA_FLAGS setting wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(cores, 1)}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _host_devices()
    available = {}
    for name, (modname, _) in COMMANDS.items():
        try:
            available[name] = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if not (err.name and modname.startswith(err.name)):  # a real import error inside it
                raise
    args = build_parser(available).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except ValueError as err:  # invalid configuration: a clear message, no traceback
        print(f"jaxq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
