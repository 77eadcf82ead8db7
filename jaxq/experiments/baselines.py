"""The Sec 6.3 instance family (MODEL.md §7.3) as sweep grid files: GG-SP against the baselines.

    python -m jaxq.experiments.baselines write            # configs/sweeps/sec63-baselines{,-quick}.toml
    jaxq sweep configs/sweeps/sec63-baselines-quick.toml  # the quick size
    jaxq sweep configs/sweeps/sec63-baselines.toml        # the paper's size (n = 500, T = 1e4 s)

The paper gives only ranges [RECON]: alpha in [0.015, 0.02] s ("0.15 to 0.02" read as 0.015), beta in
[1e-5, 1e-3] s/token (log-uniform), gamma in [10, 50] tokens/s, P_i and D_i in [200, 3000] tokens,
lam_i in [0.25, 0.5] per GPU per s, two classes; theta, B, C and prices stay canonical. Ten instances
are drawn once from these with numpy seed 0 and written out, so the family is fixed by the files.
The five seeds are the five replicas of each point (independent; the same across policies: common
random numbers). The time-stepped engine's step is the largest multiple of 1 ms that keeps every
phase's per-step probability <= 1 on every instance.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

POLICIES = ("gg-sp", "fi-wsp", "gi-wsp", "gf-wsp", "fg-sp")
SIZES = {  # name: (n, horizon, warmup, replicas)
    "paper": (500, 10_000.0, 2_000.0, 5),
    "quick": (500, 100.0, 20.0, 5),
}


def draw_instances(count: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append({
            "timing.alpha": round(float(rng.uniform(0.015, 0.02)), 5),
            "timing.beta": float(f"{10 ** rng.uniform(-5, -3):.3e}"),
            "timing.gamma": round(float(rng.uniform(10, 50)), 2),
            "classes.P": [float(round(v)) for v in rng.uniform(200, 3000, 2)],
            "classes.D": [float(round(v)) for v in rng.uniform(200, 3000, 2)],
            "classes.lam": [round(float(v), 3) for v in rng.uniform(0.25, 0.5, 2)],
        })
    return out


def step_for(instances, base) -> float:
    """Largest dt (a multiple of 1 ms, at most 0.02 s) with rate x dt <= 1 for every phase."""
    fastest = 0.0
    for inst in instances:
        s = base.replace(**inst)
        m = s.params()
        fastest = max(fastest, *(float(np.max(np.asarray(v))) for v in (m.mu_p, m.mu_m, m.mu_s, m.theta)))
    return min(0.02, math.floor(1000.0 / fastest) / 1000.0)


def grid_toml(size: str, instances, dt: float) -> str:
    n, horizon, warmup, replicas = SIZES[size]
    lines = [
        f"# Sec 6.3 baselines and ablations, {size} size: {len(POLICIES)} policies x {len(instances)} instances x "
        f"{replicas} seeds, n = {n}, T = {horizon:g} s.",
        "# Written by `python -m jaxq.experiments.baselines write`; the instance family is documented there.",
        'scenario = "canonical"',
        f'description = "Sec 6.3 baselines ({size}): the MODEL.md §7.3 instance family, time-stepped engine"',
        "seed = 0",
        "",
        "[base]",
        f"n = {n}",
        f"replicas = {replicas}",
        f"horizon = {horizon}",
        f"warmup = {warmup}",
        'engine = "stepped"',
        f"dt = {dt}",
        "",
        "[grid]",
        "policy = [" + ", ".join(f'"{p}"' for p in POLICIES) + "]",
    ]
    for inst in instances:
        lines += ["", "[[points]]"]
        for k, v in inst.items():
            lines.append(f'"{k}" = {v}')
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxq.experiments.baselines", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["write"])
    p.add_argument("--dir", default="configs/sweeps")
    args = p.parse_args(argv)
    import jaxq

    base = jaxq.load_scenario("canonical")
    instances = draw_instances()
    dt = step_for(instances, base)
    os.makedirs(args.dir, exist_ok=True)
    for size in SIZES:
        name = "sec63-baselines" + ("" if size == "paper" else f"-{size}") + ".toml"
        with open(os.path.join(args.dir, name), "w") as fh:
            fh.write(grid_toml(size, instances, dt))
        print(f"wrote {os.path.join(args.dir, name)} (dt = {dt})")


if __name__ == "__main__":
    main()
