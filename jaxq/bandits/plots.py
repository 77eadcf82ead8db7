"""Regret plots: cumulative regret (mean ± 2 SE over seeds), its ratio to the baseline, and the
pooled-branch usage per block, one row per case of a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_summary(summary: dict, path: str | Path, dpi: int = 72) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = summary["cases"]
    fig, axes = plt.subplots(len(cases), 3, figsize=(13, 3.3 * len(cases)), squeeze=False)
    base = summary["baseline"]
    for row, (case, data) in zip(axes, cases.items()):
        b = data["algorithms"][base]
        b_mean = np.asarray(b["curve_mean"])
        for name, a in data["algorithms"].items():
            t = np.asarray(a["curve_t"])
            mean, se = np.asarray(a["curve_mean"]), np.asarray(a["curve_se"])
            (line,) = row[0].plot(t, mean, label=name, lw=1.4)
            row[0].fill_between(t, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.2, lw=0)
            row[1].plot(t, mean / b_mean, color=line.get_color(), lw=1.4)
            cps = summary["checkpoints"]
            row[1].errorbar(cps, a["ratio"], yerr=2 * np.asarray(a["ratio_se"]), fmt="o", ms=3,
                            color=line.get_color(), capsize=2, lw=1)
            row[2].plot(t, a["pooled_per_block"], color=line.get_color(), lw=1.2)
        title = f"{summary['experiment']} {case}" if len(cases) > 1 else summary["experiment"]
        row[0].set(title=f"{title}: cumulative regret (±2 SE)", xlabel="round t", ylabel="regret")
        row[1].axhline(1.0, color="k", lw=0.6, ls=":")
        row[1].set(title=f"ratio to {base} (points: checkpoints ±2 SE)", xlabel="round t", xscale="log")
        row[2].set(title="pooled-branch usage per block", xlabel="round t", ylim=(-0.03, 1.03))
        row[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{summary['name']} v{summary['version']}: {summary['seeds']} seeds, T = {summary['T']}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
