"""A1 (BANDITS.md §5.3): at c_β = 1 the online and the pooled confidence intervals hold.

Per branch δ = 0.025, so by the union bound both hold jointly, uniformly over the horizon, with
probability >= 1 - 0.05. Checked two ways: the frequency of violations over all evaluated (arm, round,
seed) triples is <= 0.05 (BANDITS.md's statement), and the number of seeds with any violation is within
3 binomial SEs of 0.05 x seeds (the theorem's uniform-in-time statement). The naive warm start, whose
interval ignores the shift, must fail on most seeds in the misaligned case (the check has power).
"""

import math

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxq.bandits import experiment as X

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bandits" / "a1-validity.toml"
DELTA_JOINT = 0.05


def _violations(seeds, T):
    cfg = X.load_config(CONFIG)
    spec, run, keys, env, algos = X.prepare(cfg, "quick", seeds=seeds, T=T)
    rec = jax.tree.map(np.asarray, X.run_batch(keys, spec, run, env, algos))
    return cfg, rec


def _check(cfg, rec):
    names = [a.name for a in cfg.algorithms]
    K = cfg.problem["K"]
    R, B = rec.regret.shape[1], rec.regret.shape[2]
    for ci, (case, _) in enumerate(cfg.cases):
        for ai, name in enumerate(names):
            pairs = K * B * cfg.record_every * R  # (arm, round, seed) triples evaluated
            viol_on = rec.viol_on[ci, ..., ai].sum()
            viol_pool = rec.viol_pool[ci, ..., ai].sum()
            seeds_violated = ((rec.viol_on[ci, ..., ai] + rec.viol_pool[ci, ..., ai]).sum(-1) > 0).sum()
            if name == "Naive warm start":
                if case == "misaligned":
                    assert seeds_violated >= R / 2 and viol_pool > 0, (case, seeds_violated)
                continue
            # Union of the two events <= the sum of the counts.
            assert (viol_on + viol_pool) / pairs <= DELTA_JOINT, (case, name, viol_on, viol_pool, pairs)
            bound = DELTA_JOINT * R + 3 * math.sqrt(DELTA_JOINT * (1 - DELTA_JOINT) * R)
            assert seeds_violated <= bound, (case, name, seeds_violated, bound)
            if cfg.algorithms[ai].kind == "learned":
                after = (np.arange(B) + 1) * cfg.record_every >= cfg.algorithms[ai].tau1
                invalid = 1.0 - rec.cert_ok[ci, :, after, ai].mean()
                assert invalid <= DELTA_JOINT, (case, name, invalid)


def test_a1_confidence_intervals_hold_small():
    cfg, rec = _violations(seeds=8, T=500)
    _check(cfg, rec)


@pytest.mark.slow
def test_a1_confidence_intervals_hold_full_size():
    cfg, rec = _violations(seeds=50, T=5000)
    _check(cfg, rec)
