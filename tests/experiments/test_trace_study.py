"""`jaxq reproduce trace` at its smoke size: the shipped Azure trace, every (load, policy, model) in the
CSV with intervals, gaps that are the models' differences, the 80% load as the trace stretched in time,
the LP's rows, the figures and the claims."""

import csv
import math

import numpy as np
import pytest

from jaxq.experiments import trace_study
from jaxq.experiments.reproduce import reproduce
from jaxq.traces import simulate as ts
from jaxq.traces.reader import read_trace


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return reproduce("trace", "smoke", tmp_path_factory.mktemp("trace"))


def test_shipped_trace_and_its_attribution():
    trace = read_trace(trace_study.trace_path({}))
    assert trace.num_requests == 19_366 and trace.schema == "azure"
    data = trace_study.resources.files("jaxq") / "data"
    assert (data / "LICENSE-azure-llm-2023").is_file()
    assert "Splitwise" in (data / "README.md").read_text()


def test_load_stretches_the_trace():
    trace = read_trace(trace_study.trace_path({}))
    slow = trace_study.at_load(trace, 0.8)
    np.testing.assert_allclose(slow.arrival_s, trace.arrival_s / 0.8)
    np.testing.assert_array_equal(slow.prompt_tokens, trace.prompt_tokens)
    assert slow.num_requests / slow.duration_s == pytest.approx(0.8 * trace.num_requests / trace.duration_s)
    for bad in (0.0, -1.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="'loads'"):
            trace_study.at_load(trace, bad)


def test_smoke_tables(smoke):
    settings = trace_study.SIZES["smoke"]
    rows = _rows(smoke.dir / "trace.csv")
    sim = [r for r in rows if r["model"] != "lp"]
    keys = {(float(r["load"]), r["policy"], r["model"]) for r in sim}
    assert keys == {(l, p, m) for l in settings["loads"] for p in settings["policies"] for m in ts.MODELS}
    metrics = {r["metric"] for r in sim}
    assert {"revenue_per_gpu_s", "ttft_s", "ttft_s_p99", "end_to_end_s_p50", "abandon_prefill"} <= metrics
    for r in sim:
        if math.isfinite(float(r["mean"])) and r["se"] not in ("", "nan"):
            assert float(r["lo"]) <= float(r["mean"]) <= float(r["hi"])
            assert int(r["replicas"]) == settings["replicas"]
    lp = {(float(r["load"]), r["metric"]): float(r["mean"]) for r in rows if r["model"] == "lp"}
    assert lp[(0.8, "revenue_per_gpu_s")] < lp[(1.0, "revenue_per_gpu_s")]
    assert 0 < lp[(1.0, "served_fraction")] <= 1 + 1e-9
    # the fluid plan's TTFT is at least the fastest prefill, and below what any replica waits on average
    assert 0 < lp[(1.0, "ttft_s")] <= min(float(r["mean"]) for r in sim if r["metric"] == "ttft_s")
    assert 0 <= lp[(1.0, "abandon_prefill")] <= 1
    # the gap rows are the models' differences
    get = {(float(r["load"]), r["policy"], r["model"], r["metric"]): float(r["mean"]) for r in sim}
    for g in _rows(smoke.dir / "gaps.csv"):
        a, b = (get[(float(g["load"]), g["policy"], g[m], g["metric"])] for m in ("model", "against"))
        if math.isfinite(a - b):
            assert float(g["value"]) == pytest.approx(a - b, rel=1e-9, abs=1e-12)
    # the replay's arrivals: the same in every replica (SE 0), and 80% of the rate at load 0.8
    rate = {l: [r for r in sim if r["model"] == "replay" and r["metric"] == "arrival_rate" and
                float(r["load"]) == l and r["policy"] == "gg-sp"][0] for l in (1.0, 0.8)}
    assert float(rate[1.0]["se"]) == 0.0
    assert float(rate[0.8]["mean"]) == pytest.approx(0.8 * float(rate[1.0]["mean"]), rel=1e-9)


def test_smoke_figures_and_claims(smoke):
    assert {"latency.png", "revenue.png", "gap-decomposition.png", "trace.csv", "gaps.csv", "cost.csv"} <= set(smoke.files)
    names = {c.name for c in smoke.claims}
    assert {"gg-sp-best-on-trace", "markov-ranks-like-trace", "markov-ttft-load1", "lp-bounds-trace-load1"} <= names
    assert all(c.evidence for c in smoke.claims)
