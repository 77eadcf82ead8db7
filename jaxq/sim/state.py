"""Spec, params and the accumulators every engine keeps.

* :class:`SimSpec` is static (Python ints: classes, GPUs, waiting-room capacity, mode convention,
  and for the engines shaped by the batch size, B); changing it recompiles.
* :class:`SimParams` holds every number as an array (rates, targets, horizon, warm-up), so a sweep over
  them is a ``vmap`` and reuses the compiled code.
* The rows of the counters, time integrals and status bits below are shared by every engine's state,
  so metrics, sweeps and tests read any engine's result the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
from jaxtyping import Array, Float, Int

from ..model.params import ModelParams
from ..policies.view import ANY, MIXED, PolicyTargets

# Rows of the per-class counters.
ARRIVED, ADMITTED, PREFILL_DONE, DECODE_STARTED, DECODE_DONE, ABANDON_PREFILL, ABANDON_DECODE, LOST, WAITED = range(9)
COUNTER_NAMES = ("arrived", "admitted", "prefill_done", "decode_started", "decode_done",
                 "abandon_prefill", "abandon_decode", "lost", "waited")
NUM_COUNTERS = len(COUNTER_NAMES)
# The counters that are events (arrivals, completions, abandonments): the engine-independent event count.
EVENT_ROWS = (ARRIVED, PREFILL_DONE, DECODE_DONE, ABANDON_PREFILL, ABANDON_DECODE)

# Rows of the per-class time integrals (and of an engine's ``levels``).
INT_QP, INT_X, INT_QD, INT_YM, INT_YS, INT_Y_MIXGROUP = range(6)
INTEGRAL_NAMES = ("Q_p", "X", "Q_d", "Y_m", "Y_s", "Y_mixgroup")

# Status bits (failures are data: reported per replica, never raised inside a batch).
OK, OVERFLOW, DECISIONS_INCOMPLETE, MAX_STEPS, NONFINITE, CAPACITY_VIOLATED = 0, 1, 2, 4, 8, 16
STATUS_NAMES = {OVERFLOW: "waiting room full (jobs lost)", DECISIONS_INCOMPLETE: "decision rounds exhausted",
                MAX_STEPS: "max_steps reached before the horizon", NONFINITE: "non-finite time or rate",
                CAPACITY_VIOLATED: "a GPU exceeded its slots or a count went negative (engine bug)"}


@dataclasses.dataclass(frozen=True)
class SimSpec:
    """Static shape and semantics constants.

    num_classes, num_gpus: I and n.
    room: capacity of each per-class waiting room (prefill queue, each decode buffer) of the event
        engines. A one-class model keeps no entry times (nothing to order across classes): its rooms
        are counts, unbounded.
    convention: "B" (paper eqs. 18-19: a decode runs at mu_m while its GPU runs a prefill) or "A"
        (decodes on mixed-group GPUs always at mu_m, on solo-group GPUs at mu_s).
    dtype: "float64" or "float32" for rates and random draws (faster on accelerators). Simulated
        time and the time integrals stay float64 whatever this says.
    max_batch: decode slots per GPU as a shape, for the engines whose arrays B shapes (the
        population engine's configurations, the general engine's per-slot work); None for the others.
        A run whose ``params.model.B`` exceeds it raises CAPACITY_VIOLATED.
    """

    num_classes: int
    num_gpus: int
    room: int = 1024
    convention: Literal["A", "B"] = "B"
    dtype: Literal["float64", "float32"] = "float64"
    max_batch: int | None = None

    def __post_init__(self):
        for name, lo in (("num_classes", 1), ("num_gpus", 1), ("room", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"invalid SimSpec field '{name}': must be an integer >= {lo}, got {v!r}")
        v = self.max_batch
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"invalid SimSpec field 'max_batch': must be None or an integer >= 1, got {v!r}")
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"invalid SimSpec field 'dtype': must be 'float64' or 'float32', got {self.dtype!r}")
        if self.convention not in ("A", "B"):
            raise ValueError(f"invalid SimSpec field 'convention': must be 'A' or 'B', got {self.convention!r}")


class SimParams(eqx.Module):
    model: ModelParams
    targets: PolicyTargets
    horizon: Float[Array, ""]
    warmup: Float[Array, ""]
    max_steps: Int[Array, ""]


def runs_slow(convention: str, group, prefill_class):
    """Whether decodes on a GPU run at mu_m (True) or mu_s. Convention B (paper eqs. 18-19): while the
    GPU runs a prefill. Convention A: always on G_mix, never on G_solo (and B's rule on "any" GPUs)."""
    has_prefill = prefill_class >= 0
    if convention == "A":
        return (group == MIXED) | ((group == ANY) & has_prefill)
    return has_prefill
