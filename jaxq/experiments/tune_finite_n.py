"""The finite-n tuning study of docs/tuning.md §8 (issue 7, part 4).

    python -m jaxq.experiments.tune_finite_n 100 500 --out docs/results/tune-finite-n

Tunes GG-SP's mixed-group size and gate targets by simulation at each n (central differences with
common random numbers, optax Adam), then validates on fresh seeds against the paper's GG-SP and the
hold-back variant; writes study-n<N>.json.
"""
import argparse
import json
import time
from pathlib import Path

from jaxq.model.config import load_scenario
from jaxq.tune.finite_n import tune_finite_n, validate

sc = load_scenario("canonical")
cfg = {100: dict(replicas=8, steps=12, vrep=16), 500: dict(replicas=4, steps=10, vrep=8)}
ap = argparse.ArgumentParser(description="finite-n tuning study")
ap.add_argument("ns", type=int, nargs="+", choices=sorted(cfg))
ap.add_argument("--out", default="results/tune-finite-n")
args = ap.parse_args()
Path(args.out).mkdir(parents=True, exist_ok=True)
for n in args.ns:
    c = cfg[n]
    t0 = time.time()
    r = tune_finite_n(sc, n, steps=c["steps"], replicas=c["replicas"], horizon=300.0, warmup=100.0, seed=0,
                      perturbation=0.2, learning_rate=0.1, log=lambda s: print(s, flush=True))
    print(f"n={n} tuned: M {r.plan_num_mixed}->{r.num_mixed}, x {r.x_lp} -> {r.x_target}, u {r.u}, "
          f"{r.evaluations} evals, {r.seconds:.0f} s", flush=True)
    v = validate(r, replicas=c["vrep"], horizon=600.0, warmup=150.0, extra=("gg-sp-hb",))
    out = {"tune": r.summary(), "validate": {
        "replicas": v.replicas, "horizon": v.horizon, "warmup": v.warmup, "seed": v.seed, "lp_value": v.lp_value,
        "revenue": {k: x.tolist() for k, x in v.revenue.items()},
        "estimate": {k: [e.mean, e.se, e.half_width] for k, e in v.estimate.items()},
        "difference": [v.difference.mean, v.difference.se, v.difference.half_width],
        "p_value": v.p_value, "significant": v.significant, "seconds": v.seconds},
        "wall": time.time() - t0}
    for k, e in v.estimate.items():
        print(f"  validate {k}: {e} (gap {100*(1-e.mean/v.lp_value):.2f}% of R*)", flush=True)
    print(f"  paired tuned - gg-sp: {v.difference} (se {v.difference.se:.3f}), p = {v.p_value:.2g}, "
          f"significant {v.significant}; validate {v.seconds:.0f} s; total {time.time()-t0:.0f} s", flush=True)
    json.dump(out, open(Path(args.out) / f"study-n{n}.json", "w"), indent=1)
