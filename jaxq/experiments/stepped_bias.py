"""The time-stepped engine's bias against the exact engine, per policy and step (docs/time-stepped.md).

    jaxq reproduce stepped-bias --size quick

On the canonical instance, each policy is simulated by the exact engine and by the time-stepped engine
at each step ``dt`` from independent replicas; the bias is stepped minus exact (SEs added in
quadrature), reported for the bundled revenue as a percentage of R* and for the per-class occupancy
x_i. The policies are the built-ins and the example policies of ``examples/routing.py`` (written per
job: the stepped engine runs them through the per-job bulk forms it derives from their routers), when
that file is there (a source checkout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TITLE = "Time-stepped engine: revenue and occupancy bias against the exact engine, per policy and step"
BUILT_INS = ("gg-sp", "priority", "sli", "fi-wsp", "gi-wsp", "gf-wsp", "fg-sp", "gg-sp-hb")
EXAMPLES = ("examples/routing.py:jsq", "examples/routing.py:power_of_two")
SIZES = {
    "smoke": {"n": 10, "replicas": 4, "horizon": 60.0, "warmup": 20.0, "policies": ["gg-sp"],
              "examples": EXAMPLES[:1], "dts": [0.02], "scan_policy": "gg-sp", "scan_dts": [], "seed": 0},
    "quick": {"n": 50, "replicas": 64, "horizon": 1_000.0, "warmup": 200.0, "policies": list(BUILT_INS),
              "examples": list(EXAMPLES), "dts": [0.02], "scan_policy": "gg-sp", "scan_dts": [0.035, 0.01],
              "seed": 0},
    "paper": {"n": 500, "replicas": 32, "horizon": 1_000.0, "warmup": 200.0, "policies": list(BUILT_INS),
              "examples": list(EXAMPLES), "dts": [0.02], "scan_policy": "gg-sp", "scan_dts": [0.035, 0.01],
              "seed": 0},
}
# the bound the default step is chosen by (docs/time-stepped.md): |bias| < 0.5% of R* with 95% confidence
BOUND_PCT = 0.5
REPO = Path(__file__).resolve().parents[2]


def _policies(settings, log):
    from ..policies import load_policy

    out = [load_policy(name) for name in settings["policies"]]
    for spec in settings["examples"]:
        path, _, name = spec.rpartition(":")
        where = REPO / path
        if where.is_file():
            out.append(load_policy(f"{where}:{name}"))
        else:
            log(f"skipped {spec}: {where} is not there (the examples live in a source checkout)")
    return out


def reproduce(out, settings, log):
    import jaxq

    scenario = jaxq.load_scenario("canonical")
    kw = {k: settings[k] for k in ("n", "replicas", "horizon", "warmup")}
    rows, table = [], []
    policies = _policies(settings, log)
    runs = {p.name: 1 + len(settings["dts"]) + (len(settings["scan_dts"]) if p.name == settings["scan_policy"] else 0)
            for p in policies}
    for policy in log.track(policies, weight=lambda p: runs[p.name], what="policies"):
        exact = jaxq.run(scenario, policy, seed=settings["seed"], **kw)
        dts = list(settings["dts"]) + (list(settings["scan_dts"]) if policy.name == settings["scan_policy"] else [])
        for dt in sorted(dts):
            approx = jaxq.run(scenario, policy, seed=settings["seed"] + 1, engine="stepped", dt=dt, **kw)
            status = {**exact.status, **approx.status}
            first = len(rows)
            for metric in ("revenue_bundled", "x"):
                e, s = exact.summary[metric], approx.summary[metric]
                for k, (me, se_e, ms, se_s) in enumerate(zip(*(np.atleast_1d(v) for v in (e.mean, e.se, s.mean, s.se)))):
                    bias, se = float(ms - me), float(np.hypot(se_e, se_s))
                    rows.append({"policy": policy.name, "n": kw["n"], "replicas": kw["replicas"],
                                 "horizon": kw["horizon"], "warmup": kw["warmup"], "dt": dt, "metric": metric,
                                 "class": k if np.ndim(e.mean) else "", "exact": float(me), "exact_se": float(se_e),
                                 "stepped": float(ms), "stepped_se": float(se_s), "bias": bias, "bias_se": se,
                                 "bias_pct_of_lp": 100 * bias / exact.lp_value if metric == "revenue_bundled" else "",
                                 "lp_value": exact.lp_value, "status": ";".join(f"{a}={b}" for a, b in status.items())})
            r = rows[first]  # this dt's revenue row
            table.append(r)
            log(f"{policy.name:12s} dt={dt:<6g} revenue exact {r['exact']:.2f}, stepped {r['stepped']:.2f}: bias "
                f"{r['bias_pct_of_lp']:+.3f}% ± {196 * r['bias_se'] / r['lp_value']:.3f}% of R*")
    out.table("bias", rows)
    _figure(out, table)
    _claims(out, table, settings)


def _figure(out, table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    default = [r for r in table if r["dt"] == 0.02] or table
    names = [r["policy"] for r in default]
    pct = np.array([r["bias_pct_of_lp"] for r in default])
    half = np.array([196 * r["bias_se"] / r["lp_value"] for r in default])
    left.errorbar(np.arange(len(names)), pct, yerr=half, fmt="o", capsize=3)
    left.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    for y in (-BOUND_PCT, BOUND_PCT):
        left.axhline(y, color="grey", ls="--", lw=0.8)
    left.axhline(0, color="k", lw=0.8)
    left.set_ylabel("revenue bias vs exact (% of R*)")
    left.set_title(f"each policy at dt = {default[0]['dt']:g} s (95% CI)")
    scan = {}
    for r in table:
        scan.setdefault(r["policy"], []).append(r)
    for policy, pts in scan.items():
        if len(pts) > 1:
            pts = sorted(pts, key=lambda r: r["dt"])
            right.errorbar([r["dt"] for r in pts], [r["bias_pct_of_lp"] for r in pts],
                           yerr=[196 * r["bias_se"] / r["lp_value"] for r in pts], marker="o", capsize=3, label=policy)
    right.axhline(0, color="k", lw=0.8)
    right.set_xlabel("step dt (s)")
    right.set_ylabel("revenue bias (% of R*)")
    right.set_title("as the step shrinks")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.suptitle(f"time-stepped vs exact engine, canonical instance, n = {default[0]['n']}")
    out.figure("bias", fig)


def _claims(out, table, settings):
    at = [r for r in table if r["dt"] == 0.02]
    if not at:
        return
    worst = max(at, key=lambda r: abs(r["bias_pct_of_lp"]) + 196 * r["bias_se"] / r["lp_value"])
    hi = abs(worst["bias_pct_of_lp"]) + 196 * worst["bias_se"] / worst["lp_value"]
    decided = settings["replicas"] >= 32
    out.claim("stepped-bias-bound", f"every policy's revenue bias at dt = 0.02 s is within {BOUND_PCT}% of R* (95%)",
              hi < BOUND_PCT if decided else None,
              f"largest |bias| + 1.96 SE: {hi:.3f}% of R* ({worst['policy']}, {len(at)} policies, n = {worst['n']}, "
              f"{settings['replicas']} replicas per engine)" + ("" if decided else "; too few replicas to decide"))
    for r in at:
        out.number(f"bias_pct_{r['policy']}", [round(r["bias_pct_of_lp"], 4), round(196 * r["bias_se"] / r["lp_value"], 4)])
