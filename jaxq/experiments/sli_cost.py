"""Sec 6.4, Fig 8: what each SLI costs. Revenue and shadow price of a hard SLI bound as it tightens.

    jaxq reproduce sli-cost --size quick

On the canonical instance, bundled objective, each SLI of MODEL.md §6 is applied alone as a hard bound
(eq. 49 with q_d = 0 imposed, :func:`jaxq.lp.solve_sli`):

* prefill fairness  max_{i,j} (x_i - x_j)     <= eta1   (eq. 43)
* decode fairness   max_{i,j} (y_s,i - y_s,j) <= eta2   (eq. 45)
* average TPOT      eq. 47's ratio            <= eta3   (its floor is 1/gamma = 0.022 s, reached at X = 0)

**Where a path starts.** The SLI's value at the unconstrained optimum need not be unique: the LP's
per-class y split is degenerate (MODEL.md §8.1), so max(y_s,i - y_s,j) takes a whole interval
[g_min, g_max] over the optimal face. For every SLI we compute that interval exactly (two LPs over the
optimal face: the SLI LP at slack plus "revenue >= R*"); the bound is surely slack above g_max and
starts to cost revenue exactly below g_min. A path runs from 1.1 x g_max (measured from the floor) down
to the tightest feasible value (0 for fairness, 1/gamma for TPOT; the TPOT grid is packed near the
floor), with g_min added as a grid point.

**Shadow price.** ``LPSolution.shadow_prices[sli]`` is d(optimal value)/d(eta), the marginal revenue
per unit of relaxation, >= 0 (for TPOT, eta also multiplies X in the linearised row: the envelope
theorem's y*(B - X*)). The optimal value is concave in eta for all three bounds (the TPOT row's
feasible X is a concave increasing function of eta), so the price must lie between the secant slopes
to the neighbouring grid points; every point is checked and the violations counted (expected: 0).

**Simulation.** At a few points per path the SLI-aware gate-and-route (policy "sli", randomized router)
is planned from that point's SLI LP solution and simulated; the points sit at fractions f of the way
from g_min (where the bound starts to bind) to the tightest value. Engine: the exact CTMC at the smoke and
quick sizes; the time-stepped one (dt = 0.02 s) at the paper size, where the exact engine would take
~1.5e7 events per replica (hours on a CPU). This experiment found a bias of the stepped engine's
admission step under the occupancy gate (x_0 35% low at n = 50, eta1 = 0.1), fixed since and covered
by tests/sim/test_stepped.py.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linprog

import jaxq
from jaxq.experiments.reproduce import estimate_row, estimate_rows
from jaxq.lp import Bound, build_lp, solve_bundled, solve_sli, tpot_ratio
from jaxq.metrics.summary import estimate
from jaxq.api import run

TITLE = "Sec 6.4, Fig 8: revenue and shadow price of each SLI bound as it tightens (LP paths + SLI-aware sims)"

SIZES = {
    "smoke": {"points": 20, "sim_fractions": [0.5], "n": 10, "replicas": 4, "horizon": 50.0, "warmup": 10.0,
              "engine": "exact", "seed": 0, "track_tol": 0.05, "track_min_n": 20},
    "quick": {"points": 40, "sim_fractions": [0.25, 0.5, 0.9], "n": 50, "replicas": 8, "horizon": 1000.0,
              "warmup": 200.0, "engine": "exact", "seed": 0, "track_tol": 0.05, "track_min_n": 20},
    "paper": {"points": 80, "sim_fractions": [0.0, 0.25, 0.5, 0.75, 0.9], "n": 500, "replicas": 5,
              "horizon": 10_000.0, "warmup": 2_000.0, "engine": "stepped", "seed": 0, "track_tol": 0.03,
              "track_min_n": 20},
}

# name -> (symbol, variable the fairness bound is on, axis label)
SLIS = {
    "prefill_fairness": ("eta1", "x", "prefill fairness bound eta1 on max(x_i - x_j)"),
    "decode_fairness": ("eta2", "y_s", "decode fairness bound eta2 on max(y_s,i - y_s,j)"),
    "tpot": ("eta3", None, "average TPOT bound eta3 (ms)"),
}
_ORDER = ("x", "y_m", "y_s", "q_p", "q_d")  # build_lp's variable blocks, one entry per class each


def _spread(v) -> float:
    """max_{i,j} (v_i - v_j) = max v - min v."""
    v = np.asarray(v, float)
    return float(v.max() - v.min())


def quantity(name: str, sol) -> float:
    """The SLI's value at an LP solution."""
    if name == "tpot":
        return float(sol.tpot)
    return _spread(getattr(sol, SLIS[name][1]))


def floor_value(name: str, scenario) -> float:
    """The tightest feasible bound: 0 for fairness, 1/gamma for TPOT (X = 0; tau > 1/gamma here)."""
    return 1.0 / scenario.timing.gamma if name == "tpot" else 0.0


def face_range(scenario, name: str, value: float) -> tuple[float, float]:
    """[min, max] of the SLI's value over the optimal face of the SLI LP at slack (q_d = 0, revenue >=
    ``value`` up to 1e-9 relative)."""
    lp = build_lp(scenario, "bundled", q_d_zero=True)
    num = scenario.num_classes
    block = {k: np.arange(num) + j * num for j, k in enumerate(_ORDER)}
    nv = lp.num_vars
    A_ub = [np.asarray(r, float) for r in lp.A_ub] + [-np.asarray(lp.c, float)]
    b_ub = list(lp.b_ub) + [-(value - 1e-9 * abs(value))]
    A_eq, b_eq = [np.asarray(r, float) for r in lp.A_eq], list(lp.b_eq)

    def solve(c, extra_ub=(), extra_bounds=()):
        ub = [np.append(r, np.zeros(len(extra_bounds))) for r in A_ub] + list(extra_ub)
        eq = [np.append(r, np.zeros(len(extra_bounds))) for r in A_eq]
        res = linprog(c, A_ub=np.array(ub), b_ub=np.array(b_ub + [0.0] * len(extra_ub)),
                      A_eq=np.array(eq) if eq else None, b_eq=np.array(b_eq) if eq else None,
                      bounds=list(lp.bounds) + list(extra_bounds), method="highs")
        if res.status != 0:
            raise RuntimeError(f"face LP for {name} failed: {res.message}")
        return res

    if name == "tpot":
        sums = []
        for sign in (1.0, -1.0):
            c = np.zeros(nv); c[block["x"]] = sign
            sums.append(float(solve(c).x[block["x"]].sum()))
        vals = [float(tpot_ratio(scenario, X)) for X in sums]
        return min(vals), max(vals)
    var = block[SLIS[name][1]]
    hi = -math.inf
    for i in range(num):
        for j in range(num):
            if i != j:
                c = np.zeros(nv); c[var[i]] = -1.0; c[var[j]] = 1.0
                hi = max(hi, -float(solve(c).fun))
    # min t s.t. v_i - v_j <= t for all pairs (t is an extra variable)
    rows = []
    for i in range(num):
        for j in range(num):
            if i != j:
                r = np.zeros(nv + 1); r[var[i]] = 1.0; r[var[j]] = -1.0; r[nv] = -1.0
                rows.append(r)
    c = np.zeros(nv + 1); c[nv] = 1.0
    lo = float(solve(c, rows, [(0, None)]).x[nv]) if num > 1 else 0.0
    return lo, max(hi, lo)


def path_grid(name: str, scenario, g_min: float, g_max: float, points: int) -> np.ndarray:
    """Bounds from 1.1 x g_max (measured from the floor: surely slack) down to the floor, descending;
    g_min included. The TPOT grid is packed near its floor (quadratic spacing)."""
    floor = floor_value(name, scenario)
    start = floor + 1.1 * (g_max - floor)
    u = np.linspace(1.0, 0.0, points)
    if name == "tpot":
        u = u**2
    etas = np.unique(np.concatenate([floor + (start - floor) * u, [g_min]]))
    return etas[::-1]


def _solve(scenario, name: str, eta: float):
    return solve_sli(scenario, **{name: Bound(float(eta))})


def _lp_row(name, eta, sol, scenario, g_min, R_star):
    row = {"sli": name, "eta": float(eta), "status": sol.status, "value": sol.value, "revenue": sol.revenue,
           "loss_percent_of_R_star": 100 * (1 - sol.value / R_star) if sol.ok else math.nan,
           "price": float(sol.shadow_prices.get(name, math.nan)) if sol.ok else math.nan,
           "slack": float(sol.slacks.get(name, math.nan)) if sol.ok else math.nan,
           "binding_from": g_min, "quantity": quantity(name, sol) if sol.ok else math.nan,
           "tpot": sol.tpot, "sum_x": float(np.sum(sol.x))}
    for k in ("x", "y_m", "y_s", "q_p", "q_d"):
        for i, v in enumerate(getattr(sol, k)):
            row[f"{k}[{i}]"] = float(v)
    row["message"] = "" if sol.ok else sol.message
    return row


def _secant_violations(etas, values, prices, rtol=1e-6):
    """Count points whose price is outside [secant to the next looser point, secant to the next tighter
    one] (concavity of the value in eta); etas descending."""
    e, v, p = (np.asarray(a, float)[::-1] for a in (etas, values, prices))  # ascending
    bad, worst = 0, 0.0
    for k in range(len(e)):
        left = (v[k] - v[k - 1]) / (e[k] - e[k - 1]) if k > 0 else math.inf
        right = (v[k + 1] - v[k]) / (e[k + 1] - e[k]) if k + 1 < len(e) else -math.inf
        tol = rtol * max(1.0, abs(p[k]), abs(left) if math.isfinite(left) else 0.0)
        excess = max(right - p[k], p[k] - left, 0.0)
        if excess > tol:
            bad += 1
            worst = max(worst, excess)
    return bad, worst


# the SLI's measured counterpart in a simulation (per replica, from the window averages)
REALIZED = {"prefill_fairness": "prefill_spread", "decode_fairness": "decode_spread", "tpot": "tpot_eq47"}


def _sim_metrics(res, scenario):
    """Per-replica measured SLIs: max(x_i - x_j) and max(y_s,i - y_s,j) of the time averages; eq. 47's
    ratio at the measured X = sum_i x_i (the LP's TPOT, which assumes every decode slot in use); and
    the realised average time per token over decoding streams, (tau Y_m + Y_s/gamma)/(Y_m + Y_s)."""
    m = res.metrics
    x, y_s, y_m = m["x"], m["y_s"], m["y_m"]
    ym, ys = y_m.sum(-1), y_s.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot_occ = (scenario.tau * ym + ys / scenario.timing.gamma) / (ym + ys)
    return {"prefill_spread": x.max(-1) - x.min(-1), "decode_spread": y_s.max(-1) - y_s.min(-1),
            "tpot_eq47": np.asarray(tpot_ratio(scenario, x.sum(-1))), "tpot_occupancy": tpot_occ}


def reproduce(out, settings, log):
    scenario = jaxq.load_scenario("canonical")
    free = solve_bundled(scenario)
    R_star = free.value
    out.number("R_star", R_star)
    paths, ranges, summary = {}, {}, {}
    rows = []
    for name in SLIS:
        slack_sol = _solve(scenario, name, 1e6 if name != "tpot" else 1.0)
        g_min, g_max = face_range(scenario, name, slack_sol.value)
        ranges[name] = (g_min, g_max)
        etas = path_grid(name, scenario, g_min, g_max, settings["points"])
        sols = [_solve(scenario, name, eta) for eta in etas]
        prow = [_lp_row(name, eta, s, scenario, g_min, R_star) for eta, s in zip(etas, sols)]
        rows += prow
        ok = [r for r in prow if r["status"] == "optimal"]
        bad, worst = _secant_violations([r["eta"] for r in ok], [r["value"] for r in ok], [r["price"] for r in ok])
        paths[name] = prow
        summary[name] = {"slack_value_at_optimum": [g_min, g_max], "slack_sli_lp_value": slack_sol.value,
                         "tightest_eta": ok[-1]["eta"], "tightest_value": ok[-1]["value"],
                         "loss_percent_at_tightest": ok[-1]["loss_percent_of_R_star"],
                         "price_secant_violations": bad, "price_secant_worst": worst,
                         "infeasible_points": len(prow) - len(ok)}
        log(f"{name}: binds below {g_min:.6g} (optimal face {g_min:.6g}..{g_max:.6g}); value at tightest eta "
            f"{ok[-1]['eta']:.6g}: {ok[-1]['value']:.3f} ({ok[-1]['loss_percent_of_R_star']:.1f}% of R* lost)")
    out.table("lp-paths", rows)
    out.number("paths", summary)

    sim_rows, sims = [], {}
    n, R, T, W0 = settings["n"], settings["replicas"], settings["horizon"], settings["warmup"]
    for name, f in log.track([(name, f) for name in SLIS for f in settings["sim_fractions"]]):
        g_min = ranges[name][0]
        floor = floor_value(name, scenario)
        eta = g_min - float(f) * (g_min - floor)
        sol = _solve(scenario, name, eta)
        if not sol.ok:
            sim_rows.append({"sli": name, "fraction": f, "eta": eta, "status": f"skipped: LP {sol.status}"})
            continue
        log(f"sli policy, {name} eta = {eta:.6g} (f = {f}): n = {n}, {R} replicas, T = {T:g} s")
        res = run(scenario, "sli", n=n, replicas=R, horizon=T, warmup=W0, seed=settings["seed"],
                  engine=settings["engine"], lp_solution=sol)
        flags = ";".join(f"{k}={v}" for k, v in res.status.items())
        derived = {k: estimate(v) for k, v in _sim_metrics(res, scenario).items()}
        realized = float(derived[REALIZED[name]].mean)
        frontier = _solve(scenario, name, max(realized, floor))
        prefix = {"sli": name, "fraction": f, "eta": eta, "n": n, "engine": settings["engine"], "replicas": R,
                  "horizon": T, "warmup": W0, "num_mixed": res.num_mixed,
                  "mixed_excess": res.num_mixed / n - float(np.sum(sol.x)), "lp_value": sol.value,
                  "lp_quantity": quantity(name, sol), "realized_quantity": realized,
                  "lp_value_at_realized": frontier.value, "status": flags or "ok"}
        sim_rows += estimate_rows(prefix, res.summary, ("revenue_bundled", "x", "y_m", "y_s", "q_p", "q_d",
                                                        "time_per_output_token"))
        sim_rows += [estimate_row(prefix, k, est) for k, est in derived.items()]
        sims[(name, f)] = {"eta": eta, "lp": sol, "rev": res.summary["revenue_bundled"], "derived": derived,
                           "realized": derived[REALIZED[name]], "frontier": frontier.value,
                           "num_mixed": res.num_mixed, "excess": prefix["mixed_excess"], "flags": flags}
    out.table("sim-points", sim_rows)
    _figure(out, scenario, paths, ranges, sims, R_star)
    _claims(out, scenario, paths, ranges, sims, R_star, settings)


def _figure(out, scenario, paths, ranges, sims, R_star):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex="col")
    for col, name in enumerate(SLIS):
        ok = [r for r in paths[name] if r["status"] == "optimal"]
        scale = 1e3 if name == "tpot" else 1.0  # TPOT in ms, its price per ms
        eta = np.array([r["eta"] for r in ok]) * scale
        val = np.array([r["value"] for r in ok])
        price = np.array([r["price"] for r in ok]) / scale
        ax, axp = axes[0, col], axes[1, col]
        ax.plot(eta, val, "-", color="C0", lw=1.5, marker=".", ms=3, label="LP optimum (SLI problem, eq. 49)")
        ax.axhline(R_star, color="k", ls="--", lw=0.8, label=f"R* = {R_star:.2f} (no SLI)")
        axp.plot(eta, price, "-", color="C3", lw=1, marker=".", ms=4)
        g_min, g_max = ranges[name]
        for a in (ax, axp):
            a.axvline(g_min * scale, color="grey", ls=":", lw=1)
            if g_max > g_min * (1 + 1e-9):
                a.axvspan(g_min * scale, g_max * scale, color="grey", alpha=0.12, lw=0)
            if name == "tpot":
                a.axvline(scale / scenario.timing.gamma, color="C2", ls="--", lw=1)
        pts = [v for (nm, _), v in sims.items() if nm == name]
        for j, v in enumerate(pts):
            m = float(v["rev"].mean)
            xr, est = float(v["realized"].mean) * scale, v["realized"]
            ax.plot([v["eta"] * scale, xr], [m, m], ":", color="C1", lw=1)
            ax.plot(v["eta"] * scale, m, "o", mfc="none", color="C1", ms=5,
                    label="simulated, at its planned bound" if col == 0 and j == 0 else None)
            ax.errorbar(xr, m, yerr=[[m - float(v["rev"].lo)], [float(v["rev"].hi) - m]],
                        xerr=[[xr - float(est.lo) * scale], [float(est.hi) * scale - xr]], fmt="o", color="C1",
                        capsize=3, ms=5, label="simulated SLI-aware policy at its measured SLI (95% CI)"
                        if col == 0 and j == 0 else None)
        ax.set_title(SLIS[name][2].replace(" bound", "").replace(" (ms)", ""), fontsize=10)
        ax.set_ylabel("revenue per GPU per s")
        axp.set_ylabel("shadow price (revenue per unit eta" + (", per ms)" if name == "tpot" else ")"))
        axp.set_xlabel(SLIS[name][2])
        ax.set_ylim(bottom=0)
        axp.set_ylim(bottom=0)
        if col == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Fig 8: cost of each SLI on the canonical instance, applied alone (tightening = moving left)")
    import textwrap

    caption = ("Dotted grey: the bound binds below this eta (the unconstrained optimum's value). Grey band (decode "
               "fairness): the SLI's range over the unconstrained optimal face (the LP's y split is not unique, "
               "MODEL.md §8.1). Green dashed: the TPOT floor 1/gamma. Orange: the SLI-aware policy simulated from "
               "the LP plan at one bound, drawn at that bound (hollow) and at the SLI it measured (filled). Shadow "
               "price = d(LP value)/d(eta), revenue per unit of relaxation (TPOT: per ms), piecewise constant "
               "between the LP's basis changes.")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.text(0.01, 0.005, textwrap.fill(caption, 190), fontsize=8, color="0.25", va="bottom")
    out.figure("fig8-sli-cost", fig)


def _binding_prices(rows):
    return np.array([r["price"] for r in rows if r["status"] == "optimal" and r["eta"] < r["binding_from"] * (1 - 1e-9)
                     and r["price"] > 0])


def _claims(out, scenario, paths, ranges, sims, R_star, settings):
    B = float(scenario.cluster.B)

    def end(name):
        ok = [r for r in paths[name] if r["status"] == "optimal"]
        return ok[-1]

    loss = {nm: end(nm)["loss_percent_of_R_star"] for nm in SLIS}
    pf, df, tp = (_binding_prices(paths[nm]) for nm in SLIS)
    pf_range = (float(pf.min()), float(pf.max())) if pf.size else (math.nan, math.nan)
    df_range = (float(df.min()), float(df.max())) if df.size else (math.nan, math.nan)
    out.number("loss_percent_at_tightest", loss)
    out.number("price_range_while_binding", {"prefill_fairness": pf_range, "decode_fairness": df_range,
                                             "tpot_per_s": (float(tp.min()), float(tp.max())) if tp.size else None})
    # per unit of GPU capacity: eta1 is a fraction of a GPU (x in [0, 1]); eta2 counts slots (y_s in [0, B])
    df_per_gpu = df_range[1] * B
    pf_costly = loss["prefill_fairness"] >= 25.0 and loss["prefill_fairness"] > 2 * loss["decode_fairness"]
    out.claim("prefill fairness is costly (steep price)",
              "the shadow price of prefill fairness is steep: equalising prefill occupancy costs much revenue (Fig 8)",
              pf_costly,
              f"eta1 from {ranges['prefill_fairness'][0]:.4f} (x* unique: max(x_i-x_j) = {ranges['prefill_fairness'][0]:.4f}) "
              f"to 0: R {R_star:.2f} -> {end('prefill_fairness')['value']:.2f}, {loss['prefill_fairness']:.1f}% of R* lost; "
              f"price {pf_range[0]:.1f} to {pf_range[1]:.1f} per unit of x (revenue per GPU-fraction of prefill "
              f"imbalance). Criterion: >= 25% of R* lost at eta1 = 0 and over twice decode fairness's loss "
              f"({loss['decode_fairness']:.1f}%).")
    flat = df.size > 0 and df_range[1] <= 1.25 * df_range[0]
    df_cheap = flat and loss["decode_fairness"] < loss["prefill_fairness"] / 2
    g_min, g_max = ranges["decode_fairness"]
    out.claim("decode fairness is cheap (nearly flat price)",
              "the shadow price of decode fairness is nearly flat (Fig 8)",
              df_cheap,
              f"the unconstrained optimum's y split is not unique: max(y_s,i - y_s,j) ranges over [{g_min:.3f}, "
              f"{g_max:.3f}] on the optimal face, so eta2 costs nothing above {g_min:.3f}; below it the price is "
              f"{df_range[0]:.3f} to {df_range[1]:.3f} per decode slot (x{B:g} = {df_per_gpu:.1f} per GPU of "
              f"imbalance, against {pf_range[1]:.1f} for prefill fairness), and eta2 = 0 loses "
              f"{loss['decode_fairness']:.1f}% of R*. Criterion: price max/min <= 1.25 while binding (flat) and "
              f"under half of prefill fairness's loss (cheap).")
    tp_rows = [r for r in paths["tpot"] if r["status"] == "optimal" and r["eta"] < ranges["tpot"][0] * (1 - 1e-9)]
    floor = 1.0 / scenario.timing.gamma
    if tp_rows:
        first, last = tp_rows[0], tp_rows[-1]
        mid = tp_rows[len(tp_rows) // 2]
        growth = last["price"] / first["price"] if first["price"] > 0 else math.inf
        # the LP price stays bounded: at X -> 0 it is V'(0) B^2 / (B(B-1)(tau - 1/gamma))
        w_mu = scenario.w * scenario.rates.mu_p
        bound = float(np.max(w_mu)) * B * B / (B * (B - 1) * (scenario.tau - floor))
        holds = growth >= 3.0 and last["value"] <= 0.01 * R_star
        out.number("tpot_price_growth", growth)
        out.claim("the TPOT price explodes as eta3 -> 1/gamma",
                  "the shadow price of the average-TPOT bound grows sharply as eta3 approaches 1/gamma = 0.022 s (Fig 8)",
                  holds,
                  f"eta3 binds below {ranges['tpot'][0] * 1e3:.4f} ms (the optimum's TPOT); price {first['price'] / 1e3:.1f} "
                  f"per ms just below it, {mid['price'] / 1e3:.1f} at eta3 = {mid['eta'] * 1e3:.4f} ms, "
                  f"{last['price'] / 1e3:.1f} at the floor {last['eta'] * 1e3:.4f} ms (x{growth:.1f}); revenue "
                  f"{first['value']:.1f} -> {last['value']:.2g}. Criterion: price at the floor >= 3x the price where "
                  f"the bound starts to bind, revenue -> 0. The growth is a finite jump, not a divergence: near the "
                  f"floor the LP sheds class-1 prefill first (w_i mu_p,i = {w_mu[1]:.1f} per unit x) and then class 0 "
                  f"({w_mu[0]:.1f}); the price is bounded by max_i w_i mu_p,i B^2 / (B(B-1)(tau - 1/gamma)) = "
                  f"{bound / 1e3:.1f} per ms.")
    # simulated SLI-aware revenue against the LP value
    n = settings["n"]
    if sims:
        gaps, parts = {}, []
        for (name, f), v in sims.items():
            rev, real = v["rev"], v["realized"]
            gap = 100 * (float(rev.mean) - v["lp"].value) / R_star
            half = 100 * (float(rev.hi) - float(rev.mean)) / R_star
            front = 100 * (float(rev.mean) - v["frontier"]) / R_star
            unit = 1e3 if name == "tpot" else 1.0
            gaps[f"{name}@{f:g}"] = {"gap": gap, "ci_half": half, "gap_to_frontier_at_realized": front,
                                     "bound": v["eta"], "realized": float(real.mean), "num_mixed": v["num_mixed"],
                                     "mixed_excess": v["excess"]}
            parts.append(f"{name} f={f:g}: bound {v['eta'] * unit:.4g}, measured {float(real.mean) * unit:.4g} ± "
                         f"{(float(real.hi) - float(real.mean)) * unit:.2g}{' ms' if name == 'tpot' else ''}; LP "
                         f"{v['lp'].value:.2f}, sim {float(rev.mean):.2f}, gap {gap:+.2f}% ± {half:.2f}% (to the LP at the "
                         f"measured SLI {front:+.2f}%); M = {v['num_mixed']}, M/n - sum x* = {v['excess']:+.4f}")
        worst = max(abs(g["gap"]) for g in gaps.values())
        fr = [g["gap_to_frontier_at_realized"] for g in gaps.values()]
        over = [k for k, g in gaps.items() if g["realized"] > g["bound"] * (1 + 1e-9) + 1e-12]
        tol = 100 * settings["track_tol"]
        holds = None if n < settings["track_min_n"] else worst <= tol
        out.number("sim_points", gaps)
        if holds is None:
            why = (f" Undecided at n = {n} < {settings['track_min_n']}: at so small a cluster and horizon a gap of "
                   "several % is expected.")
        else:
            why = (" A gap of a few % at finite n is expected (GG-SP itself loses ~3% of R* at n = 50 on this "
                   "critically loaded instance, docs/finite-n.md). Positive gaps come with measured SLIs above their "
                   f"bounds ({len(over)} of {len(gaps)} points): static planning gives M = ceil(n sum x*) mixed GPUs, "
                   "and the work-conserving gate hands the M - n sum x* unplanned prefill slots to the class the SLI "
                   "LP rations (class 0), undoing part of the rationing that the SLI required. Against the LP "
                   f"frontier at the SLI it actually measured, the policy earns {min(fr):+.2f}% to {max(fr):+.2f}% "
                   "of R*, i.e. it sits just below the frontier, as GG-SP does at this n. The excess M/n - sum x* is "
                   "< 1/n per GPU, so it closes as n grows (Thm 5.1 is a limit); the paper size (n = 500) decides.")
        out.claim("the simulated SLI-aware revenue tracks the LP value",
                  "the SLI-aware gate-and-route attains the SLI problem's optimum as n grows (Thm 5.1)",
                  holds,
                  f"n = {n}, {settings['replicas']} replicas, T = {settings['horizon']:g} s, {settings['engine']} engine; "
                  f"gap = (sim - LP) in % of R* with the 95% CI half-width. " + "; ".join(parts)
                  + f". Criterion: every |gap| <= {tol:g}% of R* (worst {worst:.2f}%)." + why)
