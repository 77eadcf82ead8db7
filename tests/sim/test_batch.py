"""Batching and sharding (jaxq.sim.batch): results independent of the number of devices, padding
dropped, the default waiting room."""

import jax
import numpy as np
import pytest

from jaxq.policies import get_policy
from jaxq.sim import default_room, engine_spec, run_replicas
from jaxq.api import make_params
from jaxq.testing.scenarios import canonical

CANONICAL = canonical()


@pytest.mark.parametrize("engine", ["exact", "stepped"])
def test_sharded_run_equals_one_device(engine):
    """Replicas sharded over the 4 host devices conftest makes (3 replicas: one padding key): every
    replica equals the unsharded batched run on the same keys."""
    assert len(jax.devices()) == 4
    policy = get_policy("gg-sp")
    params, _, _ = make_params(CANONICAL, policy, 6, horizon=60.0, warmup=10.0)
    spec = engine_spec(engine, CANONICAL, 6)
    keys = jax.random.split(jax.random.key(5), 3)
    many, _ = run_replicas(keys, params, spec, policy, engine=engine)
    one, _ = run_replicas(keys, params, spec, policy, engine=engine, devices=jax.devices()[:1])
    for x, y in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one)):
        assert x.shape[0] == 3
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_default_room_holds_an_unserved_queue():
    """A queue nobody serves is Poisson(n lam / theta): the room holds 1.25 x its mean + 64."""
    n = 50
    need = n * CANONICAL.classes.lam / CANONICAL.classes.theta
    assert default_room(CANONICAL, n) == int(1.25 * need.max() + 64)
    assert default_room(CANONICAL.replace(**{"classes.theta": [0.0, 0.0]}), 10**6) == 2**14


# -- sizes refused before anything is traced ----------------------------------------------------------

def test_check_sizes_refuses_what_cannot_work():
    import jaxq
    from jaxq.sim.batch import check_sizes, engine_spec

    sc = jaxq.load_scenario("canonical")

    def check(n, replicas=8, horizon=1000.0, engine="exact", dt=None, memory=24 * 2**30):
        check_sizes(engine, engine_spec(engine, sc, n), sc, replicas, horizon, dt, memory=memory)

    check(500)  # the paper's size is fine
    with pytest.raises(ValueError, match=r"invalid field 'n'.*32-bit index; at most n = 67108863"):
        check(3_000_000_000)
    with pytest.raises(ValueError, match=r"invalid field 'n' / 'replicas'.*GiB of memory.*24 GiB"):
        check(10_000_000, replicas=64)
    check(10_000_000, replicas=64, horizon=100.0, engine="population")  # counts configurations: no per-GPU state
    with pytest.raises(ValueError, match=r"invalid field 'horizon'.*int32 counters"):
        check(500, horizon=1e9)
    with pytest.raises(ValueError, match=r"invalid field 'dt'.*step counter"):
        check(5, horizon=1e7, engine="stepped", dt=1e-3)


@pytest.mark.parametrize("argv", [["--n", "3000000000"], ["--n", "100000000", "--replicas", "64"],
                                  ["--n", "10000000", "--replicas", "64"]])
def test_cli_refuses_huge_sizes_in_one_line(argv, capsys):
    import time

    from jaxq.cli import main

    t0 = time.perf_counter()
    assert main(["simulate", "canonical", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid field 'n'" in err and time.perf_counter() - t0 < 10
