"""The numbers behind docs/tuning.md, reproducible: ``python -m jaxq.tune.study SECTION``.

Sections (canonical instance, float64, convention B):

    gradcheck   implicit gradients against central finite differences (h = 1e-4, 1e-5, 1e-6)
    adjoints    the implicit derivative against diffrax's ImplicitAdjoint and against reverse mode
                through the solver (RecursiveCheckpointAdjoint) at growing horizons
    smoothing   value and gradient under other boundary tolerances (eps, eps_tie) and kappa, and the
                one-sided derivatives at the LP plan (a kink no tolerance removes)
    plateau     Adam in the two rejected parametrisations: a free mixed fraction with target shares
                (plateaus) and plain router logits (an oblique ridge)
    table       the results table: every objective, LP value, fluid at the LP plan, tuned value
    all         everything above

Each section compiles what it needs (10-30 s each on one CPU core) and then runs in seconds.
"""

from __future__ import annotations

import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ..fluid.dynamics import FluidVectorField, project_state, revenue_rate
from ..fluid.solve import empty_state, policy_params
from ..lp import solve_bundled
from ..model.config import load_scenario
from .objectives import PENALTIES, Objective, penalty_vector, value_and_grad
from .optimize import default_optimizer, tune
from .params import TunableParams, full_service_occupancy
from .steady import horizon_state, steady_state

ALL_WEIGHTS = jnp.asarray([100.0, 1.0, 1000.0, 100.0])


def _setup(scenario_name="canonical"):
    s = load_scenario(scenario_name)
    model = s.params()
    lp = solve_bundled(s)
    bases = {k: policy_params(k, s, lp) for k in ("gate", "sli")}
    return s, model, lp, bases


def _points(model, base):
    lp_raw = TunableParams.from_policy(base, model)
    rho = np.asarray(full_service_occupancy(model))
    return {"start (25% off, decode under-loaded)": lp_raw.perturbed(model, 0.25),
            "over-loaded (99% admitted, backlog)": TunableParams.from_values(model, 0.99 * rho, np.array([0.7, 0.6]))}


def gradcheck():
    _, model, _, bases = _setup()
    print("## gradient check: implicit gradient vs central differences, objective = revenue - "
          f"{np.asarray(ALL_WEIGHTS).tolist()} . {PENALTIES}")
    for kind, base in bases.items():
        for name, raw in _points(model, base).items():
            info, grad = value_and_grad(raw, ALL_WEIGHTS, model, base, empty_state(2), kind=kind)
            g = np.asarray(ravel_pytree(grad)[0])
            flat, unravel = ravel_pytree(raw)
            line = [f"{kind:4s} {name:38s} value {float(info.value):11.5f} residual {float(info.residual):.0e}"]
            for h in (1e-4, 1e-5, 1e-6):
                fd = np.array([(float(value_and_grad(unravel(flat.at[k].add(h)), ALL_WEIGHTS, model, base, info.y,
                                                     kind=kind)[0].value)
                                - float(value_and_grad(unravel(flat.at[k].add(-h)), ALL_WEIGHTS, model, base, info.y,
                                                       kind=kind)[0].value)) / (2 * h) for k in range(flat.shape[0])])
                nz = np.abs(fd) > 1e-9 * np.abs(fd).max()
                rel = np.max(np.abs(g - fd)[nz] / np.abs(fd)[nz])
                line.append(f"h={h:.0e}: max rel {rel:.1e}")
            print("  " + "; ".join(line))
            print(f"       grad {np.array2string(g, precision=6)}")


def adjoints():
    _, model, _, bases = _setup()
    kind, base = "gate", bases["gate"]
    raw = _points(model, base)["start (25% off, decode under-loaded)"]
    # a start that is neither the old nor the new fixed point: the LP's own fixed point
    lp_raw = TunableParams.from_policy(base, model)
    y_lp = value_and_grad(lp_raw, ALL_WEIGHTS * 0, model, base, empty_state(2), kind=kind)[0].y
    weights = jnp.zeros(4)

    def rev_at(y, pol):
        return revenue_rate(model, pol, y, "B")

    @eqx.filter_jit
    def implicit_diffrax(raw):
        def f(raw):
            pol = raw.apply(base, model)
            start = project_state(jax.lax.stop_gradient(y_lp), model, jax.lax.stop_gradient(pol), kind)
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(FluidVectorField(kind, "B")), diffrax.Tsit5(), 0.0, 4000.0, None, start,
                args=(model, pol), saveat=diffrax.SaveAt(t1=True),
                stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-10),
                event=diffrax.Event(diffrax.steady_state_event(rtol=0.0, atol=1e-8)), max_steps=100_000,
                throw=False, adjoint=diffrax.ImplicitAdjoint())
            return rev_at(jax.tree_util.tree_map(lambda v: v[-1], sol.ys), pol)
        return jax.value_and_grad(f)(raw)

    @eqx.filter_jit
    def unrolled(raw, horizon):
        def f(raw):
            pol = raw.apply(base, model)
            return rev_at(horizon_state(model, pol, y_lp, horizon, kind=kind), pol)
        return jax.value_and_grad(f)(raw)

    t = time.perf_counter()
    info, g_ours = value_and_grad(raw, weights, model, base, y_lp, kind=kind)
    t_ours = time.perf_counter() - t
    g0 = np.asarray(ravel_pytree(g_ours)[0])[:2]
    print("## derivative of the long-run revenue (gate, start 25% off), from the LP's fixed point")
    print(f"  ours (Newton + implicit function theorem): value {float(info.value):.10f} grad {g0} "
          f"(first call incl. compile {t_ours:.1f} s)")
    t = time.perf_counter()
    v, g = implicit_diffrax(raw)
    jax.block_until_ready(g)
    t1 = time.perf_counter() - t
    g1 = np.asarray(ravel_pytree(g)[0])[:2]
    print(f"  diffrax ImplicitAdjoint + steady_state_event(1e-8): value {float(v):.10f} grad {g1} "
          f"max rel diff {np.max(np.abs(g1 - g0) / np.abs(g0)):.1e} (incl. compile {t1:.1f} s)")
    for horizon in (100.0, 200.0, 400.0, 800.0):
        t = time.perf_counter()
        v, g = unrolled(raw, jnp.asarray(horizon))
        jax.block_until_ready(g)
        dt = time.perf_counter() - t
        g2 = np.asarray(ravel_pytree(g)[0])[:2]
        print(f"  RecursiveCheckpointAdjoint, revenue at T = {horizon:5.0f} s: value {float(v):.10f} grad {g2} "
              f"max rel diff {np.max(np.abs(g2 - g0) / np.abs(g0)):.1e} ({dt:.1f} s"
              + (" incl. compile)" if horizon == 100.0 else ")"))
    flat, unravel = ravel_pytree(raw)
    for h in (1e-3, 1e-5):
        fd = [(float(unrolled(unravel(flat.at[k].add(h)), jnp.asarray(800.0))[0])
               - float(unrolled(unravel(flat.at[k].add(-h)), jnp.asarray(800.0))[0])) / (2 * h) for k in range(2)]
        print(f"  central differences (h = {h:.0e}) of the revenue at T = 800 s: {np.asarray(fd)} "
              f"max rel diff to ours {np.max(np.abs(np.asarray(fd) - g0) / np.abs(g0)):.1e}")


def smoothing():
    _, model, _, bases = _setup()
    print("## boundary tolerances and kappa: value and gradient at two points (objective with all penalties)")
    for kind in ("gate", "sli"):
        base0 = bases[kind]
        for name, raw in _points(model, base0).items():
            ref, gref = value_and_grad(raw, ALL_WEIGHTS, model, base0, empty_state(2), kind=kind)
            gref = np.asarray(ravel_pytree(gref)[0])
            worst_v, worst_g = 0.0, 0.0
            for field, values in (("eps", (1e-9, 1e-5)), ("eps_tie", (1e-6, 1e-4)), ("kappa", (5.0, 20.0)),
                                  ("buffer_rate", (10.0, 40.0))):
                for val in values:
                    base = eqx.tree_at(lambda p, f=field: getattr(p, f), base0, jnp.asarray(val))
                    info, g = value_and_grad(raw, ALL_WEIGHTS, model, base, empty_state(2), kind=kind)
                    g = np.asarray(ravel_pytree(g)[0])
                    dv = abs(float(info.value) - float(ref.value)) / abs(float(ref.value))
                    dg = np.max(np.abs(g - gref)) / np.max(np.abs(gref))
                    worst_v, worst_g = max(worst_v, dv), max(worst_g, dg)
                    print(f"  {kind:4s} {name:38s} {field}={val:g}: value rel change {dv:.1e}, gradient {dg:.1e}")
            print(f"  {kind:4s} {name:38s} worst: value {worst_v:.1e}, gradient {worst_g:.1e}")
    print("## one-sided derivatives of the revenue at the LP plan (gate), along class 0's fill logit")
    base = bases["gate"]
    raw = TunableParams.from_policy(base, model)  # class 1 at fill 1 - 1e-9; decode exactly full
    info, g = value_and_grad(raw, jnp.zeros(4), model, base, empty_state(2), kind="gate")
    flat, unravel = ravel_pytree(raw)

    def value_at(v):
        return float(value_and_grad(unravel(v), jnp.zeros(4), model, base, info.y, kind="gate")[0].value)

    v0, k = float(info.value), 0
    for h in (1e-3, 1e-4, 1e-5):
        vp, vm = value_at(flat.at[k].add(h)), value_at(flat.at[k].add(-h))
        print(f"  fill logit class 0, h={h:.0e}: right slope {(vp - v0) / h:10.4f}, left slope {(v0 - vm) / h:10.4f}; "
              f"implicit gradient {float(np.asarray(g.fill_logits)[k]):.4f}")


def _adam(fn, params, steps, lr):
    opt = default_optimizer(lr, steps)
    state = opt.init(params)
    y = empty_state(2)
    values = []
    for _ in range(steps + 1):
        (val, y), g = fn(params, y)
        values.append(float(val))
        updates, state = opt.update(jax.tree_util.tree_map(lambda a: -a, g), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(values), params


def plateau():
    s, model, lp, bases = _setup()
    rho = full_service_occupancy(model)

    # (1) free mixed fraction and target shares, as first tried
    base = bases["gate"]

    @eqx.filter_jit
    def free_m(params, y0):
        def f(params):
            m = jax.nn.sigmoid(params[0])
            pol = eqx.tree_at(lambda p: (p.mixed_fraction, p.x_target), base, (m, m * jax.nn.softmax(params[1:])))
            ss = steady_state(model, pol, y0, kind="gate")
            return revenue_rate(model, pol, ss.y, "B"), jax.lax.stop_gradient(ss.y)
        return jax.value_and_grad(f, has_aux=True)(params)

    m0 = float(np.sum(lp.x))
    xt0 = np.asarray(lp.x) * np.array([1.25, 0.75])
    for label, m_start in (("m 25% low", 0.75 * m0), ("m 25% high", 1.25 * m0)):
        p0 = jnp.asarray([np.log(m_start / (1 - m_start)), *np.log(xt0 / xt0.sum())])
        vals, p = _adam(free_m, p0, 150, 0.05)
        m = float(jax.nn.sigmoid(p[0]))
        print(f"## free m + shares, revenue, start {label}, targets x*(1.25, 0.75): value {vals[0]:.3f} -> best "
              f"{vals.max():.4f} (R* {lp.value:.4f}, rel {vals.max() / lp.value - 1:+.2e}); final m {m:.5f}, shares "
              f"{np.asarray(jax.nn.softmax(p[1:]))}")

    # (2) plain router logits: p_solo = sigmoid(z), targets as in TunableParams
    base = bases["sli"]
    w = Objective("decode-fairness", 1.0).weights()

    @eqx.filter_jit
    def plain_p(params, y0):
        def f(params):
            fill, z = params
            xt = rho * jax.nn.sigmoid(fill)
            pol = eqx.tree_at(lambda p: (p.mixed_fraction, p.x_target, p.p_solo), base,
                              (jnp.sum(xt), xt, jax.nn.sigmoid(z)))
            ss = steady_state(model, pol, y0, kind="sli")
            val = revenue_rate(model, pol, ss.y, "B") - jnp.sum(w * penalty_vector(model, pol, ss.y, "B"))
            return val, jax.lax.stop_gradient(ss.y)
        return jax.value_and_grad(f, has_aux=True)(params)

    start = TunableParams.from_policy(bases["sli"], model).perturbed(model, 0.25)
    p0 = (start.fill_logits, jnp.log(start.p_solo(model) / (1 - start.p_solo(model))))
    ref = tune(s, "decode-fairness", 1.0, steps=0).reference.value
    for steps in (150, 400):
        vals, _ = _adam(plain_p, p0, steps, 0.2)
        print(f"## plain router logits, decode fairness 1, {steps} steps: best {vals.max():.4f} (LP {ref:.4f}, rel "
              f"{vals.max() / ref - 1:+.2e})")
    for steps in (150, 400):
        res = tune(s, "decode-fairness", 1.0, steps=steps)
        print(f"## solo-share coordinates (TunableParams), decode fairness 1, {steps} steps: best {res.value:.4f} "
              f"(rel {res.rel_diff:+.2e})")


TABLE = [
    ("revenue", None, None), ("prefill-fairness", 100.0, None), ("prefill-fairness", 800.0, None),
    ("decode-fairness", 1.0, None), ("decode-fairness", 20.0, None), ("decode-fairness", 1.0, "gate"),
    ("tpot", 1000.0, None), ("tpot", 70000.0, None), ("latency", 100.0, None), ("latency", 1000.0, None),
]


def table(steps: int = 150):
    s = load_scenario("canonical")
    print(f"| objective | weight | policy | LP value | fluid at LP plan | tuned ({steps} steps) | rel. diff | "
          "tuned revenue | tuned penalty | penalty at LP plan | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, weight, kind in TABLE:
        res = tune(s, name, weight, kind=kind, steps=steps)
        ref = res.reference
        pen = None if res.objective.penalty is None else PENALTIES.index(res.objective.penalty)
        lp_val = f"{ref.lp_value:.4f}" if ref.lp_value is not None else "– (no LP)"
        tuned_pen = "–" if pen is None else f"{res.path['penalties'][res.best, pen]:.5g}"
        lp_pen = "–" if pen is None else f"{float(ref.fluid.penalties[pen]):.5g}"
        w = "–" if name == "revenue" else f"{res.objective.weight:g}"
        print(f"| {name} | {w} | {res.kind} | {lp_val} | {float(ref.fluid.value):.4f} | {res.value:.4f} | "
              f"{res.rel_diff:+.2e} | {res.revenue:.4f} | {tuned_pen} | {lp_pen} | {res.seconds:.1f} |")
        sys.stdout.flush()


SECTIONS = {"gradcheck": gradcheck, "adjoints": adjoints, "smoothing": smoothing, "plateau": plateau, "table": table}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = list(SECTIONS) if not argv or argv == ["all"] else argv
    for name in names:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)} or all")
        t = time.perf_counter()
        SECTIONS[name]()
        print(f"[{name}: {time.perf_counter() - t:.1f} s]\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
