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
