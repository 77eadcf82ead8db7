"""`jaxq tune SCENARIO`: tune a policy's parameters by gradient through the fluid model (optax Adam),
print them next to the LP's, and plot the optimisation path (docs/tuning.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .._progress import ProgressLine, clock
from ..model.config import load_scenario
from .objectives import DEFAULT_WEIGHT, OBJECTIVES, PENALTIES
from .optimize import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_PERTURB,
    DEFAULT_STEPS,
    TuneResult,
    tune,
)
from .steady import TUNABLE_KINDS


def add_arguments(parser):
    parser.add_argument("scenario", help="scenario name (see `jaxq scenarios`) or path to a .toml file")
    parser.add_argument("--objective", choices=OBJECTIVES, default="revenue",
                        help="revenue: the bundled LP's objective; prefill-fairness, decode-fairness, tpot: revenue "
                             "minus weight x the SLI penalty of MODEL.md §6; latency: revenue minus weight x "
                             "sum_i lam_i W_i^2 (W_i: mean waiting time by Little's law)")
    parser.add_argument("--weight", type=float, default=None,
                        help="penalty weight (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHT.items()
                                                                     if k != "revenue") + ")")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Adam steps (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE,
                        help=f"initial learning rate, cosine-decayed to 1%% (default {DEFAULT_LEARNING_RATE:g})")
    parser.add_argument("--perturb", type=float, default=DEFAULT_PERTURB,
                        help="start this far from the bundled LP's plan (default 0.25: class-0 target +25%%, "
                             "class-1 target -25%%, router probabilities 25%% toward 1/2)")
    parser.add_argument("--policy", choices=TUNABLE_KINDS, default=None,
                        help="gate: gate-and-route (greedy router); sli: randomized SLI router "
                             "(default: sli for decode-fairness, gate otherwise)")
    parser.add_argument("--convention", choices=("A", "B"), default="B",
                        help="mixed-group decode rate convention of the fluid model (default B, the paper's)")
    parser.add_argument("--out", default=".", help="directory for the PNG and JSON of the path (default .)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")


class _Progress:
    """`tune step k/N | value | elapsed | left` on stderr, started at the first evaluation (so that a
    setting refused before any work leaves stderr to its one-line error); the time left is the mean
    step time so far (the first step includes compiling, so the estimate falls as it runs)."""

    def __init__(self, steps: int, enabled: bool = True):
        self.steps, self.enabled, self.k, self.value, self.line = steps, enabled, -1, float("nan"), None

    def step(self, k, info):
        self.k, self.value = k, float(info.value)
        if self.line is None and self.enabled:
            self.line = ProgressLine(self.text, stream=sys.stderr)
        elif self.line is not None:
            self.line.draw()

    def text(self, elapsed: float) -> str:
        done = self.k + 1  # evaluations 0..steps
        left = elapsed / done * (self.steps + 1 - done) if done > 0 else float("nan")
        return (f"tune step {self.k}/{self.steps} | value {self.value:.6g} | elapsed {clock(elapsed)} | "
                f"left {clock(left)}")

    def close(self):
        if self.line is not None:
            self.line.close()


def run(args) -> int:
    for name, value, ok, allowed in (("steps", args.steps, args.steps >= 1, "an integer >= 1"),
                                     ("lr", args.lr, args.lr > 0, "> 0"),
                                     ("weight", args.weight, args.weight is None or args.weight >= 0, ">= 0"),
                                     ("perturb", args.perturb, 0 <= args.perturb < 1, "in [0, 1)")):
        if not ok:
            raise ValueError(f"invalid tune field '{name}': must be {allowed}, got {value!r}")
    scenario = load_scenario(args.scenario)
    progress = _Progress(args.steps, enabled=not args.quiet)
    try:
        result = tune(scenario, args.objective, args.weight, kind=args.policy, convention=args.convention,
                      steps=args.steps, learning_rate=args.lr, perturb=args.perturb, callback=progress.step)
    finally:
        progress.close()
    print_result(result, scenario)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tune-{scenario.name}-{result.objective.name}"
    png, js = out / f"{stem}.png", out / f"{stem}.json"
    plot_path(result, scenario, png)
    js.write_text(json.dumps(result.summary(), indent=1))
    print(f"  wrote {png} and {js}")
    return 0 if bool(result.path["converged"][result.best]) else 1


def print_result(result: TuneResult, scenario) -> None:
    obj, ref, model = result.objective, result.reference, result.model
    names = scenario.classes.names
    weight = "" if obj.name == "revenue" else f" (weight {obj.weight:g})"
    print(f"[tune] scenario {scenario.name}, objective {obj.name}{weight}, policy {result.kind}, "
          f"convention {result.convention}")
    nonconv = int(np.sum(~result.path["converged"]))
    print(f"  {result.steps} Adam steps, lr {result.learning_rate:g} (cosine to 1%), {result.seconds:.1f} s; "
          f"start {result.perturb:g} off the bundled LP's plan; {nonconv} unconverged fixed points")
    start = result.start.values(model, result.admissible)
    lp = ref.params.values(model, ref.admissible)
    tuned = result.params.values(model, result.admissible)
    rows = [("mixed fraction m", "mixed_fraction", None)]
    rows += [(f"x_target[{n}]", "x_target", i) for i, n in enumerate(names)]
    if result.kind == "sli":
        rows += [(f"p_solo[{n}]", "p_solo", i) for i, n in enumerate(names)]
    print(f"  {'parameter':24s} {'start':>12s} {'LP plan':>12s} {'tuned':>12s}")
    for label, key, i in rows:
        cells = [float(d[key]) if i is None else float(d[key][i]) for d in (start, lp, tuned)]
        print(f"  {label:24s} {cells[0]:12.6f} {cells[1]:12.6f} {cells[2]:12.6f}")
    pen = None if obj.penalty is None else PENALTIES.index(obj.penalty)
    lp_label = "LP optimum" if ref.lp_value is not None else "(no LP)"
    print(f"  {'objective':24s} {lp_label:>12s} {'fluid @ LP':>12s} {'tuned':>12s}   rel. diff vs "
          + ("LP optimum" if ref.lp_value is not None else "fluid @ LP plan"))
    lp_val = f"{ref.lp_value:12.6f}" if ref.lp_value is not None else f"{'-':>12s}"
    print(f"  {'value':24s} {lp_val} {float(ref.fluid.value):12.6f} {result.value:12.6f}   {result.rel_diff:+.3e}")
    lp_rev = f"{ref.lp.revenue:12.6f}" if ref.lp_value is not None else f"{'-':>12s}"
    print(f"  {'revenue':24s} {lp_rev} {float(ref.fluid.revenue):12.6f} {result.revenue:12.6f}")
    if pen is not None:
        lp_pen = ref.lp.penalties.get(obj.penalty) if ref.lp_value is not None else None
        lp_pen = f"{lp_pen / obj.weight:12.6f}" if lp_pen is not None and obj.weight > 0 else f"{'-':>12s}"
        print(f"  {obj.penalty + ' (unweighted)':24s} {lp_pen} {float(ref.fluid.penalties[pen]):12.6f} "
              f"{float(result.path['penalties'][result.best, pen]):12.6f}")
    print(f"  tuned = best converged iterate, step {result.best} of {result.steps}")


def plot_path(result: TuneResult, scenario, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, ref = result.path, result.reference
    steps = np.arange(p["value"].shape[0])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    ax = axes[0]
    ax.plot(steps, p["value"], color="k", label="tuned policy (fluid fixed point)")
    if ref.lp_value is not None:
        ax.axhline(ref.lp_value, color="C3", ls="--", lw=1, label=f"LP optimum {ref.lp_value:.4f}")
    at_lp = float(ref.fluid.value)
    ax.axhline(at_lp, color="C0", ls=":", lw=1.2, label=f"fluid at the LP's plan {at_lp:.4f}")
    lo = np.percentile(p["value"], 10)
    hi = max(float(np.max(p["value"])), ref.value)
    ax.set_ylim(lo - 0.05 * abs(hi - lo), hi + 0.05 * abs(hi - lo) + 1e-9)
    ax.set_xlabel("Adam step")
    ax.set_title(f"objective: {result.objective.name}" + ("" if result.objective.name == "revenue"
                                                           else f" (weight {result.objective.weight:g})"))
    ax.legend(fontsize=8)
    ax = axes[1]
    gap = np.abs(p["value"] - ref.value) / max(abs(ref.value), 1e-12)
    ax.semilogy(steps, np.maximum(gap, 1e-12), color="k")
    ax.axhline(1e-3, color="C3", ls="--", lw=1, label="1e-3")
    ax.set_xlabel("Adam step")
    ax.set_title("|value - reference| / |reference|")
    ax.legend(fontsize=8)
    ax = axes[2]
    lp = ref.params.values(result.model, ref.admissible)
    ratio = lambda v, r: v / r if r > 0 else np.full_like(v, np.nan)
    ax.plot(steps, ratio(p["mixed_fraction"], float(lp["mixed_fraction"])), color="k", label="m")
    for i, name in enumerate(scenario.classes.names):
        ax.plot(steps, ratio(p["x_target"][:, i], float(lp["x_target"][i])), color=f"C{i}", label=f"x_target {name}")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("Adam step")
    ax.set_title("mixed fraction and gate targets / the LP plan's")
    if result.kind == "sli":
        ax2 = ax.twinx()
        for i, name in enumerate(scenario.classes.names):
            ax2.plot(steps, p["p_solo"][:, i], color=f"C{i}", ls="-.", label=f"p_solo {name}")
        ax2.set_ylabel("p_solo (dash-dot)")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=8, loc="lower right")
    ax.legend(fontsize=8, loc="center right")
    fig.suptitle(f"jaxq tune {scenario.name}: policy {result.kind}, {result.steps} Adam steps")
    fig.savefig(path, dpi=100)
    plt.close(fig)
