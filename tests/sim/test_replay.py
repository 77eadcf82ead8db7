"""Trace replay on the general engine (jaxq.sim.general.TraceJobs): every replica is the trace itself.
Its arrivals are the trace's, to the job and to the second; each job is served with its own prompt and
output tokens (checked on the engine's own finish times); conservation and the job indices in waiting
rooms and slots hold under queueing and abandonment; a replay of one class keeps its rooms' cells."""

import jax
import numpy as np
import pytest

import jaxq
from jaxq.api import make_params
from jaxq.sim import engine_spec, run_replicas
from jaxq.sim.general import (END_TO_END, LATENCY_BINS, TPOT, TTFT, ServiceLaw, TraceJobs, latency_bin,
                              latency_percentiles, phase_speeds)
from jaxq.sim.state import ABANDON_DECODE, ABANDON_PREFILL, ARRIVED, DECODE_DONE, LOST, WAITED
from jaxq.testing.checks import check_final_states
from jaxq.testing.scenarios import canonical, mmc_scenario
from jaxq.policies import get_policy

CANONICAL = canonical()


def synthetic(num, duration, classes=2, seed=0, prompt=(6.0, 0.7), output=(5.0, 0.7), ties=True):
    """A trace of ``num`` jobs over ``duration`` s with lognormal token counts; a few tied times."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, duration, num))
    if ties:
        t[5:8] = t[5]  # three jobs at one instant
    lab = rng.integers(0, classes, num)
    P = np.round(rng.lognormal(*prompt, num)) + 1
    D = np.round(rng.lognormal(*output, num)) + 1
    return t, P, D, lab


def replay_setup(scenario, trace, n, policy="gg-sp"):
    t, P, D, lab = trace
    I = scenario.num_classes
    jobs = TraceJobs.of(t, P, D, lab, I)
    law = ServiceLaw.empirical([P[lab == i] for i in range(I)], [D[lab == i] for i in range(I)])
    return law.with_means(scenario), law, jobs


def run_windows(scenario, law, jobs, n, windows, policy="gg-sp", replicas=2, seed=0):
    """Final states of one compiled replay program, once per (warm-up, horizon) window."""
    pol = get_policy(policy)
    spec = engine_spec("general", scenario, n, room=256)
    keys = jax.random.split(jax.random.key(seed), replicas)
    out = []
    for warmup, horizon in windows:
        params, _, _ = make_params(scenario, pol, n, horizon=horizon, warmup=warmup)
        state, _ = run_replicas(keys, params, spec, pol, engine="general", service=law, replay=jobs)
        out.append((state, params, spec, pol))
    return out


def test_arrivals_per_minute_are_the_traces_in_every_replica():
    trace = synthetic(600, 180.0)
    scenario, law, jobs = replay_setup(CANONICAL, trace, 20)
    t, _, _, lab = trace
    windows = [(60.0 * m, 60.0 * (m + 1)) for m in range(3)]
    for (state, *_), (lo, hi) in zip(run_windows(scenario, law, jobs, 20, windows, replicas=3), windows):
        counts = np.asarray(state.counts)[:, ARRIVED]  # arrivals in [warm-up, horizon]
        want = [np.sum((lab == i) & (t >= lo) & (t <= hi)) for i in range(2)]
        np.testing.assert_array_equal(counts, np.tile(want, (3, 1)), err_msg=f"minute {lo:g}-{hi:g}")


def test_each_prefill_runs_its_own_prompt():
    """Many GPUs, so no job waits: a running prefill began at its job's arrival, and its finish time
    at the prefill speed gives back exactly that job's prompt tokens."""
    trace = synthetic(400, 30.0, prompt=(8.0, 0.5))
    scenario, law, jobs = replay_setup(CANONICAL, trace, 400)
    pre, _, _ = (float(v) for v in phase_speeds(scenario.params()))
    checked = 0
    for state, *_ in run_windows(scenario, law, jobs, 400, [(0.0, h) for h in (10.0, 20.0, 29.0)]):
        assert np.all(np.asarray(state.totals)[:, WAITED] == 0)
        g = state.gpus
        for r in range(2):
            pj, pc, pf = (np.asarray(a[r]) for a in (g.prefill_job, g.prefill_class, g.prefill_finish))
            for gpu in np.flatnonzero(pj >= 0):
                c, j = pc[gpu], pj[gpu]
                np.testing.assert_allclose((pf[gpu] - jobs.arrival[c][j]) * pre, jobs.prompt[c][j], rtol=1e-9)
                checked += 1
    assert checked >= 20


def test_each_decode_runs_its_own_output():
    """Jobs 30 s apart, each done before the next arrives: stopped halfway through job k's decode, the
    one live decode slot is job k's and finishes at arrival + P_k / prefill speed + D_k / gamma."""
    t = np.arange(6) * 30.0
    P = np.array([500.0, 3000.0, 800.0, 1500.0, 200.0, 2500.0])
    D = np.array([40.0, 300.0, 120.0, 60.0, 250.0, 90.0])
    lab = np.array([0, 1, 1, 0, 0, 1])
    scenario, law, jobs = replay_setup(CANONICAL, (t, P, D, lab), 4)
    pre, _, fast = (float(v) for v in phase_speeds(scenario.params()))
    assert np.all(P / pre + D / fast < 30.0)
    ends = t + P / pre + D / fast
    windows = [(0.0, t[k] + P[k] / pre + 0.5 * D[k] / fast) for k in range(6)]
    for k, (state, *_) in enumerate(run_windows(scenario, law, jobs, 4, windows)):
        g = state.gpus
        live = np.asarray(g.decode_job) >= 0
        assert np.all(live.sum((1, 2)) == 1), f"job {k}: {live.sum((1, 2))} live decodes"
        c = lab[k]
        j = int(np.sum(lab[:k] == c))  # its index within its class
        np.testing.assert_array_equal(np.asarray(g.decode_job)[live], j)
        np.testing.assert_array_equal(np.asarray(g.decode_class)[live], c)
        np.testing.assert_allclose(np.asarray(g.decode_finish)[live], ends[k], rtol=1e-12)
        # the first token's time rides with the decode slot; each latency is counted in its own bin
        np.testing.assert_allclose(np.asarray(g.decode_first)[live], t[k] + P[k] / pre, rtol=1e-12)
        counts = np.asarray(g.latency_counts)  # (R, latency, class, bin)
        want = np.zeros(counts.shape[1:], int)
        for i in range(k + 1):
            want[TTFT, lab[i], int(latency_bin(P[i] / pre))] += 1
            if i < k:
                want[TPOT, lab[i], int(latency_bin(1.0 / fast))] += 1
                want[END_TO_END, lab[i], int(latency_bin(ends[i] - t[i]))] += 1
        np.testing.assert_array_equal(counts, np.broadcast_to(want, counts.shape), err_msg=f"job {k}")
    # the percentiles read from the counts: within a bin (4.1%) of the sample's
    from jaxq.traces.simulate import job_latencies

    lat = job_latencies(state)
    e2e = (ends - t)[:5]
    np.testing.assert_allclose(lat["end_to_end_s_p50"], np.percentile(e2e, 50), rtol=0.042)
    np.testing.assert_allclose(lat["tpot_s_p90"], 1.0 / fast, rtol=0.042)
    # a warm-up leaves out the jobs that arrived before it
    (state, *_), = run_windows(scenario, law, jobs, 4, [(t[2], windows[-1][1])])
    counts = np.asarray(state.gpus.latency_counts)
    assert counts[:, TTFT].sum((1, 2)).tolist() == [4, 4] and counts[:, END_TO_END].sum((1, 2)).tolist() == [3, 3]


def test_latency_percentiles_from_bins_match_the_samples():
    """Binned and interpolated, the percentiles of 200,000 lognormal latencies are those of the samples
    to well within a bin; nothing counted gives NaN, and so does a percentile off the grid."""
    rng = np.random.default_rng(3)
    x = rng.lognormal(0.0, 1.5, 200_000)
    counts = np.bincount(np.asarray(latency_bin(x)), minlength=LATENCY_BINS + 2)
    got = latency_percentiles(counts, (1, 50, 90, 99))
    np.testing.assert_allclose(got, np.percentile(x, (1, 50, 90, 99)), rtol=0.01)
    assert np.isnan(latency_percentiles(np.zeros(LATENCY_BINS + 2), (50,))).all()
    off = np.zeros(LATENCY_BINS + 2)
    off[-1] = 10
    assert np.isnan(latency_percentiles(off, (50,))).all()


def _in_system_jobs(state, r, num_classes):
    """(class, job) of every job in replica r's rooms and slots."""
    out = []
    q, qc = np.asarray(state.queue_job[r]), np.arange(num_classes)[:, None] * np.ones_like(np.asarray(state.queue_job[r]))
    out += list(zip(qc[q >= 0], q[q >= 0]))
    b = np.asarray(state.buffers_job[r])  # rows b x I + c
    bc = np.broadcast_to((np.arange(b.shape[0]) % num_classes)[:, None], b.shape)
    out += list(zip(bc[b >= 0], b[b >= 0]))
    g = state.gpus
    pj, pc = np.asarray(g.prefill_job[r]), np.asarray(g.prefill_class[r])
    out += list(zip(pc[pj >= 0], pj[pj >= 0]))
    dj, dc = np.asarray(g.decode_job[r]), np.asarray(g.decode_class[r])
    out += list(zip(dc[dj >= 0], dj[dj >= 0]))
    return out


@pytest.mark.parametrize("policy", ["gg-sp", "fi-wsp", "sli"])
def test_conservation_and_job_indices_under_congestion(policy):
    """A cluster too small for the trace: jobs wait and abandon. Conservation holds; every job of the
    trace arrived; the jobs in the system are distinct, each counted once, and in their class's range."""
    trace = synthetic(2000, 120.0, seed=3)
    scenario, law, jobs = replay_setup(CANONICAL.replace(**{"classes.theta": [0.2, 0.2]}), trace, 6)
    ((state, params, spec, pol),) = run_windows(scenario, law, jobs, 6, [(0.0, 121.0)], policy=policy, replicas=3)
    check_final_states(state, params, spec, pol, "general")
    totals = np.asarray(state.totals)
    np.testing.assert_array_equal(totals[:, ARRIVED], np.tile(jobs.counts(), (3, 1)))
    assert np.all(totals[:, WAITED].sum(-1) > 0), "the test needs queueing"
    if policy != "fi-wsp":  # prefill-first admits every job at once: its jobs wait in decode buffers instead
        assert np.all((totals[:, ABANDON_PREFILL] + totals[:, ABANDON_DECODE]).sum(-1) > 0), "the test needs abandonment"
    for r in range(3):
        inside = _in_system_jobs(state, r, 2)
        assert len(inside) == len(set(inside)), "a job in two places"
        for c, j in inside:
            assert 0 <= j < jobs.counts()[c]
        levels = totals[r, ARRIVED] - totals[r, ABANDON_PREFILL] - totals[r, ABANDON_DECODE] - totals[r, DECODE_DONE] - totals[r, LOST]
        assert len(inside) == levels.sum()


def test_one_class_replay_keeps_room_cells():
    sc = mmc_scenario(8, 4.0, 0.5, base=CANONICAL)
    t, P, D, _ = synthetic(300, 60.0, classes=1, seed=5)
    lab = np.zeros(300, int)
    scenario, law, jobs = replay_setup(sc, (t, P, D, lab), 8)
    ((state, params, spec, pol),) = run_windows(scenario, law, jobs, 8, [(0.0, 61.0)], replicas=2)
    check_final_states(state, params, spec, pol, "general")
    assert np.asarray(state.queue_job).shape[-1] == 256
    np.testing.assert_array_equal(np.asarray(state.totals)[:, ARRIVED, 0], 300)


def test_replay_through_the_api_and_its_errors():
    trace = synthetic(200, 60.0)
    scenario, law, jobs = replay_setup(CANONICAL, trace, 10)
    res = jaxq.run(scenario, "gg-sp", n=10, replicas=2, horizon=60.0, warmup=0.0, service=law, replay=jobs)
    assert res.engine == "general" and not res.status
    with pytest.raises(ValueError, match="'engine'"):
        jaxq.run(scenario, "gg-sp", n=10, replicas=2, horizon=60.0, engine="stepped", service=law, replay=jobs)
    with pytest.raises(ValueError, match="'replay'.*3 classes"):
        jaxq.run(scenario, "gg-sp", n=10, replicas=2, horizon=60.0, service=law, replay=TraceJobs.of(*trace, 3))
    with pytest.raises(ValueError, match="jobs.prompt_tokens"):
        TraceJobs.of([0.0, 1.0], [0.0, 5.0], [3.0, 4.0], [0, 1], 2)
    with pytest.raises(ValueError, match="jobs.labels"):
        TraceJobs.of([0.0, 1.0], [2.0, 5.0], [3.0, 4.0], [0, 2], 2)
    with pytest.raises(ValueError, match="'replay'.*3 traces for 2 replicas"):
        jaxq.run(scenario, "gg-sp", n=10, replicas=2, horizon=60.0, service=law, replay=[jobs] * 3)
    with pytest.raises(ValueError, match="'replay'"):
        jaxq.run(scenario, "gg-sp", n=10, replicas=2, horizon=60.0, service=law, replay=["a", "b"])


def test_one_trace_per_replica():
    """A list of traces replays trace r in replica r (3 replicas on 4 devices: the padding is dropped):
    each replica's arrivals per class are its own trace's, and its latencies counted are its jobs'."""
    traces = [synthetic(m, 60.0, seed=s) for m, s in ((150, 1), (260, 2), (90, 3))]
    I = CANONICAL.num_classes
    t0, P0, D0, lab0 = traces[0]
    law = ServiceLaw.empirical([P0[lab0 == i] for i in range(I)], [D0[lab0 == i] for i in range(I)])
    scenario = law.with_means(CANONICAL)
    jobs = [TraceJobs.of(*tr, I) for tr in traces]
    pol = get_policy("gg-sp")
    spec = engine_spec("general", scenario, 200, room=256)
    params, _, _ = make_params(scenario, pol, 200, horizon=60.0, warmup=0.0)
    state, _ = run_replicas(jax.random.split(jax.random.key(0), 3), params, spec, pol, engine="general",
                            service=law, replay=jobs)
    arrived = np.asarray(state.totals)[:, ARRIVED]
    np.testing.assert_array_equal(arrived, [j.counts() for j in jobs])
    # 200 GPUs: nobody waits, so every job that arrived has its first token counted once
    ttft = np.asarray(state.gpus.latency_counts)[:, TTFT].sum(-1)
    assert np.all(ttft <= arrived) and np.all(ttft >= arrived - 2 * 200)
    assert ttft.sum(1).tolist() != [ttft.sum(1)[0]] * 3
