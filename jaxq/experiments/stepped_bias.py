"""Bias of the time-stepped engine against the exact one, as the step shrinks (docs/time-stepped.md).

    python -m jaxq.experiments.stepped_bias run --n 50 --replicas 64 --horizon 1000 \\
        --policies gg-sp,fi-wsp --dts 0.035,0.02,0.01,0.005 --out docs/results/stepped-bias.csv
    python -m jaxq.experiments.stepped_bias plot docs/results/stepped-bias.csv docs/figures/stepped-bias.png

Each (policy, engine, dt) row holds the replica mean, standard error and 95% interval of the bundled
revenue per GPU, and the difference from the exact engine with its standard error (independent
replicas, so the two SEs add in quadrature). Rows are appended as they finish.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np

FIELDS = ("scenario", "policy", "n", "replicas", "horizon", "warmup", "engine", "dt", "revenue", "revenue_se",
          "x0", "x1", "bias", "bias_se", "bias_pct_of_lp", "lp_value", "wall_s")


def run(args) -> None:
    import jaxq
    from jaxq.sim.api import run as simulate

    scenario = jaxq.load_scenario(args.scenario)
    warmup = 0.2 * args.horizon
    new = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a", newline="") as fh:
        out = csv.DictWriter(fh, FIELDS)
        if new:
            out.writeheader()
        for policy in args.policies.split(","):
            t = time.perf_counter()
            exact = simulate(scenario, policy, n=args.n, replicas=args.replicas, horizon=args.horizon,
                             warmup=warmup, seed=args.seed)
            rows = [("exact", None, exact, time.perf_counter() - t)]
            for dt in [float(v) for v in args.dts.split(",")]:
                t = time.perf_counter()
                r = simulate(scenario, policy, n=args.n, replicas=args.replicas, horizon=args.horizon,
                             warmup=warmup, seed=args.seed + 1, engine="stepped", dt=dt)
                rows.append(("stepped", dt, r, time.perf_counter() - t))
            e = exact.summary["revenue_bundled"]
            for engine, dt, r, wall in rows:
                s = r.summary["revenue_bundled"]
                bias = float(s.mean - e.mean)
                bias_se = float(np.hypot(s.se, e.se)) if engine == "stepped" else 0.0
                x = r.summary["x"].mean
                out.writerow(dict(scenario=args.scenario, policy=policy, n=args.n, replicas=args.replicas,
                                  horizon=args.horizon, warmup=warmup, engine=engine, dt=dt if dt else "",
                                  revenue=float(s.mean), revenue_se=float(s.se), x0=float(x[0]), x1=float(x[1]),
                                  bias=bias, bias_se=bias_se, bias_pct_of_lp=100 * bias / r.lp_value,
                                  lp_value=r.lp_value, wall_s=wall))
                fh.flush()
                print(f"{policy:8s} {engine:8s} dt={dt} revenue {float(s.mean):.3f} ± {1.96 * float(s.se):.3f} "
                      f"bias {bias:+.3f} ± {1.96 * bias_se:.3f} ({100 * bias / r.lp_value:+.2f}% of R*) [{wall:.0f} s]",
                      flush=True)


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r["engine"] == "stepped"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        sel = sorted((r for r in rows if r["policy"] == policy), key=lambda r: float(r["dt"]))
        dt = np.array([float(r["dt"]) for r in sel])
        lp = np.array([float(r["lp_value"]) for r in sel])
        b = np.array([float(r["bias"]) for r in sel]) / lp * 100
        se = np.array([float(r["bias_se"]) for r in sel]) / lp * 100
        ax.errorbar(dt, b, yerr=1.96 * se, marker="o", capsize=3, label=f"{policy} (n = {sel[0]['n']})")
    ax.axhline(0, color="k", lw=0.8)
    for y in (-0.5, 0.5):
        ax.axhline(y, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("step dt (s)")
    ax.set_ylabel("revenue bias vs exact engine (% of R*)")
    ax.set_title("time-stepped engine: bias as the step shrinks (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxq.experiments.stepped_bias", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scenario", default="canonical")
    r.add_argument("--n", type=int, default=50)
    r.add_argument("--replicas", type=int, default=64)
    r.add_argument("--horizon", type=float, default=1000.0)
    r.add_argument("--policies", default="gg-sp,fi-wsp,gi-wsp,gf-wsp,fg-sp")
    r.add_argument("--dts", default="0.035,0.02,0.01,0.005")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="docs/results/stepped-bias.csv")
    r.set_defaults(fn=run)
    q = sub.add_parser("plot")
    q.add_argument("csv")
    q.add_argument("png")
    q.set_defaults(fn=plot)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
