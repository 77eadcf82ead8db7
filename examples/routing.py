"""Two decode routers written once and run on every engine: join-the-shortest-queue and
power-of-two-choices, each with gate-and-route's occupancy gate and static partition.

    jaxq simulate canonical --policy examples/routing.py:jsq --engine population
    jaxq simulate canonical --policy examples/routing.py:power_of_two --engine stepped

A router written per job (``AbstractPerJobRouter``) decides one job at a time; the time-stepped engine
then calls it once per job of a step (its bulk form comes for free). Both routers choose among GPUs
uniformly at random through ``view.weight``, so they treat GPUs of one configuration alike and the
population engine runs them exactly (``exchangeable = True``).
"""

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxq.policies import AbstractPerJobRouter, OccupancyGate, Policy, StaticPartition, choice_from_uniform, uniform_choice


class JoinShortestQueue(AbstractPerJobRouter):
    """A job joins a GPU running the fewest decodes among those with a free decode slot (G_solo and
    G_mix alike), uniformly at random among the tied; with none free it waits in the FCFS buffer."""

    num_buffers: ClassVar[int] = 1
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        free = view.free_decode > 0
        load = jnp.where(free, jnp.sum(view.decodes, axis=1), jnp.iinfo(jnp.int32).max)
        least = free & (load == jnp.min(load))
        return uniform_choice(key, least, view.weight), jnp.int32(0)


class PowerOfTwoChoices(AbstractPerJobRouter):
    """Two GPUs drawn uniformly at random (with replacement) among those with a free decode slot; the
    job joins the one running fewer decodes (the first drawn on a tie); with none free it waits in the
    FCFS buffer."""

    num_buffers: ClassVar[int] = 1
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        u = jax.random.uniform(key, (2,))  # both draws from one call (each call is a hash)
        free = view.free_decode > 0
        first = choice_from_uniform(u[0], free, view.weight)
        second = choice_from_uniform(u[1], free, view.weight)
        load = jnp.sum(view.decodes, axis=1)
        return jnp.where(load[jnp.maximum(second, 0)] < load[jnp.maximum(first, 0)], second, first), jnp.int32(0)


jsq = Policy("jsq", OccupancyGate(), JoinShortestQueue(), StaticPartition())
power_of_two = Policy("power-of-two", OccupancyGate(), PowerOfTwoChoices(), StaticPartition())
