"""The population engine (GPUs counted by configuration): its configuration tables, the same arrivals
and the same law as the per-GPU exact engine for every policy and both conventions, Erlang-A at a
cluster size the per-GPU engine would pay n for, the maintained aggregates, sweeps, and clear errors
(among them: a policy that tells GPUs of one configuration apart is refused). What every engine must
do (conservation, determinism, compile counts) is in test_core.py."""

import itertools
import math

import jax
import numpy as np
import pytest

from jaxq.metrics import estimate
from jaxq.policies import ANY, MIXED, POLICIES, SOLO, get_policy
from jaxq.sim import SimSpec, engine_spec, run_replicas
from jaxq.api import make_params, run
from jaxq.sim.population import configurations, num_configurations
from jaxq.sim.state import ARRIVED, CAPACITY_VIOLATED
from jaxq.testing.checks import final_rows
from jaxq.testing.closed_forms import erlang_a
from jaxq.testing.scenarios import canonical, mmc_scenario

CANONICAL = canonical()


@pytest.mark.parametrize("num, B, partitioned", [(1, 1, False), (2, 16, True), (2, 16, False), (3, 4, True)])
def test_configurations_are_every_allowed_gpu_and_moves_are_consistent(num, B, partitioned):
    kinds = (MIXED, SOLO) if partitioned else (ANY,)
    cfg = configurations(num, B, kinds)
    # count by hand: decode vectors with sum <= m are C(m + num, num)
    vectors = lambda m: math.comb(m + num, num)  # noqa: E731
    expected = (num + 1) * vectors(B - 1) + vectors(B) if partitioned else vectors(B) + num * vectors(B - 1)
    assert cfg.size == expected == num_configurations(num, B, kinds)
    assert len({(g, p, tuple(d)) for g, p, d in zip(cfg.group, cfg.prefill, cfg.decodes)}) == cfg.size
    for k in range(cfg.size):
        g, p, d = cfg.group[k], cfg.prefill[k], cfg.decodes[k]
        cap = B - 1 if g == MIXED else B if g == SOLO else B - (p >= 0)
        assert d.sum() <= cap and (g != SOLO or p < 0)
        for c in range(num):
            up = cfg.add[k, c]
            assert (up >= 0) == (d.sum() < cap)
            if up >= 0:
                assert cfg.remove[up, c] == k and cfg.decodes[up, c] == d[c] + 1
            assert (cfg.remove[k, c] >= 0) == (d[c] > 0)
        for q in range(-1, num):
            to = cfg.set_prefill[k, q + 1]
            allowed = q < 0 or (g == MIXED) or (g != SOLO and d.sum() + 1 <= B)
            assert (to >= 0) == allowed
            if to >= 0:
                assert cfg.prefill[to] == q and np.array_equal(cfg.decodes[to], d)


def compare(a, b, keys, k=4.0):
    """Two-sample z of per-replica metrics (replicas independent within each engine)."""
    for key in keys:
        ea, eb = estimate(a.metrics[key]), estimate(b.metrics[key])
        diff = np.atleast_1d(ea.mean - eb.mean)
        se = np.atleast_1d(np.hypot(ea.se, eb.se))
        z = np.abs(diff) / np.maximum(se, 1e-12)
        assert np.all(z <= k), f"{key}: {ea.mean} vs {eb.mean} ({z} SE)"


METRICS = ("revenue_bundled", "x", "y_m", "y_s", "q_p", "q_d", "abandon_prefill_fraction")


SLOW = pytest.mark.slow


# FI-WSP's law is also checked by the Erlang-A test below (through this engine); it runs with --run-slow
@pytest.mark.parametrize("name, convention", [("gg-sp", "B"), pytest.param("fi-wsp", "B", marks=SLOW),
                                              pytest.param("gf-wsp", "B", marks=SLOW), pytest.param("sli", "B", marks=SLOW),
                                              pytest.param("gi-wsp", "A", marks=SLOW),
                                              pytest.param("gg-sp-hb", "A", marks=SLOW)])
def test_same_law_and_arrivals_as_the_exact_engine(name, convention):
    """Same keys: the same arrivals (common random numbers), and every metric within 4 SE. The shared
    arrivals correlate the two engines positively, so the independent-samples SE is conservative."""
    kw = dict(n=8, replicas=48, horizon=300.0, warmup=60.0, convention=convention, room=256, seed=3)
    pop = run(CANONICAL, name, engine="population", **kw)
    ref = run(CANONICAL, name, engine="exact", **kw)
    assert not pop.status and not ref.status
    np.testing.assert_array_equal(np.asarray(pop.state.totals[:, ARRIVED]), np.asarray(ref.state.totals[:, ARRIVED]))
    compare(pop, ref, METRICS)


@pytest.mark.parametrize("name", [p if p in ("gg-sp", "fi-wsp", "sli") else pytest.param(p, marks=SLOW)
                                  for p in sorted(POLICIES)])
def test_maintained_aggregates_are_the_populations(name):
    # the shapes of test_same_law_and_arrivals_as_the_exact_engine: its compiled program is reused
    res = run(CANONICAL, name, engine="population", n=8, replicas=48, horizon=80.0, warmup=10.0, room=256)
    s = res.state
    assert not res.status, res.status
    policy = get_policy(name)
    spec = engine_spec("population", CANONICAL, 8, 256)
    params = make_params(CANONICAL, policy, 8, 80.0, 10.0)[0]
    rows = final_rows(s, params, spec, policy, "population")
    pop, decodes = rows["weight"], rows["decodes"]  # (R, K), (R, K, I): each configuration's count and decodes
    assert np.all(pop >= 0) and np.all(pop.sum(-1) == 8)
    np.testing.assert_array_equal(np.asarray(s.Y_speed).sum(1), (pop[..., None] * decodes).sum(1))
    np.testing.assert_array_equal(np.asarray(s.X), (pop[..., None] * (rows["prefill_class"][..., None]
                                                                        == np.arange(2))).sum(1))
    np.testing.assert_array_equal((pop * (rows["group"] == MIXED)).sum(-1), int(res.num_mixed) * (MIXED in
                                  policy.partition.kinds))


def test_erlang_a_at_a_thousand_servers():
    """M/M/c+M with c = 1000 through the general model (one class, B = 1, FI-WSP: K = 3 rows whatever
    c is): the Erlang-A queue length, abandonment and delay probabilities within 3 SE."""
    c, lam, theta = 1000, 980.0, 0.5
    exact = erlang_a(c, lam, 1.0, theta)
    res = run(mmc_scenario(c, lam, theta), "fi-wsp", engine="population", n=c, replicas=16, horizon=60.0,
              warmup=15.0, room=512)
    assert not res.status
    m = res.metrics
    for samples, target in ((m["q_p"][:, 0] * c, exact.mean_queue), (m["abandon_prefill_fraction"][:, 0], exact.p_abandon),
                            (m["wait_probability"][:, 0], exact.p_wait)):
        e = estimate(samples)
        # the 1-token prefill (1.3e-4 s) lengthens each service by 1.3e-4 relative: far below the SE here
        assert abs(e.mean - target) <= 3 * e.se, (e.mean, target, e.se)


def test_a_batch_larger_than_the_tables_is_flagged_not_ignored():
    policy = get_policy("gg-sp")
    params, _, _ = make_params(CANONICAL, policy, 6, horizon=60.0, warmup=0.0)  # B = 16
    spec = SimSpec(num_classes=2, num_gpus=6, room=128, max_batch=4)
    state, _ = run_replicas(jax.random.split(jax.random.key(0), 2), params, spec, policy, engine="population")
    assert np.all(np.asarray(state.status) & CAPACITY_VIOLATED)


def test_population_refuses_non_exponential_service():
    with pytest.raises(ValueError, match="service"):
        run(CANONICAL, "gg-sp", engine="population", n=4, replicas=1, horizon=1.0, service="deterministic")


def test_sweep_runs_the_population_engine(tmp_path):
    from jaxq.sweep.grid import loads_grid
    from jaxq.sweep.runner import run_sweep

    grid = loads_grid('scenario = "canonical"\n[base]\nn = 6\nreplicas = 2\nhorizon = 30.0\nengine = "population"\n'
                      '[grid]\npolicy = ["gg-sp"]\n"classes.lam" = [[0.5, 0.5], [0.4, 0.5]]\n')
    out = run_sweep(grid, tmp_path / "s", quiet=True)
    assert out.complete and len(out.rows) == 2
    assert all(int(r["status_ok"]) == 2 for r in out.rows)
    with pytest.raises(ValueError, match="dt"):
        loads_grid('scenario = "canonical"\n[base]\nengine = "population"\ndt = 0.01\n')


def test_cost_does_not_depend_on_n():
    """The compiled step's shapes are the same for n = 10 and n = 10,000 (K rows either way)."""
    shapes = []
    for n in (10, 10_000):
        policy = get_policy("gg-sp")
        params, _, _ = make_params(CANONICAL, policy, n, horizon=1.0, warmup=0.0)
        spec = SimSpec(num_classes=2, num_gpus=n, room=64, max_batch=16)
        out = jax.eval_shape(lambda k, p: run_replicas(k, p, spec, policy, engine="population")[0],  # noqa: B023
                             jax.random.split(jax.random.key(0), 2), params)
        shapes.append(tuple(itertools.chain.from_iterable(x.shape for x in jax.tree_util.tree_leaves(out))))
    assert shapes[0] == shapes[1]
