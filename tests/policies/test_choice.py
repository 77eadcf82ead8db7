"""weighted_search, the choice behind every weighted and uniform pick of the engines, against numpy's
searchsorted over the cumulative sum (short arrays, and long ones searched in two levels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.policies.choice import choice_from_uniform, weighted_search


@pytest.mark.parametrize("n", [1, 5, 32, 33, 100, 500, 1000])
def test_matches_searchsorted_of_the_cumulative_sum(n):
    rng = np.random.default_rng(n)
    search = jax.jit(jax.vmap(weighted_search, in_axes=(None, 0)))
    for zeros in (0.0, 0.5, 0.95):
        w = rng.integers(0, 4, n) * (rng.random(n) >= zeros)
        cum = np.cumsum(w)
        v = np.concatenate([np.arange(-1, cum[-1] + 2), rng.integers(0, max(cum[-1], 1), 50)])
        got = np.asarray(search(jnp.asarray(w, jnp.int32), jnp.asarray(v, jnp.int32)))
        np.testing.assert_array_equal(got, np.searchsorted(cum, v, side="right"))
    wf = rng.exponential(size=n)
    vf = rng.random(200) * wf.sum()
    got = np.asarray(search(jnp.asarray(wf), jnp.asarray(vf)))
    exact = np.searchsorted(np.cumsum(wf), vf, side="right")
    assert np.mean(got == exact) > 0.99 and np.all(np.abs(got - exact) <= 1)  # rounding at a boundary only


@pytest.mark.parametrize("n", [7, 500])
def test_uniform_choice_is_uniform_over_the_mask(n):
    """Each eligible entry (half of them, scattered) drawn with frequency 1/count within 4.5 SE."""
    mask = jnp.asarray(np.random.default_rng(0).random(n) < 0.5)
    u = jax.random.uniform(jax.random.key(1), (40_000,))
    picks = np.asarray(jax.vmap(choice_from_uniform, in_axes=(0, None))(u, mask))
    m = np.asarray(mask)
    assert np.all(m[picks])
    freq = np.bincount(picks, minlength=n)[m] / u.size
    p = 1 / m.sum()
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / u.size))
