"""Speed of the vectorised bandit experiments against the plain per-round NumPy reference.

    python benchmarks/bandits_speed.py [--out benchmarks/bandits_speed.json] [--ref-rounds 500]

1. JAX: every config of configs/bandits/e1..e6.toml at its full protocol size (cases x 50 seeds x
   algorithms x 5000 rounds), timed twice: the first call includes compilation, the second does not.
2. NumPy: :func:`jaxq.bandits.reference.run_reference` on the first ``--ref-rounds`` rounds of one seed of
   every (case, algorithm) pair of each config; its cost per algorithm-round (constant in t: the
   reference keeps V incrementally and solves d x d systems each round) is extrapolated to the full size.
   Running the reference at full size would take hours; the extrapolation is stated as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import jaxq  # noqa: F401  (x64)
from jaxq.bandits import env as E
from jaxq.bandits import experiment as X
from jaxq.bandits.reference import RefAlgorithm, run_reference

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return "unknown"


def time_jax(cfg):
    spec, run, keys, env, algos = X.prepare(cfg, "full")
    t0 = time.perf_counter()
    jax.block_until_ready(X.run_batch(keys, spec, run, env, algos))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(X.run_batch(keys, spec, run, env, algos))
    second = time.perf_counter() - t0
    n_cases, n_algos = len(cfg.cases), len(cfg.algorithms)
    algo_rounds = n_cases * keys.shape[0] * n_algos * run.T
    return first, second, algo_rounds


def time_reference(cfg, rounds: int):
    spec, run, keys, env, algos = X.prepare(cfg, "full")
    make = jax.jit(E.make_problem, static_argnums=1)
    stream_fn = jax.jit(E.sample_stream, static_argnums=(1, 3))
    seconds, algo_rounds = 0.0, 0
    for ci in range(len(cfg.cases)):
        k_problem, k_stream = jax.random.split(keys[0])
        env_c = jax.tree.map(lambda x: x[ci], env)
        problem = make(k_problem, spec, env_c)
        stream = [np.asarray(a) for a in stream_fn(k_stream, spec, problem, rounds)]
        theta, G0, Zy = (np.asarray(a) for a in (problem.theta, problem.offline.G0, problem.offline.Zy))
        for ai in range(len(cfg.algorithms)):
            params = X.params_for_problem(jax.tree.map(lambda x: x[ai], algos), problem)
            ref = RefAlgorithm.from_params(params)
            t0 = time.perf_counter()
            run_reference(ref, theta, G0, Zy, *stream)
            seconds += time.perf_counter() - t0
            algo_rounds += rounds
    return seconds / algo_rounds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "bandits_speed.json"))
    parser.add_argument("--ref-rounds", type=int, default=500)
    args = parser.parse_args()
    rows = {}
    for n in range(1, 7):
        cfg = X.load_config(ROOT / "configs" / "bandits" / f"e{n}.toml")
        first, second, algo_rounds = time_jax(cfg)
        per_round = time_reference(cfg, args.ref_rounds)
        rows[cfg.name] = {
            "algorithm_rounds": algo_rounds, "jax_seconds_with_compile": first, "jax_seconds_steady": second,
            "numpy_seconds_per_algorithm_round": per_round, "numpy_seconds_extrapolated": per_round * algo_rounds,
        }
        print(f"{cfg.name:26s} jax {first:6.1f} s (steady {second:6.1f} s)   numpy ~{per_round * algo_rounds:8.0f} s "
              f"({per_round * 1e6:.0f} us per algorithm-round)", flush=True)
    total = {k: sum(r[k] for r in rows.values()) for k in
             ("algorithm_rounds", "jax_seconds_with_compile", "jax_seconds_steady", "numpy_seconds_extrapolated")}
    total["speedup_with_compile"] = total["numpy_seconds_extrapolated"] / total["jax_seconds_with_compile"]
    total["speedup_steady"] = total["numpy_seconds_extrapolated"] / total["jax_seconds_steady"]
    print(f"total: jax {total['jax_seconds_with_compile']:.0f} s with compilation "
          f"({total['jax_seconds_steady']:.0f} s steady), numpy ~{total['numpy_seconds_extrapolated']:.0f} s "
          f"extrapolated: speed-up x{total['speedup_with_compile']:.0f} (x{total['speedup_steady']:.0f} steady)")
    result = {
        "benchmark": "bandits_speed", "configs": rows, "total": total, "ref_rounds": args.ref_rounds,
        "device": str(jax.devices()[0]), "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "jax": jax.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "commit": _commit(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
