"""The confidence radius is the theory's, pinned to numbers computed here from Abbasi-Yadkori et al.
(2011, Thm 2), β = c_β (σ sqrt(2 log(1/δ) + log(det A / λ^d)) + √λ S), in the vectorised algorithm and
in the NumPy reference alike; the A1 validity experiment runs at c_β = 1; a run repeats exactly.
Together they make a shrunken radius fail a test (the A1 coverage check alone cannot see one: the
self-normalised bound is conservative, so a halved radius still covers)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.bandits import experiment as X
from jaxq.bandits.algorithms import confidence_radius
from jaxq.bandits.reference import RefAlgorithm, _radius

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bandits"


def _theory(A, lam, S, delta, sigma, c_beta):
    d = A.shape[0]
    info = max(math.log(np.linalg.det(A)) - d * math.log(lam), 0.0)
    return c_beta * (sigma * math.sqrt(2 * math.log(1 / delta) + info) + math.sqrt(lam) * S)


class _Params:  # the fields confidence_radius reads
    def __init__(self, sigma, c_beta):
        self.sigma, self.c_beta = jnp.float64(sigma), jnp.float64(c_beta)


@pytest.mark.parametrize("sigma, lam, S, delta, c_beta", [(1.0, 1.0, 1.0, 0.05, 1.0), (0.5, 2.0, 3.0, 0.025, 1.0),
                                                           (0.5, 1.0, 1.0, 0.01, 0.3)])
def test_radius_is_the_theory_radius(sigma, lam, S, delta, c_beta):
    rng = np.random.default_rng(0)
    d = 4
    X_ = rng.normal(size=(30, d))
    for A in (lam * np.eye(d), lam * np.eye(d) + X_.T @ X_):
        want = _theory(A, lam, S, delta, sigma, c_beta)
        logdet = float(np.linalg.slogdet(A)[1])
        got_jax = float(confidence_radius(_Params(sigma, c_beta), jnp.float64(logdet), jnp.float64(delta),
                                          jnp.float64(lam), jnp.float64(S), d))
        ref = RefAlgorithm(sigma=sigma, c_beta=c_beta)
        got_ref = _radius(ref, A, lam, S, delta)
        assert got_jax == pytest.approx(want, rel=1e-12) and got_ref == pytest.approx(want, rel=1e-12)
    # with no data, by hand: sqrt(2 ln 20) + 1 = 3.44775...
    if (sigma, lam, S, delta, c_beta) == (1.0, 1.0, 1.0, 0.05, 1.0):
        assert _theory(np.eye(d), 1.0, 1.0, 0.05, 1.0, 1.0) == pytest.approx(math.sqrt(2 * math.log(20)) + 1, rel=1e-15)


def test_validity_experiment_uses_the_theory_radius():
    cfg = X.load_config(CONFIGS / "a1-validity.toml")
    scales = {a.name: a.c_beta for a in cfg.algorithms}
    assert scales and all(v == 1.0 for v in scales.values()), scales


def test_the_same_seed_gives_the_same_run():
    cfg = X.load_config(CONFIGS / "e4.toml")
    spec, run, keys, env, algos = X.prepare(cfg, "quick", seeds=2, T=100)
    first = jax.tree.map(np.asarray, X.run_batch(keys, spec, run, env, algos))
    again = jax.tree.map(np.asarray, X.run_batch(keys, spec, run, env, algos))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    other = jax.tree.map(np.asarray, X.run_batch(X.seed_keys(99, 2), spec, run, env, algos))
    assert not np.array_equal(first.regret, other.regret)


def test_oful_regret_is_below_the_theory_bound():
    """Abbasi-Yadkori et al. (2011), Thm 3, with the constants the run uses: on the event that the
    confidence set holds (probability >= 1 - δ), R_T <= 2 max(L S, β_T) sqrt(2 T d log(1 + T L^2/(λ d))),
    β_T = σ sqrt(2 log(1/δ) + d log(1 + T L^2/(λ d))) + √λ S, here with ||θ|| = S = 1 and unit contexts
    (L = 1). Every seed must be below it, except with probability δ per seed (3 binomial SEs of slack)."""
    import tomllib

    with (CONFIGS / "e1.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    raw["problem"].update(d=3, K=10, covered=1)
    raw["algorithm_defaults"].update(c_beta=1.0, delta=0.05)
    raw["algorithms"] = [{"name": "OFUL", "kind": "oful"}]
    raw["run"]["quick"] = {"T": 2000, "seeds": 12, "checkpoints": [2000]}
    cfg = X.config_from_dict(raw)
    spec, run, keys, env, algos = X.prepare(cfg, "quick")
    rec = jax.tree.map(np.asarray, X.run_batch(keys, spec, run, env, algos))
    regret = rec.regret[0, :, -1, 0]  # cumulative pseudo-regret at T, per seed
    T, d, lam, S, L, sigma, delta = 2000, 3, 1.0, 1.0, 1.0, float(raw["problem"]["sigma"]), 0.05
    info = d * math.log(1 + T * L**2 / (lam * d))
    beta_T = sigma * math.sqrt(2 * math.log(1 / delta) + info) + math.sqrt(lam) * S
    bound = 2 * max(L * S, beta_T) * math.sqrt(2 * T * info)
    above = int((regret > bound).sum())
    assert above <= delta * len(regret) + 3 * math.sqrt(delta * (1 - delta) * len(regret)), (regret, bound)
    assert np.all(regret >= 0) and np.all(np.isfinite(regret))
    # and the bound is not vacuous here: below the 2T that any policy's regret stays under
    assert bound < 2 * T
