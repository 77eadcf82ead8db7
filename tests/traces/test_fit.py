"""Fitting classes to a trace: recovery of known classes (within 3 standard errors computed from the
data), the choice of K, determinism, and the scenario file (loads, the LP solves it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from trace_helpers import THREE, draw, write_generic

from jaxq.lp import solve_bundled
from jaxq.model.config import load_scenario
from jaxq.traces import Trace, choose_num_classes, fit_trace, kmeans_log_lengths, read_trace
from jaxq.traces.fit import ScenarioChoices, bic, scenario_toml, serves_all, smallest_n, write_scenario

N_GPUS = 40


def _trace(t, p, d, labels=None) -> Trace:
    return Trace(arrival_s=t - t[0], prompt_tokens=p, output_tokens=d, labels=labels, source="synthetic.csv")


@pytest.fixture(scope="module")
def three():
    t, p, d, k = draw(THREE, 1500.0, seed=11)
    return _trace(t, p, d), k


def test_recovers_rates_and_mean_lengths_within_3_se(three):
    trace, truth = three
    fit = fit_trace(trace, 3)
    assert fit.num_classes == 3 and fit.method == "kmeans"
    # classes are sorted by mean prompt, as THREE is
    for c, true, j in zip(fit.classes, THREE, range(3)):
        assert np.array_equal(fit.labels == j, truth == j)  # well separated: the partition is exact
        assert abs(c.lam(N_GPUS) - true.rate / N_GPUS) <= 3 * c.lam_se(N_GPUS), (c, true)
        assert abs(c.P - true.mean_p) <= 3 * c.P_se, (c, true)
        assert abs(c.D - true.mean_d) <= 3 * c.D_se, (c, true)
        cv = np.sqrt(np.exp(true.sigma**2) - 1)  # lognormal CV
        assert c.cv_P == pytest.approx(cv, rel=0.1) and c.cv_D == pytest.approx(cv, rel=0.1)
    assert sum(c.count for c in fit.classes) == trace.num_requests
    assert sum(c.share for c in fit.classes) == pytest.approx(1.0)
    assert fit.explained > 0.9


def test_standard_errors_are_the_stated_formulas(three):
    trace, _ = three
    fit = fit_trace(trace, 3)
    T = trace.duration_s
    for j, c in enumerate(fit.classes):
        p = trace.prompt_tokens[fit.labels == j]
        d = trace.output_tokens[fit.labels == j]
        assert c.rate == pytest.approx(len(p) / T) and c.rate_se == pytest.approx(np.sqrt(len(p)) / T)
        assert c.lam(N_GPUS) == pytest.approx(len(p) / T / N_GPUS)
        assert c.P_se == pytest.approx(p.std(ddof=1) / np.sqrt(len(p)))
        assert c.D_se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))


@pytest.mark.parametrize("classes", [THREE[:1], THREE[:2], THREE])
def test_auto_picks_the_true_number_of_classes(classes):
    t, p, d, _ = draw(classes, 1000.0, seed=5)
    k, labels, sel = choose_num_classes(p, d)
    assert k == len(classes), sel.format()
    assert sel.ks == (1, 2, 3, 4, 5, 6) and sel.chosen == k and int(labels.max()) + 1 == k
    assert fit_trace(_trace(t, p, d), "auto").num_classes == k


def test_bic_is_finite_for_a_class_of_one_repeated_length():
    p = np.array([5] * 50 + [1000] * 50 + list(range(900, 950)))
    d = np.array([1] * 50 + [300] * 50 + list(range(200, 250)))
    labels = kmeans_log_lengths(p, d, 3)
    assert np.isfinite(bic(p, d, labels))


def test_deterministic_and_sorted(three):
    trace, _ = three
    a = kmeans_log_lengths(trace.prompt_tokens, trace.output_tokens, 4)
    b = kmeans_log_lengths(trace.prompt_tokens, trace.output_tokens, 4)
    assert np.array_equal(a, b)
    fit = fit_trace(trace, 4)
    means = [c.P for c in fit.classes]
    assert means == sorted(means)
    assert [c.name for c in fit.classes] == ["c1", "c2", "c3", "c4"]


def test_kmeans_refines_on_all_rows_beyond_the_sample(monkeypatch, three):
    """Above SUBSAMPLE distinct pairs, seeding runs on a sample: on well-separated data the partition is
    the same."""
    import jaxq.traces.fit as fit_mod

    trace, truth = three
    monkeypatch.setattr(fit_mod, "SUBSAMPLE", 500)
    labels = kmeans_log_lengths(trace.prompt_tokens, trace.output_tokens, 3)
    assert np.array_equal(labels, truth)


def test_bad_numbers_of_classes(three):
    trace, _ = three
    for k in (0, -1, True, 2.5, "three"):
        with pytest.raises(ValueError, match="classes"):
            fit_trace(trace, k)
    with pytest.raises(ValueError, match="distinct"):
        kmeans_log_lengths([1, 1, 2], [3, 3, 4], 3)
    with pytest.raises(ValueError, match="class column"):
        fit_trace(trace, "labels")


def test_labels_from_the_class_column(tmp_path):
    t, p, d, k = draw(THREE, 300.0, seed=2)
    names = np.array(["long-prompt", "chat", "long-output"])[[1, 2, 0]]  # THREE's classes by mean prompt
    trace = read_trace(write_generic(tmp_path / "g.csv", t, p, d, labels=names[k]))
    fit = fit_trace(trace, "labels")
    assert fit.method == "labels"
    assert [c.name for c in fit.classes] == ["chat", "long-output", "long-prompt"]
    assert [c.count for c in fit.classes] == [int((k == j).sum()) for j in range(3)]


def test_scenario_file_loads_and_solves(tmp_path, three):
    trace, _ = three
    fit = fit_trace(trace, 3)
    choices = ScenarioChoices(n=N_GPUS, patience=0.25, c_p=0.3, c_d=0.5)
    sc = write_scenario(tmp_path / "fit.toml", fit, choices, name="synthetic-fit")
    again = load_scenario(tmp_path / "fit.toml")
    assert again.name == sc.name == "synthetic-fit" and again.version == 1
    assert again.cluster.n == N_GPUS and again.cluster.B == 16 and again.cluster.C == 256
    assert again.classes.names == ("c1", "c2", "c3")
    assert again.classes.P == pytest.approx([c.P for c in fit.classes], rel=1e-5)
    assert again.classes.lam == pytest.approx([c.lam(N_GPUS) for c in fit.classes], rel=1e-5)
    assert np.all(again.classes.theta == 0.25)
    assert (again.pricing.c_p, again.pricing.c_d, again.timing.alpha) == (0.3, 0.5, 0.0174)
    sol = solve_bundled(again)
    assert sol.ok
    text = (tmp_path / "fit.toml").read_text()
    assert "synthetic.csv" in text and "records no abandonment" in text and "k-means" in text
    with pytest.raises(ValueError, match=".toml"):
        write_scenario(tmp_path / "fit.txt", fit, choices)


def test_quotes_in_paths_are_escaped(three):
    trace, _ = three
    fit = dataclasses.replace(fit_trace(trace, 2), source='we"ird\\dir/tr.csv')
    import tomllib

    data = tomllib.loads(scenario_toml(fit, ScenarioChoices(n=3)))
    assert 'we"ird' in data["source"]


def test_smallest_n_is_the_fluid_capacity(three):
    trace, _ = three
    fit = fit_trace(trace, 3)
    base = ScenarioChoices(n=1)
    n = smallest_n(fit, base)
    from jaxq.traces.fit import fitted_scenario

    assert serves_all(fitted_scenario(fit, dataclasses.replace(base, n=n)))
    assert n == 1 or not serves_all(fitted_scenario(fit, dataclasses.replace(base, n=n - 1)))


def test_single_request_or_zero_duration_is_refused():
    one = Trace(arrival_s=np.zeros(2), prompt_tokens=np.array([3, 4]), output_tokens=np.array([5, 6]), source="x")
    with pytest.raises(ValueError, match="different times"):
        fit_trace(one, 1)


def test_exponential_lengths_within_a_class_show_cv_one():
    """The model's own assumption: one class with exponential lengths fits with CVs near 1."""
    rng = np.random.default_rng(4)
    m = 4000
    t = np.sort(rng.uniform(0, 1000, m))
    p = np.maximum(1, np.rint(rng.exponential(800, m))).astype(np.int64)
    d = np.maximum(1, np.rint(rng.exponential(200, m))).astype(np.int64)
    (c,) = fit_trace(_trace(t, p, d), 1).classes
    assert c.cv_P == pytest.approx(1.0, abs=0.05) and c.cv_D == pytest.approx(1.0, abs=0.05)
    assert abs(c.P - 800) <= 3 * c.P_se and abs(c.D - 200) <= 3 * c.D_se
