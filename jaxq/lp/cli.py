"""`jaxq lp SCENARIO`: the steady-state LPs as readable tables, under both pricing schemes."""

from __future__ import annotations

import json

import numpy as np

from ..model.config import load_scenario
from .planning import static_plan
from .steady_state import SLI, Bound, Penalty, solve_lp


def add_arguments(parser):
    parser.add_argument("scenario", help="scenario name (see `jaxq scenarios`) or path to a .toml file")
    parser.add_argument("--n", type=int, default=None, help="GPUs for static planning (default: the scenario's)")
    for name in ("prefill-fairness", "decode-fairness", "tpot"):
        parser.add_argument(f"--{name}", type=float, metavar="ETA", help=f"hard {name} SLI bound")
        parser.add_argument(f"--{name}-penalty", type=float, metavar="WEIGHT", help=f"{name} SLI penalty weight")
    parser.add_argument("--json", action="store_true", help="print the solutions as JSON instead of tables")


def sli_from_args(args) -> SLI:
    terms = {}
    for name in ("prefill_fairness", "decode_fairness", "tpot"):
        bound, weight = getattr(args, name), getattr(args, f"{name}_penalty")
        if bound is not None and weight is not None:
            raise ValueError(f"give either --{name.replace('_', '-')} or --{name.replace('_', '-')}-penalty, not both")
        terms[name] = Bound(bound) if bound is not None else Penalty(weight) if weight is not None else None
    return SLI(**terms)


def format_solution(scenario, sol, n) -> str:
    names = scenario.classes.names
    lines = [f"[{sol.objective} LP] status: {sol.status}"]
    if not sol.ok:
        lines.append(f"  {sol.message}")
        return "\n".join(lines)
    lines.append(f"  optimal value: {sol.value:.6f} per GPU per s" + (
        f"  (revenue {sol.revenue:.6f}, penalties {', '.join(f'{k} {v:.6g}' for k, v in sol.penalties.items())})"
        if sol.penalties else ""))
    cols = (("x", sol.x), ("y_m", sol.y_m), ("y_s", sol.y_s), ("q_p", sol.q_p), ("q_d", sol.q_d),
            ("throughput", sol.throughput), ("served", sol.throughput / scenario.classes.lam))
    width = max(8, max(len(nm) for nm in names) + 1)
    lines.append(f"  {'class':<{width}}" + "".join(f"{label:>12}" for label, _ in cols))
    for i, nm in enumerate(names):
        lines.append(f"  {nm:<{width}}" + "".join(f"{arr[i]:>12.6g}" for _, arr in cols))
    lines.append("  (per GPU: x prefill occupancy, y_m / y_s decodes with / without a prefill on their GPU,"
                 " q_p / q_d prefill queue / decode buffer; throughput in requests/s)")
    plan = static_plan(sol, scenario, n)
    lines.append(f"  sum x* = {np.sum(sol.x):.6f};  M = ceil(n sum x*) = {plan.num_mixed} mixed GPUs of n = {n}")
    lines.append(f"  average TPOT (eq. 47) at the optimum: {sol.tpot:.6f} s  (floor 1/gamma = {1 / scenario.timing.gamma:.6f} s)")
    lines.append("  constraints (shadow price = d value / d parameter):")
    for key, price in sol.shadow_prices.items():
        active = sol.active.get(key)
        state = "" if active is None else ("active" if active else "slack")
        lines.append(f"    {key:<24}{price:>14.6g}  {state}")
    return "\n".join(lines)


def run(args) -> int:
    scenario = load_scenario(args.scenario)
    sli = sli_from_args(args)
    n = scenario.cluster.n if args.n is None else args.n
    sols = {obj: solve_lp(scenario, obj, sli) for obj in ("bundled", "separate")}
    if args.json:
        out = {obj: {"status": s.status, "message": s.message, "value": s.value, "revenue": s.revenue,
                     **{k: getattr(s, k).tolist() for k in ("x", "y_m", "y_s", "q_p", "q_d")},
                     "shadow_prices": s.shadow_prices, "penalties": s.penalties, "tpot": s.tpot,
                     "num_mixed": static_plan(s, scenario, n).num_mixed if s.ok else None}
               for obj, s in sols.items()}
        print(json.dumps({"scenario": scenario.name, "n": n, **out}, indent=2, default=float))
        return 0 if all(s.ok for s in sols.values()) else 1
    print(f"scenario {scenario.name} (v{scenario.version}): {scenario.description}")
    print(f"  I = {scenario.num_classes}, B = {scenario.cluster.B}, C = {scenario.cluster.C}, "
          f"tau = {scenario.tau:.6f} s, gamma = {scenario.timing.gamma:g} tokens/s, "
          f"c_p = {scenario.pricing.c_p:g}, c_d = {scenario.pricing.c_d:g} (scheme in file: {scenario.pricing.scheme})")
    verdict = "holds" if scenario.prop_3_2_holds() else "FAILS (an optimal solution may need a decode buffer)"
    print(f"  Prop 3.2: gamma*tau = {scenario.timing.gamma * scenario.tau:.4f} vs (B-1)/B = "
          f"{(scenario.cluster.B - 1) / scenario.cluster.B:.4f}: {verdict}")
    if sli.any:
        print(f"  SLIs: {sli}")
    for sol in sols.values():
        print()
        print(format_solution(scenario, sol, n))
    return 0 if all(s.ok for s in sols.values()) else 1
