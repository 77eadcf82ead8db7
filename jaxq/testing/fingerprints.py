"""Fingerprints of the engines: per-replica accumulators of every built-in policy on every engine for
fixed seeds, so that a change meant to keep behaviour (a refactor) can be checked bit for bit.

    python -m jaxq.testing.fingerprints --write tests/data/fingerprints.npz

records them; ``tests/sim/test_fingerprints.py`` recomputes and compares. A change that alters the
numbers on purpose (a fixed bug, another random stream) rewrites the file and says why in its commit.
"""

from __future__ import annotations

import argparse

import numpy as np

# The run every fingerprint comes from: small enough that all (engine, policy) pairs take ~2 min.
SETTINGS = {"scenario": "canonical", "n": 6, "replicas": 4, "horizon": 100.0, "warmup": 20.0, "room": 128, "seed": 7}
FIELDS = ("counts", "totals", "integrals", "t", "status", "q_p", "q_d")  # q_d summed over buffers
# engine label -> run() arguments
ENGINES = {
    "exact": {"engine": "exact"},
    "population": {"engine": "population"},
    "general": {"engine": "general"},
    "general-lognormal": {"engine": "general", "service": "lognormal"},
    "stepped": {"engine": "stepped"},
    "exact-A": {"engine": "exact", "convention": "A"},
}


def policy_names():
    from ..policies import POLICIES

    return list(POLICIES)


def fingerprint(engine: str, policy: str) -> dict[str, np.ndarray]:
    """The fields of FIELDS of the final state of ``SETTINGS`` under ``policy`` on ``engine`` (a key of
    ENGINES), one row per replica."""
    import jaxq
    from ..api import run

    s = dict(SETTINGS)
    scenario = jaxq.load_scenario(s.pop("scenario"))
    res = run(scenario, policy, **s, **ENGINES[engine])
    out = {f: np.asarray(getattr(res.state, f)) for f in FIELDS}
    out["q_d"] = out["q_d"].sum(axis=1)  # over decode buffers: a policy has 0, 1 or 2
    return out


def record(engines=None, policies=None) -> dict[str, np.ndarray]:
    out = {}
    for engine in engines or ENGINES:
        for policy in policies or policy_names():
            for f, v in fingerprint(engine, policy).items():
                out[f"{engine}/{policy}/{f}"] = v
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", required=True, help="the .npz file to write")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    np.savez_compressed(args.write, **record())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
