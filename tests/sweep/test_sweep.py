"""Sweeps: grid parsing and validation, one compile per shape group, reproducibility across chunking,
resumption and device count, outputs that never look complete early, the CLI.

Tiny on purpose (n = 5, horizon 20 s, 3 replicas, room fixed so every grid here shares its shape group):
the compiled simulators are cached across tests, and the whole file makes three compiles."""

import dataclasses
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxq  # noqa: F401  (x64)
from jaxq.cli import main as jaxq_main
from jaxq.sweep import loads_grid, run_points, run_sweep
from jaxq.sweep import runner as sweep_runner
from jaxq.sweep.outputs import (
    CSV_NAME,
    MANIFEST_NAME,
    STATS,
    STATUS_COLUMNS,
    Progress,
    read_csv,
)

LAMS = [round(0.2 + 0.008 * k, 6) for k in range(100)]
BASE = """
scenario = "canonical"
seed = 7
[base]
n = 5
replicas = 3
horizon = 20.0
warmup = 4.0
room = 128
"""
FIELDS = ("counts", "integrals", "totals", "status", "t")


def grid_text(lams, extra=""):
    return BASE + extra + f"\n[grid]\n\"classes.lam\" = {lams!r}\n"


@pytest.fixture(scope="module")
def hundred():
    """The 100-point arrival-rate sweep on the 4 host devices, from an empty compile cache."""
    sweep_runner._batched.cache_clear()
    before = sweep_runner.TRACE_COUNT
    grid = loads_grid(grid_text(LAMS))
    results = run_points(grid.points, max_batch=400)  # 100 points x 4 padded replicas: one call
    return grid, results, sweep_runner.TRACE_COUNT - before


def no_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


# -- grid files ----------------------------------------------------------------------------------------

def test_grid_expands_product_and_points_and_dotted_tables():
    g = loads_grid(BASE + """
[grid]
classes.lam = [0.3, [0.4, 0.5]]
policy = ["gg-sp", "FI-WSP"]
[[points]]
seed = 1
[[points]]
seed = 2
"cluster.B" = 8
""")
    assert len(g.points) == 2 * 2 * 2
    assert set(g.varied) == {"classes.lam", "policy", "seed", "cluster.B"}
    p = g.points[-1]
    assert p.scenario.classes.lam.tolist() == [0.4, 0.5] and p.settings["policy"] == "fi-wsp"
    assert p.scenario.cluster.B == 8 and p.scenario.cluster.n == 5 and p.settings["seed"] == 2
    assert g.points[0].scenario.classes.lam.tolist() == [0.3, 0.3]  # a number: every class
    assert p.settings["warmup"] == 4.0 and p.settings["room"] == 128 and p.settings["dt"] is None
    assert len({q.hash for q in g.points}) == len(g.points)
    # common random numbers: points differing only in policy share their replica keys
    same = [q for q in g.points if q.settings["seed"] == 1 and q.values["classes.lam"] == 0.3]
    assert len(same) == 2 and same[0].stream == same[1].stream
    np.testing.assert_array_equal(*(sweep_runner.replica_keys([q], 3) for q in same))


@pytest.mark.parametrize("text, match", [
    ('scenario = "canonical"\nbogus = 1', "unknown key 'bogus'"),
    ('seed = 1', "missing key 'scenario'"),
    ('scenario = "canonical"\n[grid]\n"classes.lamda" = [0.1]', "unknown sweep field 'classes.lamda'"),
    ('scenario = "canonical"\n[grid]\n"cluster.n" = [5]', "axis 'n'"),
    ('scenario = "canonical"\n[base]\nhorizons = 5.0', "unknown sweep field 'horizons'"),
    ('scenario = "canonical"\n[grid]\nn = 5', "non-empty list"),
    ('scenario = "canonical"\n[grid]\n"classes.lam" = [0.5, -1.0]',
     r"sweep point 1 \(classes.lam=-1\).*classes.lam\[0\]"),
    ('scenario = "canonical"\n[grid]\n"classes.lam" = [[0.5, 0.5, 0.5]]', "classes.lam"),
    ('scenario = "canonical"\n[grid]\npolicy = ["gg-sp", "nope"]', r"sweep point 1.*'policy'"),
    ('scenario = "canonical"\n[base]\ndt = 0.1', "'dt'"),
    ('scenario = "canonical"\n[grid]\nhorizon = [10.0, 5.0]\n[base]\nwarmup = 6.0', r"sweep point 1.*'warmup'"),
    ('scenario = "canonical"\n[grid]\n"timing.beta" = [0.0]', "timing.beta"),
    ('scenario = "canonical"\n[grid]\nseed = [1]\n[[points]]\nseed = 2', "also a \\[grid\\] axis"),
    ('scenario = "canonical"\n[grid]\n"classes.lam" = [0.5, 0.5]', "same configuration"),
    ('scenario = "nonexistent-scenario"', "unknown scenario"),
    ('scenario = "canonical"\n[grid\n', "not valid TOML"),
])
def test_grid_errors_name_the_field_or_point(text, match):
    with pytest.raises(ValueError, match=match):
        loads_grid(text)


def test_stepped_engine_settings():
    text = BASE + '[grid]\nengine = ["exact", "stepped"]\nhorizon = [10.0, 20.0]\n'
    if importlib.util.find_spec("jaxq.sim.stepped") is None:
        with pytest.raises(ValueError, match=r"sweep point 1 .*'engine'"):
            loads_grid(text)
        return
    from jaxq.sim.stepped import DEFAULT_DT

    g = loads_grid(text)
    stepped = [p for p in g.points if p.settings["engine"] == "stepped"]
    assert all(p.settings["dt"] == float(DEFAULT_DT) for p in stepped)
    # the exact engine's horizon is in params (one group), the stepped engine's may be static (two)
    assert len(sweep_runner.plan_chunks(g.points, 1024, 1)) == 3
    with pytest.raises(ValueError, match=r"sweep point 0: .*'dt'"):  # the engine's own check, up front
        loads_grid('scenario = "canonical"\n[base]\nengine = "stepped"\ndt = 5.0\n')


def test_trace_time_refusal_fails_before_anything_runs(monkeypatch):
    def refusing(engine, spec, policy, dt=None):
        def single(key, params):
            raise ValueError(f"invalid field 'policy': {policy.name} cannot run here")
        return single

    monkeypatch.setattr(sweep_runner, "runner", refusing)
    grid = loads_grid(grid_text(LAMS[:2]))
    ran = []
    with pytest.raises(ValueError, match=r"sweep point 0 \(classes.lam=0.2\): invalid field 'policy'"):
        run_points(grid.points, on_chunk=ran.append)
    assert ran == []


# -- batching, keys, devices ----------------------------------------------------------------------------

def test_hundred_point_sweep_compiles_once(hundred):
    grid, results, traces = hundred
    assert traces == 1
    assert sweep_runner.plan_chunks(grid.points, 400, len(jax.devices()))[0][1] == 100
    # new rates, same shapes: no new trace
    before = sweep_runner.TRACE_COUNT
    shifted = loads_grid(grid_text([x + 0.001 for x in LAMS]))
    run_points(shifted.points, max_batch=400)
    assert sweep_runner.TRACE_COUNT == before
    assert all(np.all(r.status == 0) for r in results)
    # the rate reaches the simulation: arrivals grow with lam
    arrivals = np.array([r.summary["arrival_rate"].mean.sum() for r in results])
    assert np.corrcoef(LAMS, arrivals)[0, 1] > 0.9


def test_chunking_padding_and_one_device_give_identical_replicas(hundred):
    grid, results, _ = hundred
    assert len(jax.devices()) == 4  # tests/conftest.py
    picked = [grid.points[k] for k in (3, 50, 97)]
    # one device, 2 points per call (3 replicas, no padding) vs 4 devices, 100 per call (padded to 4 replicas)
    single = run_points(picked, max_batch=6, devices=jax.devices()[:1])
    for a, p in zip(single, picked):
        b = results[p.index]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        assert a.events == b.events > 0


def test_chunks_split_points_when_that_pads_less_with_identical_replicas(hundred):
    grid, results, _ = hundred
    plan = lambda pts, mb, d: [c[1:] for c in sweep_runner.plan_chunks(pts, mb, d)]  # noqa: E731
    # 100 points x 3 replicas on 4 devices: by points 300 runs, by replicas (3 -> 4) 400
    assert plan(grid.points, 400, 4) == [(100, 3, True)]
    assert plan(grid.points, 400, 1) == [(100, 3, False)]  # one device: nothing to split
    # 10 points: 12 x 3 = 36 runs by points, 10 x 4 = 40 by replicas; a tie (3 points: 12 = 12) keeps replicas
    assert plan(grid.points[:10], 400, 4) == [(12, 3, True)]
    assert plan(grid.points[:3], 400, 4) == [(3, 4, False)]
    # max_batch bounds a chunk either way: 40 per call -> chunks of 12 points (36 runs), padded to 4
    assert plan(grid.points[:24], 40, 4) == [(12, 3, True)] * 2
    assert plan(grid.points[:5], 8, 4) == [(2, 4, False)] * 3  # fewer than 4 points fit: by replicas
    # the hundred fixture ran by points; the same points by replicas give the same bits
    picked = [grid.points[k] for k in (3, 50, 97)]
    assert plan(picked, 12, 4) == [(3, 4, False)]
    for a, p in zip(run_points(picked, max_batch=12), picked):
        b = results[p.index]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


# -- outputs, resume ------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_and_partial_never_complete(tmp_path, hundred):
    _, results, _ = hundred
    grid = loads_grid(grid_text(LAMS[:6]))
    fresh = run_sweep(grid, tmp_path / "fresh", max_batch=8)  # 4 devices, 2 points per call
    assert fresh.complete and fresh.computed == 6

    seen = []

    def kill_after_two_chunks(chunk):
        manifest = json.loads((tmp_path / "killed" / MANIFEST_NAME).read_text())
        _, rows = read_csv(tmp_path / "killed" / CSV_NAME)
        seen.append((manifest["complete"], manifest["points_done"], len(rows)))
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, tmp_path / "killed", max_batch=8, on_chunk=kill_after_two_chunks)
    assert seen == [(False, 2, 2), (False, 4, 4)]
    manifest = json.loads((tmp_path / "killed" / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and manifest["finished_at"] is None

    # resume on one device with another chunking: only the 2 missing points are simulated
    resumed = run_sweep(grid, tmp_path / "killed", max_batch=6, devices=jax.devices()[:1])
    assert resumed.computed == 2 and resumed.complete
    manifest = json.loads((tmp_path / "killed" / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and len(manifest["sessions"]) == 2

    cols_a, rows_a = read_csv(tmp_path / "fresh" / CSV_NAME)
    cols_b, rows_b = read_csv(tmp_path / "killed" / CSV_NAME)
    assert cols_a == cols_b and no_wall(rows_a) == no_wall(rows_b)  # every number, bit for bit
    # and equal to the same points inside the 100-point sweep (other chunking, padded replicas)
    for row, res in zip(rows_a, results[:6]):
        assert row["hash"] == res.point.hash
        assert float(row["revenue_bundled_mean"]) == float(res.summary["revenue_bundled"].mean)

    # a finished run is not recomputed
    again = run_sweep(grid, tmp_path / "killed", max_batch=8)
    assert again.computed == 0 and again.complete


def test_changed_grid_refused_unless_restart(tmp_path):
    grid = loads_grid(grid_text(LAMS[:2]))
    run_sweep(grid, tmp_path, max_batch=8)
    changed = loads_grid(grid_text(LAMS[:2]).replace("horizon = 20.0", "horizon = 21.0"))
    with pytest.raises(ValueError, match="--restart"):
        run_sweep(changed, tmp_path, max_batch=8)
    # a compatible change (more points) resumes and computes only the new points
    grown = loads_grid(grid_text(LAMS[:2] + LAMS[10:12]))
    assert run_sweep(grown, tmp_path, max_batch=8).computed == 2
    res = run_sweep(changed, tmp_path, max_batch=8, restart=True)
    assert res.computed == 2 and len(res.rows) == 2


def test_csv_columns_and_interval_ordering(tmp_path):
    grid = loads_grid(grid_text(LAMS[:2]))
    run_sweep(grid, tmp_path, max_batch=8)
    cols, rows = read_csv(tmp_path / CSV_NAME)
    for c in ("point", "hash", "n", "policy", "engine", "replicas", "horizon", "warmup", "seed",
              "classes.lam[code]", "classes.lam[summarization]", "revenue_bundled_mean", "revenue_bundled_ci_lo",
              "throughput[code]_se", "throughput[summarization]_ci_hi", *STATUS_COLUMNS, "events", "wall_s"):
        assert c in cols, c
    assert len(rows) == 2 and [r["point"] for r in rows] == ["0", "1"]
    metrics = {c[: -len("_mean")] for c in cols if c.endswith("_mean")}
    checked = 0
    for r in rows:
        assert int(r["status_ok"]) == int(r["replicas"]) == 3 and int(r["events"]) > 0
        for m in metrics:
            lo, mean, hi = (float(r[f"{m}_{s}"]) for s in ("ci_lo", "mean", "ci_hi"))
            if np.isfinite(lo):
                assert lo <= mean <= hi, m
                checked += 1
    assert checked > 40
    assert set(STATS) == {"mean", "se", "ci_lo", "ci_hi"}
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["grid_text"] == grid.text
    assert set(manifest["versions"]) == {"jax", "jaxlib", "equinox", "numpy", "jaxq"}
    assert manifest["devices"]["count"] == 4 and manifest["seeds"]["sweep"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_and_progress(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(grid_text(LAMS[:2]))
    assert jaxq_main(["sweep", str(path), "--out", str(tmp_path / "o"), "--max-batch", "8"]) == 0
    out, err = capsys.readouterr()
    assert "revenue bundled" in out and "classes.lam" in out and "2 points" in out
    assert "\rsweep 2/2 points" in err and "events/s" in err
    assert jaxq_main(["sweep", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "0 simulated now" in out and err == ""
    stream = io.StringIO()
    bar = Progress(10, 4, stream=stream, tick=0.05)
    bar.start_chunk(1, 3, 3)
    assert stream.getvalue().endswith("running 3 (chunk 2/3) | 0 events/s | elapsed 0:00 | left ?")
    drawn = stream.getvalue().count("\r")
    time.sleep(0.3)
    assert stream.getvalue().count("\r") > drawn  # the ticker redraws while a chunk runs
    bar.update(3, 1000)
    bar.close()
    assert "sweep 7/10 points | " in stream.getvalue() and "left" in stream.getvalue()
    assert not bar._ticker.is_alive()


def test_example_grid_parses():
    from jaxq.sweep import load_grid

    g = load_grid(Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "canonical-lambda.toml")
    assert len(g.points) == 8 and set(g.varied) == {"classes.lam", "policy"}
    assert {p.settings["n"] for p in g.points} == {20} and {p.settings["replicas"] for p in g.points} == {8}


# -- several processes -----------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import sys
    from jaxq.cli import main
    coordinator, pid, grid, out = sys.argv[1:]
    rc = main(["sweep", grid, "--out", out, "--max-batch", "8", "--quiet", "--coordinator", coordinator,
               "--num-processes", "2", "--process-id", pid])
    import jax
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    print("done", jax.process_index(), rc, flush=True)
""")


@pytest.mark.slow
def test_two_processes_with_jax_distributed(tmp_path):
    """Two local processes x 2 CPU devices each (jax.distributed, coordinator on localhost): process 0
    writes, and the numbers equal a one-process run on the 4 host devices."""
    text = grid_text(LAMS[:4])
    (tmp_path / "g.toml").write_text(text)
    (tmp_path / "w.py").write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "w.py"), f"localhost:{port}", str(i),
                               str(tmp_path / "g.toml"), str(tmp_path / "multi")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("jax.distributed workers timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "done 0 0" in outs[0] and "done 1 0" in outs[1]
    assert "4 simulated now" in outs[0] and "revenue bundled" not in outs[1]  # process 0 reports
    single = run_sweep(loads_grid(text), tmp_path / "single", max_batch=8)
    _, rows_multi = read_csv(tmp_path / "multi" / CSV_NAME)
    assert no_wall(rows_multi) == no_wall(single.rows)
    assert json.loads((tmp_path / "multi" / MANIFEST_NAME).read_text())["devices"]["process_count"] == 2


def test_an_arrival_schedule_is_part_of_a_point_and_its_hash():
    """A scenario's rate schedule is in the point's configuration, so a changed schedule is a new point
    (a resumed sweep never reuses results of another schedule); a constant-rate point's hash is as before."""
    from jaxq.model import ArrivalSchedule
    from jaxq.sweep.grid import Point, scenario_dict

    base = jaxq.load_scenario("canonical")
    assert "arrivals" not in scenario_dict(base)
    a = dataclasses.replace(base, arrivals=ArrivalSchedule([0.0, 100.0], [1.0, 2.0]))
    b = dataclasses.replace(base, arrivals=ArrivalSchedule([0.0, 100.0], [1.0, 1.5]))
    assert scenario_dict(a)["arrivals"] == {"breakpoints": [0.0, 100.0], "factors": [[1.0, 2.0], [1.0, 2.0]]}
    settings = {"n": 4, "seed": 0}
    hashes = {Point(0, {}, s, settings).hash for s in (base, a, b)}
    assert len(hashes) == 3
