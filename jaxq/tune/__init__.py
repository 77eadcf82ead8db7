"""Tune the static-planning policies' parameters by gradient through the fluid model (optax).

See docs/tuning.md. The fluid fixed point y*(theta) of a policy theta = (mixed fraction, gate
targets, router probabilities) is found by integration plus Newton polish and differentiated by the
implicit function theorem; optax's Adam then maximises the long-run revenue rate minus an SLI or
latency penalty at that fixed point.
"""

from .objectives import (
    DEFAULT_KIND,
    DEFAULT_WEIGHT,
    OBJECTIVES,
    PENALTIES,
    Evaluation,
    Objective,
    penalty_vector,
    tpot_ratio,
    value_and_grad,
)
from .optimize import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_PERTURB,
    DEFAULT_STEPS,
    Reference,
    TuneResult,
    lp_reference,
    tune,
)
from .params import TunableParams
from .steady import TUNABLE_KINDS, SteadyState, horizon_state, steady_state

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_PERTURB",
    "DEFAULT_STEPS",
    "DEFAULT_WEIGHT",
    "OBJECTIVES",
    "PENALTIES",
    "TUNABLE_KINDS",
    "Evaluation",
    "Objective",
    "Reference",
    "SteadyState",
    "TunableParams",
    "TuneResult",
    "horizon_state",
    "lp_reference",
    "penalty_vector",
    "steady_state",
    "tpot_ratio",
    "tune",
    "value_and_grad",
]
