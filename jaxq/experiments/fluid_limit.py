"""Finite-n studies of the exact engine against the fluid/LP limit (issue 3's acceptance, and the
seed of the paper's Sec 6.2 and 6.3 experiments).

    python -m jaxq.experiments.fluid_limit convergence --ns 20 50 100 200 500 --out docs/results
    python -m jaxq.experiments.fluid_limit ordering --n 500 --out docs/results

Each command writes a tidy CSV (one row per point: means, standard errors, 95% intervals) and prints a
table. Rows are written as each point finishes, so a long run can be stopped and its finished points
kept.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

import jaxq
from jaxq.lp import solve_lp
from jaxq.api import run

_FIELDS = ["study", "policy", "n", "replicas", "horizon", "warmup", "num_mixed", "lp_value", "metric", "class",
           "mean", "se", "lo", "hi", "wall_s", "events"]


def _rows(study, res, wall, events):
    out = []
    for metric in ("revenue_bundled", "revenue_separate", "x", "q_p", "q_d", "y_m", "y_s", "throughput"):
        est = res.summary[metric]
        mean, se, lo, hi = (np.atleast_1d(v) for v in (est.mean, est.se, est.lo, est.hi))
        for k in range(mean.shape[0]):
            out.append({"study": study, "policy": res.policy, "n": res.n, "replicas": res.replicas,
                        "horizon": res.horizon, "warmup": res.warmup, "num_mixed": res.num_mixed,
                        "lp_value": res.lp_value, "metric": metric, "class": k if mean.shape[0] > 1 else "",
                        "mean": mean[k], "se": se[k], "lo": lo[k], "hi": hi[k], "wall_s": wall, "events": events})
    return out


def _append(path: Path, rows):
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def point(study, scenario, policy, n, replicas, horizon, warmup, seed, out: Path | None):
    t0 = time.perf_counter()
    res = run(scenario, policy, n=n, replicas=replicas, horizon=horizon, warmup=warmup, seed=seed)
    wall = time.perf_counter() - t0
    events = float(np.sum(np.asarray(res.state.step)))
    if res.status:
        print(f"  WARNING {policy} n={n}: {res.status}")
    rows = _rows(study, res, wall, events)
    if out is not None:
        _append(out, rows)
    return res, wall


def trajectory_study(scenario, n, replicas, horizon, seed, out: Path | None, every: float = 10.0,
                     warmup: float = 100.0):
    """GG-SP from an empty cluster: the replica-mean of (Q_p, X, Q_d, Y_m, Y_s)/n at recording times
    against the fluid trajectory of issue 2 (gate-and-route, m = sum x*). The error of each variable is
    reported relative to its largest fluid value over the run (a relative error of a quantity that is 0
    at the fixed point, such as class 1's queue, would be meaningless)."""
    from jaxq.fluid import integrate_scenario

    times = tuple(np.arange(every, horizon + 1e-9, every))
    t0 = time.perf_counter()
    res = run(scenario, "gg-sp", n=n, replicas=replicas, horizon=horizon, warmup=warmup, seed=seed,
              record_times=times)
    wall = time.perf_counter() - t0
    if out is not None:  # the same run's window statistics, for the convergence table
        _append(out.parent / f"convergence-{scenario.name}.csv", _rows("convergence", res, wall, float(np.sum(np.asarray(res.state.step)))))
    est = res.summary["revenue_bundled"]
    print(f"gg-sp n={n}: revenue_bundled over [{warmup:g}, {horizon:g}] {est.mean:.3f} ± {est.hi - est.mean:.3f}, "
          f"x/n = {np.round(res.summary['x'].mean, 5)}, q_d/n = {np.round(res.summary['q_d'].mean, 4)}")
    raw = np.asarray(res.trajectory, dtype=float) / n  # (R, T, 6, I): Q_p, X, Q_d, Y_m, Y_s, Y on G_mix
    y_total = raw[:, :, 3] + raw[:, :, 4]
    traj = np.stack([raw[:, :, 0], raw[:, :, 1], raw[:, :, 2], raw[:, :, 5], y_total - raw[:, :, 5]], axis=2)
    mean = traj.mean(0)
    se = traj.std(0, ddof=1) / np.sqrt(traj.shape[0])
    names = ["q_p", "x", "q_d", "y_mixgroup", "y_sologroup"]  # decodes by group, as the fluid tracks them
    B = float(scenario.cluster.B)
    worst = {}
    for label, plan_n in (("m = sum x*", None), ("m = M/n", n)):
        fluid, *_ = integrate_scenario(scenario, "gate", "empty", horizon=horizon, num_points=len(times) + 1,
                                       n=plan_n)
        ys = fluid.ys
        fl = np.stack([np.asarray(ys.q_p), np.asarray(ys.x), np.asarray(ys.q_d + ys.q_d_mix),
                       np.asarray(ys.y_mix), np.asarray(ys.y_solo)], axis=1)[1:]  # (T, 5, I) at the same times
        scale = np.maximum(np.abs(fl).max(axis=(0, 2), keepdims=True), 1e-12)  # per variable, over classes and time
        rel = np.abs(mean - fl) / scale
        per_slot = np.abs(mean - fl) / B
        worst[label] = {names[k]: (float(rel[:, k, :].max()), float(per_slot[:, k, :].max())) for k in range(5)}
        print(f"gg-sp n={n}, {replicas} replicas, fluid with {label}: max |sim mean - fluid| per variable, "
              "relative to its largest fluid value / to B slots: "
              + ", ".join(f"{k} {a:.4f} / {b:.4f}" for k, (a, b) in worst[label].items()))
        if plan_n is None:
            f = fl
            rel_sum = rel
    if out is not None:
        path = out.parent / f"trajectory-{scenario.name}-n{n}.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["t", "variable", "class", "sim_mean", "sim_se", "fluid", "rel_err_of_range"])
            for ti, t in enumerate(times):
                for k in range(5):
                    for i in range(mean.shape[-1]):
                        w.writerow([t, names[k], i, mean[ti, k, i], se[ti, k, i], f[ti, k, i], rel_sum[ti, k, i]])
    return worst


def plot_convergence(csv_paths, out_png, lp_values=None):
    """Revenue per GPU against n (log axis), one line per policy with 95% CI bars, the LP optimum as
    a dashed line per pricing scheme. Reads the CSVs written by the convergence study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in csv_paths:
        with open(path, newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r["study"] == "convergence"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lps = {}
    for policy in sorted({r["policy"] for r in rows}):
        metric = "revenue_separate" if policy == "priority" else "revenue_bundled"
        pts = sorted((int(r["n"]), float(r["mean"]), float(r["lo"]), float(r["hi"]), float(r["lp_value"]))
                     for r in rows if r["policy"] == policy and r["metric"] == metric)
        if not pts:
            continue
        n, m, lo, hi, lp = (np.array(v) for v in zip(*pts))
        ax.errorbar(n, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=f"{policy} ({metric.split('_')[1]})")
        lps[metric] = lp[0]
    for metric, value in (lp_values or lps).items():
        ax.axhline(value, ls="--", lw=1, color="k" if metric == "revenue_bundled" else "grey")
        ax.text(ax.get_xlim()[0] if ax.get_xlim()[0] > 0 else 20, value, f" LP {metric.split('_')[1]} {value:.2f}",
                va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("n (GPUs)")
    ax.set_ylabel("revenue per GPU per s")
    ax.set_title("finite-n revenue against the LP optimum (95% CI over replicas)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=["convergence", "ordering", "trajectory", "plot"])
    ap.add_argument("--csv", nargs="*", default=[], help="plot: convergence CSVs to draw")
    ap.add_argument("--png", default="finite-n-convergence.png", help="plot: output PNG")
    ap.add_argument("--scenario", default="canonical")
    ap.add_argument("--ns", type=int, nargs="*", default=[20, 50, 100, 200, 500])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--policies", nargs="*", default=None)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--horizon", type=float, default=1000.0)
    ap.add_argument("--warmup", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the CSV (rows appended as points finish)")
    args = ap.parse_args(argv)
    scenario = jaxq.load_scenario(args.scenario)
    out = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / f"{args.study}-{scenario.name}.csv"
    if args.study == "plot":
        print(f"wrote {plot_convergence(args.csv, args.png)}")
        return
    if args.study == "trajectory":
        trajectory_study(scenario, args.n, args.replicas, args.horizon, args.seed, out, warmup=args.warmup)
    elif args.study == "convergence":
        policies = args.policies or ["gg-sp", "priority"]
        for policy in policies:
            objective = "separate" if policy == "priority" else "bundled"
            metric = "revenue_separate" if policy == "priority" else "revenue_bundled"
            ref = solve_lp(scenario, objective)
            for n in args.ns:
                res, wall = point("convergence", scenario, policy, n, args.replicas, args.horizon, args.warmup,
                                  args.seed, out)
                est = res.summary[metric]
                print(f"{policy:8s} n={n:5d} M={res.num_mixed:4d}: {metric} {est.mean:.3f} ± {est.hi - est.mean:.3f} "
                      f"(LP {ref.value:.3f}, gap {100 * (1 - est.mean / ref.value):.2f}%), "
                      f"x/n = {np.round(res.summary['x'].mean, 5)} vs x* = {np.round(ref.x, 5)}, "
                      f"q_d/n = {np.round(res.summary['q_d'].mean, 4)}  [{wall:.0f} s]", flush=True)
    else:
        policies = args.policies or ["gg-sp", "fi-wsp", "gi-wsp", "gf-wsp", "fg-sp"]
        for policy in policies:
            res, wall = point("ordering", scenario, policy, args.n, args.replicas, args.horizon, args.warmup,
                              args.seed, out)
            est = res.summary["revenue_bundled"]
            print(f"{policy:8s} n={args.n}: bundled revenue {est.mean:.3f} ± {est.hi - est.mean:.3f} "
                  f"(95% CI [{est.lo:.3f}, {est.hi:.3f}])  [{wall:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
