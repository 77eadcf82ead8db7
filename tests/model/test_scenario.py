"""Scenario loading and validation: every bad input raises ValueError naming the field."""

import copy
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

import jaxq
from jaxq.model import IterationTime, scenario_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "jaxq" / "scenarios"


@pytest.fixture
def base():
    with open(CONFIGS / "canonical-v1.toml", "rb") as fh:
        return tomllib.load(fh)


def mutate(d, path, value):
    d = copy.deepcopy(d)
    *head, leaf = path.split(".")
    target = d
    for h in head:
        target = target[h]
    if value is DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    return d


class _Delete:
    """Marks a key to remove (its repr names it, so test ids are the same in every process)."""

    def __repr__(self):
        return "DELETE"


DELETE = _Delete()

BAD = [
    # (dotted path, bad value, field named in the message)
    ("classes.P", [300.0, 0.0], "classes.P[1]"),
    ("classes.P", [-1.0, 3000.0], "classes.P[0]"),
    ("classes.D", [1000.0, -400.0], "classes.D[1]"),
    ("classes.lam", [0.0, 0.5], "classes.lam[0]"),
    ("classes.theta", [0.1, -0.1], "classes.theta[1]"),
    ("classes.P", [math.nan, 3000.0], "classes.P[0]"),
    ("classes.D", [1000.0, math.inf], "classes.D[1]"),
    ("classes.lam", [0.5, 0.5, 0.5], "classes.lam"),
    ("classes.theta", [0.1], "classes.theta"),
    ("classes.names", ["a"], "classes.names"),
    ("classes.P", "300", "classes.P"),
    ("cluster.B", 0, "cluster.B"),
    ("cluster.C", 0, "cluster.C"),
    ("cluster.n", -3, "cluster.n"),
    ("cluster.B", 2.5, "cluster.B"),
    ("timing.alpha", 0.0, "timing.alpha"),
    ("timing.beta", -6.2e-5, "timing.beta"),
    ("timing.gamma", math.nan, "timing.gamma"),
    ("timing.gamma", math.inf, "timing.gamma"),
    ("prices.c_p", -0.1, "prices.c_p"),
    ("prices.c_d", math.nan, "prices.c_d"),
    ("prices.scheme", "auction", "prices.scheme"),
    ("cluster.bogus", 1, "cluster.bogus"),
    ("classes.mu", [1.0, 2.0], "classes.mu"),
    ("extra", 1, "extra"),
    ("cluster.B", DELETE, "cluster.B"),
    ("classes.theta", DELETE, "classes.theta"),
    ("prices", DELETE, "prices"),
    ("version", 0, "version"),
]


@pytest.mark.parametrize("path,value,field", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_input_names_field(base, path, value, field):
    with pytest.raises(ValueError, match=re.escape(f"'{field}'")):
        scenario_from_dict(mutate(base, path, value))


def test_piecewise_timing_and_its_errors(base):
    d = mutate(base, "timing", {"c": 0.022, "a": 6.2e-5, "b0": 73.0})
    s = scenario_from_dict(d)
    assert s.timing.alpha == pytest.approx(0.022 - 6.2e-5 * 73.0)
    assert s.timing.gamma == pytest.approx(1 / 0.022)
    with pytest.raises(ValueError, match="'timing.b0'"):  # alpha = c - a b0 <= 0
        scenario_from_dict(mutate(base, "timing", {"c": 0.022, "a": 6.2e-5, "b0": 1000.0}))
    with pytest.raises(ValueError, match="'cluster.C'"):  # the mixed law needs C >= b0
        scenario_from_dict(mutate(mutate(base, "timing", {"c": 0.022, "a": 6.2e-5, "b0": 73.0}), "cluster.C", 64))
    with pytest.raises(ValueError, match="'timing.c'"):  # mixing the two forms: c is unknown
        scenario_from_dict(mutate(base, "timing", {"alpha": 0.0174, "beta": 6.2e-5, "gamma": 45.45, "c": 1.0}))


def test_canonical_rates_match_model_md():
    s = jaxq.load_scenario("canonical")
    assert s.tau == pytest.approx(0.033272, rel=1e-6)
    np.testing.assert_allclose(s.rates.mu_p, [25.6472, 2.5647], rtol=1e-4)
    np.testing.assert_allclose(s.rates.mu_m, [0.030055, 0.075138], rtol=1e-4)
    np.testing.assert_allclose(s.rates.mu_s, [0.04545, 0.113625], rtol=1e-6)
    assert s.timing.gamma * s.tau == pytest.approx(1.5122, rel=1e-4)
    assert s.prop_3_2_holds()
    # the JAX view computes the same rates from the same primitives
    p = s.params()
    np.testing.assert_allclose(np.asarray(p.mu_p), s.rates.mu_p, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(p.w), [230.0, 380.0])


@pytest.mark.parametrize("name", ["canonical", "qwen-8b", "qwen-4b", "dolly15k"])
def test_bundled_scenarios_load(name):
    s = jaxq.load_scenario(name)
    assert s.name == name and s.version >= 1


def test_replace_revalidates():
    s = jaxq.load_scenario("canonical")
    t = s.replace(**{"cluster.n": 20, "classes.lam": [0.4, 0.6]})
    assert t.cluster.n == 20 and t.classes.lam[1] == 0.6 and s.cluster.n == 500
    with pytest.raises(ValueError, match="'cluster.B'"):
        s.replace(**{"cluster.B": 0})
    with pytest.raises(ValueError, match="'cluster.X'"):
        s.replace(**{"cluster.X": 3})


def test_unknown_scenario_name():
    with pytest.raises(ValueError, match="unknown scenario"):
        jaxq.load_scenario("no-such-scenario")


def test_iteration_time_direct_validation():
    with pytest.raises(ValueError, match="'timing.gamma'"):
        IterationTime(alpha=0.01, beta=1e-5, gamma=0.0)
