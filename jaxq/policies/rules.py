"""The paper's policies (MODEL.md §5) and the Sec 6.3 baselines (MODEL.md §7.3).

| name         | gate                       | decode placement                           | partition |
|--------------|----------------------------|--------------------------------------------|-----------|
| GG-SP        | occupancy gate (xi rule)   | greedy: solo first, then mixed, then buffer | yes       |
| PRIORITY     | static priority max D/P    | greedy                                     | yes       |
| SLI          | occupancy gate             | randomized p_solo,i, split buffers         | yes       |
| FI-WSP       | FCFS across classes        | coupled: decode stays in its prefill slot  | no        |
| GI-WSP       | occupancy gate             | coupled                                    | no        |
| GF-WSP       | occupancy gate             | decoupled, uniform over free slots, prefill-first | no  |
| FG-SP        | FCFS across classes        | greedy                                     | yes       |
| GG-SP-HB     | occupancy gate, held while the decode buffer is non-empty (option) | greedy | yes |

Without a partition every GPU is "any": at most B jobs, at most one of them a prefill.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..sim.state import MIXED, SOLO
from .base import (
    AbstractPolicy,
    any_free_route,
    choice_from_uniform,
    fcfs_gate,
    greedy_route,
    lexicographic_argmin,
    occupancy_gate,
)


class GateAndRoute(AbstractPolicy):
    """GG-SP (MODEL.md §5.1). Gate: on an idle G_mix prefill slot admit the head-of-line job of
    argmin_i (X_i - n x_i*)/x_i* over classes with waiting jobs, ties to the largest Q_p,i - n q_p,i*,
    never a class with x_i* = 0. Router: a G_solo GPU with a free slot, uniformly; else a G_mix GPU with
    fewer than B-1 decodes, uniformly; else the single decode buffer, FCFS across classes."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "gg-sp"
    batch_router: ClassVar[str] = "greedy"

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)

    def route(self, key, view, targets, cls, origin):
        return greedy_route(key, view)


class GateAndRouteHoldBack(AbstractPolicy):
    """GG-SP with a decode-aware hold-back (an option, not the paper's rule): while the decode buffer
    holds more than ``threshold`` jobs (default 0), the gate admits no class that the LP rations
    (q_p,i* > 0; the fully served classes still pass). At finite n, M = ceil(n sum x*) hands the spare prefill capacity
    to the class that always waits; its extra prefills overload the critically loaded decode stage and
    then abandon from the decode buffer after consuming a prefill. Holding them back keeps that overflow
    in the prefill queue, where abandoning costs nothing, and lets the idle G_mix GPUs decode at mu_s
    (docs/finite-n.md)."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "gg-sp-hb"
    batch_router: ClassVar[str] = "greedy"
    admits_in_bursts: ClassVar[bool] = True
    threshold: int = eqx.field(static=True, default=0)

    def gate(self, key, view, targets):
        congested = jnp.sum(view.q_d) > self.threshold
        rationed = targets.q_p_target > 0  # classes the LP does not serve in full
        return occupancy_gate(view, targets, allowed=~congested | ~rationed)

    def route(self, key, view, targets, cls, origin):
        return greedy_route(key, view)


class PrioritizeAndRoute(AbstractPolicy):
    """Prioritize-and-route (MODEL.md §5.2, for separate charging). Gate: admit the waiting class with
    the largest D_i/P_i (ties: lowest index); every class is admissible. Router: as GG-SP."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "priority"
    batch_router: ClassVar[str] = "greedy"

    def gate(self, key, view, targets):
        return lexicographic_argmin(view.q_p > 0, -targets.priority, jnp.zeros_like(targets.priority))

    def route(self, key, view, targets, cls, origin):
        return greedy_route(key, view)


class SLIGateAndRoute(AbstractPolicy):
    """SLI-aware gate-and-route (MODEL.md §5.3). Gate: as GG-SP. Router: a class-i job whose prefill
    finished targets G_solo with probability p_solo,i, else G_mix; it takes a GPU of that group with a
    free decode slot uniformly at random, else waits in that group's own buffer (0: solo-bound,
    1: mixed-bound), FCFS across classes. A freed slot in a group takes that group's buffer head."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 2
    name: ClassVar[str] = "sli"
    batch_router: ClassVar[str] = "split"

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)

    def route(self, key, view, targets, cls, origin):
        u = jax.random.uniform(key, (2,))  # the coin and the GPU, from one draw
        to_solo = u[0] <= targets.p_solo[jnp.maximum(cls, 0)]
        # a buffer head keeps the group of its buffer: 0 -> solo, 1 -> mixed
        to_solo = jnp.where(origin >= 0, origin == 0, to_solo)
        group = jnp.where(to_solo, SOLO, MIXED)
        gpu = choice_from_uniform(u[1], (view.group == group) & (view.free_decode > 0), view.weight)
        return gpu, jnp.where(to_solo, 0, 1).astype(jnp.int32)

    def buffer_has_slot(self, view, targets, b):
        group = SOLO if b == 0 else MIXED
        return jnp.any((view.group == group) & (view.free_decode > 0))


class FIWSP(AbstractPolicy):
    """FI-WSP, the Sarathi-Serve-style industry baseline: FCFS across classes by arrival time, no gate,
    no partition; an admitted job takes a slot on a GPU with a free slot and no running prefill
    (uniformly), and after its prefill it decodes in that same slot ("immediate", coupled)."""

    partitioned: ClassVar[bool] = False
    coupled: ClassVar[bool] = True
    prefill_first: ClassVar[bool] = True
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "fi-wsp"
    batch_router: ClassVar[str] = "coupled"

    def gate(self, key, view, targets):
        return fcfs_gate(view)

    def route(self, key, view, targets, cls, origin):  # never called: coupled
        return jnp.int32(-1), jnp.int32(0)


class GIWSP(AbstractPolicy):
    """GI-WSP: FI-WSP's coupled placement with GG-SP's occupancy gate (targets n x_i*), no partition."""

    partitioned: ClassVar[bool] = False
    coupled: ClassVar[bool] = True
    prefill_first: ClassVar[bool] = True
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "gi-wsp"
    batch_router: ClassVar[str] = "coupled"

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)

    def route(self, key, view, targets, cls, origin):
        return jnp.int32(-1), jnp.int32(0)


class GFWSP(AbstractPolicy):
    """GF-WSP: occupancy gate, no partition, decoupled decodes placed uniformly among GPUs with a free
    slot, else one FCFS buffer; prefill-first: a freed slot on a GPU without a prefill admits a new
    prefill before a waiting decode takes it."""

    partitioned: ClassVar[bool] = False
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = True
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "gf-wsp"
    batch_router: ClassVar[str] = "any"

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)

    def route(self, key, view, targets, cls, origin):
        return any_free_route(key, view)


class FGSP(AbstractPolicy):
    """FG-SP: static partition and GG-SP's greedy router, but an FCFS gate across classes (no occupancy
    feedback; every class admissible)."""

    partitioned: ClassVar[bool] = True
    coupled: ClassVar[bool] = False
    prefill_first: ClassVar[bool] = False
    num_buffers: ClassVar[int] = 1
    name: ClassVar[str] = "fg-sp"
    batch_router: ClassVar[str] = "greedy"

    def gate(self, key, view, targets):
        return fcfs_gate(view)

    def route(self, key, view, targets, cls, origin):
        return greedy_route(key, view)


POLICIES = {p.name: p for p in (GateAndRoute, PrioritizeAndRoute, SLIGateAndRoute, FIWSP, GIWSP, GFWSP, FGSP,
                                 GateAndRouteHoldBack)}


def get_policy(name: str) -> AbstractPolicy:
    try:
        return POLICIES[name.lower()]()
    except KeyError:
        raise ValueError(f"invalid field 'policy': must be one of {', '.join(POLICIES)}, got {name!r}") from None
