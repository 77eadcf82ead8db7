"""The example policies shipped in examples/routing.py (join-the-shortest-queue and power-of-two-choices
routers, written once per job) on every engine, from Python and from the command line: conservation,
capacity and groups, the stepped engine's agreement with the exact one, and what JSQ is for."""

from pathlib import Path

import numpy as np
import pytest

from jaxq.cli import main
from jaxq.policies import load_policy
from jaxq.sim import ENGINES, engine_spec
from jaxq.api import make_params, run
from jaxq.testing.checks import check_final_states
from jaxq.testing.scenarios import canonical

CANONICAL = canonical()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "routing.py"
NAMES = ("jsq", "power_of_two")
# the acceptance run: jaxq simulate canonical --n 20 --replicas 8 --horizon 200
SIZE = {"n": 20, "replicas": 8, "horizon": 200.0}


def example(name):
    return load_policy(f"{EXAMPLES}:{name}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_every_engine_and_conserves_jobs(name, engine):
    policy = example(name)
    res = run(CANONICAL, policy, engine=engine, **SIZE)
    assert not res.status, res.status
    spec = engine_spec(engine, CANONICAL, SIZE["n"])
    params = make_params(CANONICAL, policy, SIZE["n"], SIZE["horizon"], res.warmup)[0]
    check_final_states(res.state, params, spec, policy, engine)
    assert 0.8 * res.lp_value < res.summary["revenue_bundled"].mean < 1.05 * res.lp_value


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NAMES)
def test_command_line(name, engine, capsys):
    """``jaxq simulate canonical --policy examples/routing.py:NAME --engine ENGINE --n 20 --replicas 8
    --horizon 200`` (the shapes of the test above: its compiled program is reused)."""
    code = main(["simulate", "canonical", "--policy", f"{EXAMPLES}:{name}", "--engine", engine, "--n", "20",
                 "--replicas", "8", "--horizon", "200"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"policy {example(name).name}" in out and f"{engine}" in out and "revenue, bundled" in out


@pytest.mark.parametrize("name", [p if p == NAMES[0] else pytest.param(p, marks=pytest.mark.slow) for p in NAMES])
def test_stepped_agrees_with_exact(name):
    """The time-stepped engine on the per-job bulk forms it derives from the routers: revenue and
    occupancy within 4 SE of the exact engine (n = 20, dt = 0.01)."""
    kw = dict(n=20, replicas=16, horizon=300.0, warmup=60.0)
    exact = run(CANONICAL, example(name), seed=0, **kw)
    approx = run(CANONICAL, example(name), seed=1, engine="stepped", dt=0.01, **kw)
    for key in ("revenue_bundled", "x", "y_s", "throughput"):
        a, b = exact.summary[key], approx.summary[key]
        z = np.abs(np.atleast_1d(b.mean - a.mean)) / np.hypot(np.atleast_1d(a.se), np.atleast_1d(b.se))
        assert np.all(z <= 4), (key, a.mean, b.mean, z)


def _view(loads, free, weight=None):
    """A View of rows with these decode loads (one class) and free decode slots (none on a row without
    GPUs, as the engines build it)."""
    import jax.numpy as jnp

    from jaxq.policies import SOLO, View

    rows = len(loads)
    z = jnp.zeros(2, jnp.int32)
    free = free if weight is None else np.where(np.asarray(weight) > 0, free, 0)
    return View(n=int(sum(weight)) if weight is not None else rows, B=jnp.float64(16), group=jnp.full(rows, SOLO),
                prefill_class=jnp.full(rows, -1), decodes=jnp.asarray(loads, jnp.int32)[:, None],
                free_decode=jnp.asarray(free, jnp.int32), idle_prefill=jnp.zeros(rows, bool), X=z[:1], q_p=z[:1],
                queue_head=jnp.full(1, jnp.inf), q_d=z[None, :1], buffer_head=jnp.full((1, 1), jnp.inf),
                weight=None if weight is None else jnp.asarray(weight, jnp.int32))


def test_the_routers_pick_what_they_promise():
    """On random rows: JSQ places on a row of least load among those with a free slot (uniformly over
    the tied GPUs, weighing rows by their GPUs); power-of-two on the less loaded of its two draws; both
    wait in buffer 0 when no slot is free."""
    import jax

    jsq, p2 = example("jsq").router, example("power_of_two").router
    rng = np.random.default_rng(0)
    for trial in range(30):
        rows = rng.integers(1, 9)
        loads, free = rng.integers(0, 16, rows), rng.integers(0, 3, rows)
        weight = rng.integers(0, 4, rows) if trial % 2 else None
        v = _view(loads, free, weight)
        has = (free > 0) & (np.asarray(weight) > 0 if weight is not None else True)
        key = jax.random.key(trial)
        g, b = (int(x) for x in jsq.route(key, v, None, 0, -1, -1))
        if has.any():
            assert has[g] and loads[g] == loads[has].min() and b == 0
        else:
            assert g == -1 and b == 0
        g, _ = (int(x) for x in p2.route(key, v, None, 0, -1, -1))
        assert (g >= 0) == has.any() and (g < 0 or has[g])
    # JSQ's ties are uniform over GPUs: rows 0 and 2 tie (load 1), row 2 holds 3 GPUs to row 0's one
    v = _view([1, 5, 1], [1, 1, 1], [1, 1, 3])
    picks = np.array([int(jsq.route(k, v, None, 0, -1, -1)[0]) for k in jax.random.split(jax.random.key(1), 4000)])
    assert set(picks) == {0, 2} and abs(np.mean(picks == 2) - 0.75) <= 4 * np.sqrt(0.75 * 0.25 / 4000)
