"""The bulk choices of a time step (jaxq.policies.bulk): placement within free slots, proportional
splits, the step's Poisson and binomial counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.policies.bulk import allocate, count_draw, place


def test_place_and_allocate_respect_free_slots():
    free = jnp.array([0, 3, 1, 0, 2, 5])
    solo, mixed = jnp.arange(6) >= 2, jnp.arange(6) < 2  # contiguous groups, as static planning lays them
    for u in (0.0, 0.4, 0.99):
        got = np.asarray(place(jnp.array([u]), jnp.array([[4, 3]]), free, [jnp.ones(6, bool)])).T
        assert got.sum(0).tolist() == [4, 3] and np.all(got.sum(1) <= np.asarray(free))
        two = np.asarray(place(jnp.array([u, 1 - u]), jnp.array([[5, 2], [1, 2]]), free, [solo, mixed])).T
        assert two[2:].sum(0).tolist() == [5, 2] and two[:2].sum(0).tolist() == [1, 2]
        assert np.all(two.sum(1) <= np.asarray(free))
        alloc = np.asarray(allocate(u, jnp.array([5, 0, 2]), 4))
        assert alloc.sum() == 4 and np.all(alloc <= [5, 0, 2])


def test_a_single_job_lands_in_proportion_to_free_slots():
    """One job placed from a uniform start: GPU g with probability free_g / sum(free), within 4.5 SE."""
    free = jnp.array([0, 3, 1, 0, 2, 5])
    u = jax.random.uniform(jax.random.key(0), (20_000,))
    got = np.asarray(jax.vmap(lambda x: place(x[None], jnp.array([[1]]), free, [jnp.ones(6, bool)])[0])(u))
    freq = got.mean(0)
    p = np.asarray(free) / 11
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / u.size) + 1e-12), (freq, p)


@pytest.mark.parametrize("mean,count", [(0.3, None), (4.0, None), (60.0, None), (0.3, 150), (12.0, 40), (80.0, 400)])
def test_count_draw_moments(mean, count):
    """The step's Poisson and binomial counts (inverse CDF up to mean 25, rounded normal above): mean
    and variance within 5 SE of the exact ones over 2e5 draws, never above the count."""
    u = jax.random.uniform(jax.random.key(0), (200_000,))
    m = jnp.full(u.shape, mean)
    k = np.asarray(count_draw(u, m, None if count is None else jnp.full(u.shape, count, jnp.int32)))
    var = mean if count is None else mean * (1 - mean / count)
    se_mean = np.sqrt(var / k.size)
    assert abs(k.mean() - mean) <= 5 * se_mean, (k.mean(), mean)
    assert abs(k.var() - var) <= 5 * var * np.sqrt(2 / k.size) + 0.1, (k.var(), var)  # +0.1: rounding of the normal
    if count is not None:
        assert k.max() <= count
