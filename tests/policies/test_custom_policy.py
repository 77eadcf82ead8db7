"""A user-defined policy runs on the engine unchanged: the join-the-shortest-queue decode router of
docs/simulation.md, verbatim."""

from typing import ClassVar

import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq.policies import AbstractPolicy, lexicographic_argmin
from jaxq.policies.base import occupancy_gate
from jaxq.sim.api import run


class JoinShortestQueue(AbstractPolicy):
    """GG-SP's gate; a decode joins the GPU with the fewest decodes among those with a free decode
    slot (solo or mixed alike, lowest index on ties), else the FCFS buffer."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "jsq"

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)

    def route(self, key, view, targets, cls, origin):
        load = jnp.sum(view.decodes, axis=1)
        gpu = lexicographic_argmin(view.free_decode > 0, load, jnp.zeros_like(load))
        return gpu, jnp.int32(0)


def test_custom_policy_runs_and_balances_decodes():
    s = jaxq.load_scenario("canonical")
    res = run(s, JoinShortestQueue(), n=8, replicas=4, horizon=200.0, warmup=50.0)
    assert not res.status and res.policy == "jsq"
    dec = np.asarray(res.state.decodes).sum(-1)  # (R, n)
    M = res.num_mixed
    # JSQ keeps decode counts level: on each replica the solo GPUs differ by at most a few streams
    assert np.all(dec[:, M:].max(-1) - dec[:, M:].min(-1) <= 3)
    assert res.summary["revenue_bundled"].mean > 200
