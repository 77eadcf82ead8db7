"""Offline-to-online linear contextual bandits: Ellipsoidal-MINUCB and its baselines (BANDITS.md).

* :mod:`~jaxq.bandits.env`: the linear contextual bandit with biased offline regression data.
* :mod:`~jaxq.bandits.algorithms`: OFUL, naive warm start, pooled-only, scalar-shift MINUCB,
  Ellipsoidal-MINUCB (known or epoch-wise learned certificate) as optax-style init/act/update functions.
* :mod:`~jaxq.bandits.suplinucb`: SupLinUCB and its MINUCB version (§3.2), vectorised over stages.
* :mod:`~jaxq.bandits.rollout`: scanned rollouts, algorithm families vmapped on a shared stream.
* :mod:`~jaxq.bandits.experiment`: experiments E1-E6 from versioned TOML configs (``jaxq bandit``).
* :mod:`~jaxq.bandits.reference`: a plain per-round NumPy implementation, for tests.
"""

from .algorithms import (
    ActInfo,
    BanditAlgorithm,
    MinUCBParams,
    MinUCBState,
    act,
    certificate_inverse,
    ellipsoidal_minucb,
    init,
    learned_minucb,
    make_algorithm,
    minucb_params,
    naive_warm_start,
    oful,
    pooled_only,
    refresh,
    scalar_minucb,
    update,
)
from .env import BanditSpec, EnvParams, OfflineStats, Problem, draw_round, make_problem, sample_stream
from .experiment import ExperimentConfig, load_config, run_batch, run_config, summarise
from .rollout import MinUCBFamily, Record, RunSpec, SupFamily, Trace, rollout, rollout_actions, rollout_families
from .suplinucb import SupParams, SupState, sup_params

__all__ = [
    "ActInfo", "BanditAlgorithm", "BanditSpec", "EnvParams", "ExperimentConfig", "MinUCBParams", "MinUCBState",
    "MinUCBFamily", "OfflineStats", "Problem", "Record", "RunSpec", "SupFamily", "SupParams", "SupState", "Trace", "act", "certificate_inverse", "draw_round",
    "ellipsoidal_minucb", "init", "learned_minucb", "load_config", "make_algorithm", "make_problem",
    "minucb_params", "naive_warm_start", "oful", "pooled_only", "refresh", "rollout", "rollout_actions",
    "rollout_families", "run_batch", "run_config", "sample_stream", "scalar_minucb", "summarise", "sup_params", "update",
]
