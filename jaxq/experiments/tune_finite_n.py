"""Simulation-based tuning of GG-SP at finite n (docs/tuning.md §8).

    jaxq reproduce tune-finite-n --size quick

At each n, GG-SP's mixed-group size M and gate targets are tuned by simulation (central differences
with common random numbers, optax Adam; :func:`jaxq.tune.finite_n.tune_finite_n`), then validated on
fresh seeds against the paper's GG-SP and the hold-back option (:func:`jaxq.tune.finite_n.validate`).
Tables: the tuning path per step, and the validation estimates with the paired tuned - GG-SP
difference; one claim per n: the tuned policy does at least as well as the paper's plan.
"""

from __future__ import annotations

TITLE = "Finite-n tuning of GG-SP (M and gate targets) by simulation, validated on fresh seeds"
SIZES = {
    "smoke": {"ns": [20], "replicas": {"20": 2}, "steps": {"20": 2}, "validate_replicas": {"20": 4},
              "horizon": 60.0, "warmup": 20.0, "validate_horizon": 60.0, "validate_warmup": 20.0, "seed": 0},
    "quick": {"ns": [100], "replicas": {"100": 8}, "steps": {"100": 12}, "validate_replicas": {"100": 16},
              "horizon": 300.0, "warmup": 100.0, "validate_horizon": 600.0, "validate_warmup": 150.0, "seed": 0},
    "paper": {"ns": [100, 500], "replicas": {"100": 8, "500": 4}, "steps": {"100": 12, "500": 10},
              "validate_replicas": {"100": 16, "500": 8}, "horizon": 300.0, "warmup": 100.0,
              "validate_horizon": 600.0, "validate_warmup": 150.0, "seed": 0},
}


def reproduce(out, settings, log):
    import jaxq
    from jaxq.tune.finite_n import tune_finite_n, validate

    scenario = jaxq.load_scenario("canonical")
    path_rows, validation_rows = [], []
    work = {n: n * settings["steps"][str(n)] * settings["replicas"][str(n)] for n in settings["ns"]}
    for n in log.track(settings["ns"], weight=work.get, what="sizes"):
        key = str(n)
        r = tune_finite_n(scenario, n, steps=settings["steps"][key], replicas=settings["replicas"][key],
                          horizon=settings["horizon"], warmup=settings["warmup"], seed=settings["seed"],
                          perturbation=0.2, learning_rate=0.1, log=log)
        log(f"n={n} tuned: M {r.plan_num_mixed} -> {r.num_mixed}, x {r.x_lp} -> {r.x_target} ({r.evaluations} "
            f"evaluations, {r.seconds:.0f} s)")
        for step, (u, revenue, se) in enumerate(zip(r.path["u"], r.path["revenue"], r.path["diff_se"])):
            path_rows.append({"n": n, "step": step, "u": ";".join(f"{v:.6g}" for v in u), "revenue": float(revenue),
                              "diff_se": float(se), "num_mixed": r.num_mixed, "plan_num_mixed": r.plan_num_mixed})
        v = validate(r, replicas=settings["validate_replicas"][key], horizon=settings["validate_horizon"],
                     warmup=settings["validate_warmup"], extra=("gg-sp-hb",))
        for name, e in v.estimate.items():
            validation_rows.append({"n": n, "policy": name, "metric": "revenue_bundled", "mean": e.mean, "se": e.se,
                                    "lo": e.ci[0], "hi": e.ci[1], "lp_value": v.lp_value, "replicas": v.replicas})
        d = v.difference
        validation_rows.append({"n": n, "policy": "tuned - gg-sp (paired)", "metric": "revenue_bundled",
                                "mean": d.mean, "se": d.se, "lo": d.ci[0], "hi": d.ci[1], "lp_value": v.lp_value,
                                "replicas": v.replicas, "p_value": v.p_value})
        decided = v.replicas >= 8
        out.claim(f"tuned-n{n}", "tuning by simulation does at least as well as the paper's static plan",
                  (d.ci[1] >= 0) if decided else None,
                  f"paired tuned - GG-SP at n = {n}: {d.mean:+.3f} ± {d.half_width:.3f} (95%), p = {v.p_value:.2g}, "
                  f"M {r.plan_num_mixed} -> {r.num_mixed}" + ("" if decided else "; too few replicas to decide"))
        out.number(f"difference_n{n}", [d.mean, d.half_width, v.p_value])
    out.table("path", path_rows)
    out.table("validation", validation_rows)
