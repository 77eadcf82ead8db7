"""`jaxq trace simulate`: the trace-driven scenario's rate schedule reproduces the trace's counts per
class and bin exactly, its empirical law's means are the classes' P_i, D_i, and on a trace drawn from
the Markov model itself (stationary Poisson arrivals, exponential lengths) the resampled and the
Markov results agree within 4 combined SE; each model's generated traffic keeps what it should; the
command writes its CSV, with per-job latency percentiles for every model."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from trace_helpers import write_generic

from jaxq.cli import main
from jaxq.traces import simulate as ts
from jaxq.traces.fit import ScenarioChoices, fit_trace, fitted_scenario
from jaxq.traces.reader import read_trace

# two classes, exponential lengths, Poisson arrivals: the fitted Markov model is the truth
RATES, MEAN_P, MEAN_D = (1.2, 0.5), (300.0, 1500.0), (150.0, 60.0)
HORIZON, N, REPLICAS, BIN = 240.0, 2, 16, 60.0


def _markov_trace(path, seed=3):
    rng = np.random.default_rng(seed)
    parts = []
    for i, (r, p, d) in enumerate(zip(RATES, MEAN_P, MEAN_D)):
        m = rng.poisson(r * HORIZON)
        t = np.sort(rng.uniform(0, HORIZON, m))
        # exponential lengths rounded up to whole tokens (>= 1)
        parts.append((t, np.ceil(rng.exponential(p, m)).astype(int), np.ceil(rng.exponential(d, m)).astype(int),
                      np.full(m, f"k{i}")))
    t, p, d, lab = (np.concatenate(x) for x in zip(*parts))
    o = np.argsort(t, kind="stable")
    return write_generic(path, t[o], p[o], d[o], lab[o])


def test_schedule_reproduces_the_counts_per_class_and_bin(three_class_file):
    path, _ = three_class_file
    trace = read_trace(path)
    fit = fit_trace(trace, 3)
    sc = fitted_scenario(fit, ScenarioChoices(n=7))
    bin_s = 110.0  # the 1,500 s trace's last bin is shorter
    sched = ts.rate_schedule(trace, fit, sc, bin_s)
    edges = np.append(sched.breakpoints, trace.duration_s)
    assert np.allclose(np.diff(edges)[:-1], bin_s) and 0 < edges[-1] - edges[-2] <= bin_s
    # counted independently: a histogram per class (NumPy's last bin is closed, as ours)
    counts = np.array([np.histogram(trace.arrival_s[fit.labels == j], bins=edges)[0] for j in range(3)])
    assert counts.sum() == trace.num_requests
    expected = sched.factors * (sc.cluster.n * np.asarray(sc.classes.lam))[:, None] * np.diff(edges)[None, :]
    np.testing.assert_allclose(expected, counts, rtol=1e-12, atol=0)
    # the factors are relative to the class's mean rate: their time average is 1 (up to lam's rounding)
    np.testing.assert_allclose((sched.factors * np.diff(edges)).sum(1) / trace.duration_s, 1.0, rtol=1e-5)


def test_empirical_law_means_are_the_classes_P_and_D(three_class_file):
    path, _ = three_class_file
    trace = read_trace(path)
    fit = fit_trace(trace, 3)
    sc = fitted_scenario(fit, ScenarioChoices(n=7))
    driven, law = ts.trace_scenario(trace, fit, sc, 300.0)
    for j, c in enumerate(fit.classes):
        mine = fit.labels == j
        assert driven.classes.P[j] == pytest.approx(trace.prompt_tokens[mine].mean(), rel=1e-12)
        assert driven.classes.D[j] == pytest.approx(trace.output_tokens[mine].mean(), rel=1e-12)
        assert driven.classes.P[j] == pytest.approx(c.P, rel=1e-12) and driven.classes.D[j] == pytest.approx(c.D, rel=1e-12)
        for phase, lengths in ((0, trace.prompt_tokens), (1, trace.output_tokens)):  # the samples, sorted
            k = int(law.samples.count[phase, j])
            np.testing.assert_array_equal(law.samples.values[phase, j, :k], np.sort(lengths[mine]))
    law.check_means(driven.classes.P, driven.classes.D)
    np.testing.assert_allclose(driven.classes.P, sc.classes.P, rtol=1e-5)  # the file's 6 digits
    assert driven.arrivals is not None and sc.arrivals is None


@pytest.fixture(scope="module")
def markov_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("markov")
    path = _markov_trace(tmp / "markov.csv")
    out = tmp / "out"
    code = main(["trace", "simulate", str(path), "--classes", "labels", "--n", str(N), "--replicas", str(REPLICAS),
                 "--bin", str(BIN), "--out", str(out), "--patience", "0.2"])
    with open(out / "simulate.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return code, out, rows


def test_command_writes_the_csv(markov_run, capsys):
    code, out, rows = markov_run
    assert code == 0
    assert (out / "scenario-k2.toml").is_file()
    models = {r["model"] for r in rows}
    assert models == {*ts.MODELS, *(g for g, _, _ in ts.GAPS), "lp"}
    assert {r["policy"] for r in rows} == {"gg-sp"}
    metrics = [r["metric"] for r in rows if r["model"] == "trace"]
    assert metrics[:3] == ["revenue_per_gpu_s", "arrival_rate", "throughput"]
    assert "ttft_s[k0]" in metrics and "abandon_decode[k1]" in metrics
    for model in ts.MODELS:
        assert metrics == [r["metric"] for r in rows if r["model"] == model]
    # every model ends with its per-job latency percentiles, finite
    assert metrics[-9:] == [f"{m}_p{q}" for m in ts.LATENCIES for q in ts.PERCENTILES]
    assert all(math.isfinite(float(r["mean"])) for r in rows if r["metric"].endswith("_p99"))
    for r in rows:
        if r["model"] in ts.MODELS:
            assert int(r["replicas"]) == REPLICAS and float(r["se"]) >= 0
    lp = [r for r in rows if r["model"] == "lp"]
    assert len(lp) == 1 and float(lp[0]["mean"]) > 0


def test_trace_driven_agrees_with_markov_on_a_markov_trace(markov_run):
    _, _, rows = markov_run
    get = {(r["model"], r["metric"]): r for r in rows}
    for metric in ("revenue_per_gpu_s", "throughput"):
        t, m, g = (get[(model, metric)] for model in ("trace", "markov", "gap"))
        se = math.hypot(float(t["se"]), float(m["se"]))
        assert float(g["mean"]) == pytest.approx(float(m["mean"]) - float(t["mean"]), rel=1e-12)
        assert float(g["se"]) == pytest.approx(se, rel=1e-12)
        assert se > 0 and abs(float(g["mean"])) <= 4 * se, (metric, t["mean"], m["mean"], se)
    # the revenue is well below the LP's bound at this load, but not far off (a sanity bound, not a test)
    assert float(get[("trace", "revenue_per_gpu_s")]["mean"]) <= 1.05 * float(get[("lp", "revenue_per_gpu_s")]["mean"])


def test_generated_traffic_keeps_what_each_model_keeps(three_class_file):
    """Shuffled: each replica has the trace's arrival times and length pairs per class, in another
    order. Resampled: the count per class and bin is Poisson with the trace's count as its mean (the
    mean over 200 replicas within 4 SE), and every job is one of the class's own pairs. Markov: Poisson
    counts at n lam_i x horizon (within 4 SE over the replicas), exponential means P_i, D_i."""
    path, _ = three_class_file
    trace = read_trace(path)
    fit = fit_trace(trace, 3)
    sc = fitted_scenario(fit, ScenarioChoices(n=7))
    R = 200
    for jobs in ts.shuffled_jobs(trace, fit, 3, seed=1):
        for j in range(3):
            t, p, d = ts._class_jobs(trace, fit, j)
            np.testing.assert_array_equal(jobs.arrival[j], t)
            assert sorted(zip(jobs.prompt[j], jobs.output[j])) == sorted(zip(p, d))
            assert not np.array_equal(jobs.prompt[j], p)  # in another order
    edges = ts.bin_edges(trace.duration_s, 300.0)
    want = ts.class_bin_counts(trace, fit, edges)
    got = np.array([[np.histogram(jobs.arrival[j], bins=edges)[0] for j in range(3)]
                    for jobs in ts.resampled_jobs(trace, fit, R, seed=2, bin_s=300.0)])
    assert np.all(np.abs(got.mean(0) - want) <= 4 * np.sqrt(np.maximum(want, 1) / R))
    jobs = ts.resampled_jobs(trace, fit, 1, seed=2, bin_s=300.0)[0]
    for j in range(3):
        _, p, d = ts._class_jobs(trace, fit, j)
        assert set(zip(jobs.prompt[j], jobs.output[j])) <= set(zip(p, d))
    horizon = 500.0
    markov = ts.markov_jobs(sc, R, horizon, seed=3)
    counts = np.array([m.counts() for m in markov])
    mean = sc.cluster.n * np.asarray(sc.classes.lam) * horizon
    assert np.all(np.abs(counts.mean(0) - mean) <= 4 * np.sqrt(mean / R))
    for j in range(3):
        p = np.concatenate([m.prompt[j] for m in markov])
        d = np.concatenate([m.output[j] for m in markov])
        assert abs(p.mean() - sc.classes.P[j]) <= 4 * sc.classes.P[j] / np.sqrt(p.size)
        assert abs(d.mean() - sc.classes.D[j]) <= 4 * sc.classes.D[j] / np.sqrt(d.size)
        assert np.all(np.diff(markov[0].arrival[j]) >= 0) and markov[0].arrival[j].max() <= horizon


def test_replay_arrivals_are_the_traces_in_every_replica(markov_run):
    """The replay's arrival rate is the trace's own count after the warm-up, the same in every replica."""
    _, out, rows = markov_run
    trace = read_trace(out.parent / "markov.csv")
    warmup = ts.WARMUP_FRACTION * trace.duration_s
    want = np.sum(trace.arrival_s >= warmup) / (N * (trace.duration_s - warmup))
    r = {x["metric"]: x for x in rows if x["model"] == "replay"}["arrival_rate"]
    assert float(r["mean"]) == pytest.approx(want, rel=1e-12) and float(r["se"]) == 0.0


def test_invalid_options_are_one_line_errors(three_class_file, capsys):
    path, _ = three_class_file
    for extra, field in ((["--policy", "nope"], "--policy"), (["--replicas", "1"], "--replicas"),
                         (["--bin", "0"], "--bin"), (["--horizon", "-5"], "--horizon")):
        assert main(["trace", "simulate", str(path), "--classes", "3", "--n", "4", *extra]) == 2
        assert field in capsys.readouterr().err
