"""`jaxq fluid SCENARIO`: integrate the fluid model under a policy and plot the trajectories with the
LP fixed point drawn as dashed lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.config import load_scenario
from .dynamics import KINDS
from .solve import SCHEME_OF_KIND, convergence_time, fixed_point_error, integrate_scenario


def add_arguments(parser):
    parser.add_argument("scenario", help="scenario name (see `jaxq scenarios`) or path to a .toml file")
    parser.add_argument("--policy", choices=KINDS, default="gate",
                        help="gate: gate-and-route (bundled LP); priority: prioritize-and-route (separate LP); "
                             "sli: SLI-aware randomized router (bundled LP targets)")
    parser.add_argument("--start", choices=("empty", "overloaded"), default="empty", help="initial state")
    parser.add_argument("--horizon", type=float, default=600.0, help="seconds to integrate (default 600)")
    parser.add_argument("--points", type=int, default=1201, help="saved time points (default 1201)")
    parser.add_argument("--n", type=int, default=None,
                        help="plan for n GPUs (mixed fraction M/n); default: the fluid limit m = sum x*")
    parser.add_argument("--convention", choices=("A", "B"), default="B",
                        help="mixed-group decode rate: B (paper) mu_m only while the GPU prefills; A always mu_m")
    parser.add_argument("--tol", type=float, default=1e-3, help="tolerance for the reported convergence time")
    parser.add_argument("--out", default=None, help="PNG path (default fluid-<scenario>-<policy>-<start>.png)")


def run(args) -> int:
    if not args.horizon > 0:
        raise ValueError(f"invalid fluid field 'horizon': must be > 0, got {args.horizon!r}")
    if args.points < 2:
        raise ValueError(f"invalid fluid field 'points': must be >= 2, got {args.points!r}")
    if not args.tol > 0:
        raise ValueError(f"invalid fluid field 'tol': must be > 0, got {args.tol!r}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"invalid fluid field 'n': must be an integer >= 1, got {args.n!r}")
    scenario = load_scenario(args.scenario)
    sol, lp, policy, model = integrate_scenario(scenario, args.policy, args.start, args.horizon, args.points,
                                                n=args.n, convention=args.convention)
    if not lp.ok:
        raise ValueError(f"the {lp.objective} LP is {lp.status}: {lp.message}")
    err = fixed_point_error(sol, lp.x, lp.q_p)
    t_conv = convergence_time(sol.ts, err, args.tol)
    scheme = SCHEME_OF_KIND[args.policy]
    rev = np.asarray(sol.revenue_bundled if scheme == "bundled" else sol.revenue_separate)
    print(f"[fluid] scenario {scenario.name}, policy {args.policy}, start {args.start}, convention {args.convention}, "
          f"horizon {args.horizon:g} s")
    print(f"  solver: {'ok' if bool(sol.ok) else 'FAILED: ' + str(sol.result)}; {int(sol.num_steps)} steps "
          f"({int(sol.num_rejected_steps)} rejected)")
    print(f"  mixed fraction m = {float(policy.mixed_fraction):.6f}; {lp.objective} LP value {lp.value:.6f}")
    print(f"  x(T)   = {np.array2string(np.asarray(sol.ys.x[-1]), precision=6)}   x*   = "
          f"{np.array2string(lp.x, precision=6)}")
    print(f"  q_p(T) = {np.array2string(np.asarray(sol.ys.q_p[-1]), precision=6)}   q_p* = "
          f"{np.array2string(lp.q_p, precision=6)}")
    within = (f"within {args.tol:g} from t = {t_conv:g} s" if np.isfinite(t_conv)
              else f"not within {args.tol:g} by the horizon ({args.horizon:g} s)")
    print(f"  max |x - x*|, |q_p - q_p*| at T: {err[-1]:.3e}; {within}")
    print(f"  {scheme} revenue rate at T: {rev[-1]:.6f} (LP {lp.value:.6f})")
    out = args.out or f"fluid-{scenario.name}-{args.policy}-{args.start}.png"
    plot_trajectories(sol, lp, policy, scenario, args.policy, rev, scheme, out)
    print(f"  wrote {out}")
    return 0 if bool(sol.ok) else 1


def plot_trajectories(sol, lp, policy, scenario, kind, revenue, scheme, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.asarray(sol.ts)
    ys = {f: np.asarray(getattr(sol.ys, f)) for f in ("q_p", "x", "y_mix", "y_solo", "q_d", "q_d_mix")}
    names = scenario.classes.names
    colors = [f"C{i}" for i in range(len(names))]
    m = float(policy.mixed_fraction)
    B = scenario.cluster.B
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)

    def per_class(ax, field, target, title, label=None):
        for i, name in enumerate(names):
            ax.plot(ts, ys[field][:, i], color=colors[i], label=f"{name}")
            if target is not None:
                ax.axhline(target[i], color=colors[i], ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("t (s)")
        ax.set_ylabel("jobs per GPU")

    per_class(axes[0, 0], "x", lp.x, "prefill occupancy x_i (dashed: LP x*)")
    axes[0, 0].plot(ts, ys["x"].sum(axis=1), color="k", lw=1, label="sum x")
    axes[0, 0].axhline(m, color="k", ls=":", lw=1, label="m")
    axes[0, 0].legend(fontsize=8)
    per_class(axes[0, 1], "q_p", lp.q_p, "prefill queue q_p,i (dashed: LP q_p*)")
    ax = axes[0, 2]
    for i, name in enumerate(names):
        ax.plot(ts, ys["y_mix"][:, i], color=colors[i], label=f"{name} mixed group")
        ax.plot(ts, ys["y_solo"][:, i], color=colors[i], ls="-.", label=f"{name} solo group")
        ax.axhline(lp.y_m[i], color=colors[i], ls="--", lw=1)
        ax.axhline(lp.y_s[i], color=colors[i], ls=(0, (1, 1)), lw=1)
    # two lines: the one-line title did not fit the panel
    ax.set_title("decodes per class\n(LP: dashed y_m*, dotted y_s*" + ("" if kind == "sli" else ", not unique") + ")",
                 fontsize=10)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("decodes per GPU")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(ts, ys["y_mix"].sum(axis=1), label="mixed group")
    ax.plot(ts, ys["y_solo"].sum(axis=1), label="solo group")
    ax.axhline((B - 1) * m, color="C0", ls="--", lw=1, label="K_m = (B-1) m")
    ax.axhline(B * (1 - m), color="C1", ls="--", lw=1, label="K_s = B (1-m)")
    ax.set_title("decode pools (dashed: capacities)", fontsize=10)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("decodes per GPU")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for i, name in enumerate(names):
        ax.plot(ts, ys["q_d"][:, i], color=colors[i], label=f"{name}" + (" solo buffer" if kind == "sli" else ""))
        if kind == "sli":
            ax.plot(ts, ys["q_d_mix"][:, i], color=colors[i], ls="-.", label=f"{name} mixed buffer")
        ax.axhline(lp.q_d[i], color=colors[i], ls="--", lw=1)
    ax.set_title("decode buffer q_d,i (dashed: LP q_d*)", fontsize=10)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("jobs per GPU")
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    ax.plot(ts, revenue, color="k")
    ax.axhline(lp.value, color="k", ls="--", lw=1, label=f"LP {lp.value:.4f}")
    lo = min(float(np.min(revenue)), 0.9 * lp.value)
    ax.set_ylim(lo - 0.05 * abs(lp.value), 1.05 * max(lp.value, float(np.max(revenue))))
    ax.set_title(f"{scheme} revenue rate per GPU", fontsize=10)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("revenue per GPU per s")
    ax.legend(fontsize=8)
    fig.suptitle(f"fluid model: {scenario.name}, policy {kind}, LP fixed point dashed")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
