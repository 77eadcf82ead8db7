"""Events per second of the exact engine, the reference simulator and Ciw, measured in one run.

    python benchmarks/engine_speed.py [--quick] [--out benchmarks/results]

* the engine on the canonical instance at n = 500 (GG-SP) for 1, 64 and 1,024 replicas, compile time
  (first call) reported apart from run time (second call, same shapes);
* the reference simulator (plain Python, jaxq.testing.reference) on the same instance;
* the M/M/c+M special case (one class, FI-WSP, B = 1, tiny prompt; c = 100 servers at 95% load,
  patience 0.5): Ciw (one trajectory) next to the engine on the same case.

Nothing here is asserted: speed is measured, never tested. A JSON record (device, versions, commit)
goes to the output folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

import jaxq
from jaxq.lp import solve_bundled, static_plan
from jaxq.model import JobClasses
from jaxq.policies import get_policy
from jaxq.sim import SimSpec, simulate
from jaxq.sim.api import make_params
from jaxq.testing.reference import PolicyTargets as RefTargets
from jaxq.testing.reference import benchmark_reference


def engine_rate(scenario, policy_name, n, replicas, horizon, room, seed=0):
    policy = get_policy(policy_name)
    spec = SimSpec(scenario.num_classes, n, room=room, num_buffers=policy.num_buffers)
    keys = jax.random.split(jax.random.key(seed), replicas)
    short, _, _ = make_params(scenario, policy, n, horizon=1e-3, warmup=0.0)
    t0 = time.perf_counter()
    jax.block_until_ready(simulate(keys, short, spec, policy))
    compile_s = time.perf_counter() - t0
    params, _, _ = make_params(scenario, policy, n, horizon=horizon, warmup=0.0)
    t0 = time.perf_counter()
    state, _ = simulate(keys, params, spec, policy)
    jax.block_until_ready(state)
    run_s = time.perf_counter() - t0
    events = float(np.sum(np.asarray(state.step)))
    return {"n": n, "replicas": replicas, "horizon_s": horizon, "events": events, "compile_s": compile_s,
            "run_s": run_s, "events_per_s": events / run_s, "status_bad": int(np.sum(np.asarray(state.status) != 0))}


def ciw_rate(c, lam, mu, theta, horizon, seed=0):
    import ciw

    net = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=lam)],
                             service_distributions=[ciw.dists.Exponential(rate=mu)], number_of_servers=[c],
                             reneging_time_distributions=[ciw.dists.Exponential(rate=theta)])
    ciw.seed(seed)
    sim = ciw.Simulation(net)
    t0 = time.perf_counter()
    sim.simulate_until_max_time(horizon)
    secs = time.perf_counter() - t0
    recs = sim.get_all_records()
    # events: each arrival, plus each service completion or abandonment
    events = 2 * len(recs)
    return {"c": c, "horizon_s": horizon, "events": events, "run_s": secs, "events_per_s": events / secs,
            "version": ciw.__version__}


def mmc_scenario(c, lam_total, theta):
    base = jaxq.load_scenario("canonical")
    g = base.timing.gamma
    return base.replace(classes=JobClasses(P=[1.0], D=[g], lam=[lam_total / c], theta=[theta]),
                        **{"cluster.B": 1, "cluster.n": c})


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:  # noqa: BLE001 - a benchmark outside a checkout still runs
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller horizons (a smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 64, 1024])
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
        "cpu": platform.processor() or platform.machine(), "jax": jax.__version__, "jaxq": jaxq.__version__,
        "commit": git_commit(), "rows": {},
    }
    canonical = jaxq.load_scenario("canonical")
    n = 500
    scale = 0.25 if args.quick else 1.0

    print(f"device {record['device']}, jax {jax.__version__}")
    print("\nengine, canonical instance, n = 500, GG-SP (room 800 per class)")
    rows = []
    for R in args.replicas:
        horizon = scale * (4.0 if R <= 64 else 0.5)
        row = engine_rate(canonical, "gg-sp", n, R, horizon, room=800)
        rows.append(row)
        print(f"  R = {R:5d}: compile {row['compile_s']:6.1f} s, run {row['run_s']:7.2f} s for "
              f"{row['events']:.3g} events -> {row['events_per_s']:.3g} events/s")
    record["rows"]["engine_canonical_n500"] = rows

    print("\nreference simulator (plain Python), canonical, GG-SP")
    sc = canonical.replace(**{"cluster.n": n})
    lp = solve_bundled(sc)
    plan = static_plan(lp, sc, n)
    targets = RefTargets(num_mixed=plan.num_mixed, x_star=plan.x_target, q_p_star=lp.q_p, p_solo=plan.p_solo)
    ref = benchmark_reference(sc, "gg-sp", targets, horizon=scale * 20.0)
    print(f"  n = 500: {ref['events']} events in {ref['seconds']:.1f} s -> {ref['events_per_second']:.3g} events/s")
    record["rows"]["reference_canonical_n500"] = ref

    print("\nM/M/c+M, c = 100, load 0.95, theta = 0.5 (engine: FI-WSP, B = 1, P = 1 token)")
    c, lam, theta = 100, 95.0, 0.5
    ciw_row = ciw_rate(c, lam, 1.0, theta, horizon=scale * 400.0)
    print(f"  Ciw {ciw_row['version']}: {ciw_row['events']} events in {ciw_row['run_s']:.1f} s -> "
          f"{ciw_row['events_per_s']:.3g} events/s")
    mmc = mmc_scenario(c, lam, theta)
    eng_rows = []
    for R in (64, 1024):
        row = engine_rate(mmc, "fi-wsp", c, R, horizon=scale * (40.0 if R == 64 else 4.0), room=512)
        eng_rows.append(row)
        print(f"  engine R = {R:5d}: compile {row['compile_s']:.1f} s, {row['events_per_s']:.3g} events/s "
              f"({row['events_per_s'] / ciw_row['events_per_s']:.1f}x Ciw)")
    record["rows"]["mmc_ciw"] = ciw_row
    record["rows"]["mmc_engine"] = eng_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"engine_speed-{record['device'].replace(':', '-').replace(' ', '_')}-{record['date'][:10]}.json"
    (out / name).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
