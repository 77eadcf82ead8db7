"""The empirical length law (``ServiceLaw.empirical``): the quantile inversion gives each sample its
frequency; samples from an exponential law reproduce the exponential law's revenue and throughput
within 4 combined SE on the general engine; the scenario's means must be the samples' means; the law is
data (new samples of the same padded size do not recompile); invalid samples raise naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.api import run
from jaxq.metrics import estimate
from jaxq.sim import batch
from jaxq.sim.general import LAWS, EmpiricalSamples, ServiceLaw, draw_length, empirical_quantile
from jaxq.testing.scenarios import canonical

CANONICAL = canonical()


def test_two_point_inversion_has_the_right_frequencies():
    """Samples {10, 50, 50, 50} (padded): the quantile at a uniform gives 10 with probability 1/4."""
    samples = jnp.asarray([10.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0])  # the last 4 are padding
    count = jnp.int32(4)
    u = jax.random.uniform(jax.random.key(0), (400_000,), dtype=jnp.float64)
    x = np.asarray(jax.vmap(lambda v: empirical_quantile(v, samples, count))(u))
    p = np.mean(x == 10.0)
    se = np.sqrt(0.25 * 0.75 / x.size)
    assert set(np.unique(x)) == {10.0, 50.0}
    assert abs(p - 0.25) <= 4 * se, (p, se)
    # exact on a grid: u in [k/4, (k+1)/4) picks the k-th sample; u just below 1 picks the last real one
    grid = jnp.asarray([0.0, 0.2499999, 0.25, 0.74, 0.75, 1.0 - 2.0**-53])
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda v: empirical_quantile(v, samples, count))(grid)),
                                  [10.0, 10.0, 50.0, 50.0, 50.0, 50.0])
    # through draw_length with the law's index: the same uniforms as every other law
    keys = jax.random.split(jax.random.key(1), 100_000)
    y = np.asarray(jax.vmap(lambda k: draw_length(k, LAWS.index("empirical"), 0.0, 1.0, samples, count))(keys))
    assert abs(np.mean(y == 10.0) - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / y.size)


def test_samples_are_sorted_padded_and_compared_by_content():
    law = ServiceLaw.empirical([np.array([3.0, 1.0, 2.0]), np.array([5.0])], [np.array([7.0, 9.0]), np.array([4.0])])
    s = law.samples
    assert s.values.shape == (2, 2, 8)
    np.testing.assert_array_equal(s.values[0, 0, :3], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(s.count, [[3, 1], [2, 1]])
    np.testing.assert_allclose(law.means()[0], [2.0, 5.0])
    np.testing.assert_allclose(law.means()[1], [8.0, 4.0])
    again = ServiceLaw.empirical([np.array([1.0, 2.0, 3.0]), np.array([5.0])], [np.array([9.0, 7.0]), np.array([4.0])])
    assert law == again and hash(law) == hash(again)
    assert law.arrays().samples.shape == (2, 2, 8)
    half = ServiceLaw.empirical(None, [np.array([7.0, 9.0]), np.array([4.0])])
    assert half.prompt == "exponential" and half.output == "empirical" and half.means()[0] is None


def _exponential_samples(scenario, size, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.exponential(p, size) for p in scenario.classes.P]
    outputs = [rng.exponential(d, size) for d in scenario.classes.D]
    return ServiceLaw.empirical(prompts, outputs)


def test_exponential_samples_match_the_exponential_law():
    """4096 exponential samples per class and phase: the empirical law's revenue and throughput agree
    with the exponential law's (on the scenario with the samples' means) within 4 combined SE."""
    law = _exponential_samples(CANONICAL, 4096, seed=0)
    scenario = law.with_means(CANONICAL)
    kw = {"n": 20, "replicas": 16, "horizon": 300.0, "warmup": 60.0, "engine": "general"}
    a = run(scenario, "gg-sp", seed=0, **kw)
    b = run(scenario, "gg-sp", seed=1, service=law, **kw)
    assert a.engine == b.engine == "general" and b.service is law
    assert not a.status and not b.status
    for key in ("revenue_bundled", "throughput", "x", "y_s"):
        ea, eb = estimate(a.metrics[key]), estimate(b.metrics[key])
        z = np.abs(ea.mean - eb.mean) / np.hypot(ea.se, eb.se)
        print(key, np.round(z, 2))
        assert np.all(z <= 4), (key, ea, eb, z)


def test_new_samples_of_the_same_size_reuse_the_program():
    kw = {"n": 4, "replicas": 2, "horizon": 20.0, "warmup": 0.0, "room": 64}
    first = _exponential_samples(CANONICAL, 100, seed=1)
    run(first.with_means(CANONICAL), "gg-sp", service=first, **kw)
    misses = batch._program.cache_info().misses
    second = _exponential_samples(CANONICAL, 120, seed=2)  # pads to the same 128 samples per row
    res = run(second.with_means(CANONICAL), "gg-sp", service=second, **kw)
    assert batch._program.cache_info().misses == misses  # one program for both laws (the samples are data)
    assert not res.status


def test_scenario_means_must_be_the_sample_means():
    law = _exponential_samples(CANONICAL, 256, seed=3)
    with pytest.raises(ValueError, match="classes.P"):
        run(CANONICAL, "gg-sp", n=4, replicas=1, horizon=10.0, service=law)
    three = ServiceLaw.empirical([np.ones(4)] * 3, [np.ones(4)] * 3)
    with pytest.raises(ValueError, match="service"):
        run(CANONICAL, "gg-sp", n=4, replicas=1, horizon=10.0, service=three)
    # within the rounding tolerance (0.1%) passes
    p, d = law.means()
    ok = CANONICAL.replace(**{"classes.P": p * (1 + 5e-4), "classes.D": d})
    law.check_means(ok.classes.P, ok.classes.D)


@pytest.mark.parametrize("args, field", [
    (([],), "prompt_samples"),
    (("abc",), "prompt_samples"),
    (([np.array([1.0, np.nan])],), r"prompt_samples\[0\]"),
    (([np.array([1.0]), np.array([-1.0, 2.0])],), r"prompt_samples\[1\]"),
    (([np.zeros(3)],), r"prompt_samples\[0\]"),
    (([np.ones((2, 2))],), r"prompt_samples\[0\]"),
    (([np.array([])],), r"prompt_samples\[0\]"),
    (([np.ones(3)], [np.ones(3), np.ones(3)]), "output_samples"),
    ((None, None), "prompt_samples"),
])
def test_invalid_samples_raise_naming_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        ServiceLaw.empirical(*args)


def test_empirical_without_samples_is_refused():
    with pytest.raises(ValueError, match="service"):
        ServiceLaw.of("empirical")
    with pytest.raises(ValueError, match="prompt"):
        ServiceLaw("empirical", "exponential")
    s = EmpiricalSamples.of([np.ones(3)], None)
    with pytest.raises(ValueError, match="samples"):
        ServiceLaw("exponential", "exponential", samples=s)
    with pytest.raises(ValueError, match="stepped"):
        run(CANONICAL, "gg-sp", n=4, replicas=1, horizon=10.0, engine="stepped",
            service=ServiceLaw.empirical([np.full(3, p) for p in CANONICAL.classes.P], None))
