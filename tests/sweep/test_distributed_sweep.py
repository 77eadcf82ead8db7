"""One sweep run by two processes under ``jax.distributed`` on this machine (CPU devices, gloo
collectives, coordinator on 127.0.0.1), through the real command line: the CSV equals a one-process
run cell for cell, only process 0 writes, and a run started in one process resumes in two.

Each launch starts two fresh Python processes that each compile the simulator once (one device each:
2 global devices); the one-process runs here share one compile (one point per chunk everywhere)."""

import csv
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

import jaxq  # noqa: F401  (x64)
from jaxq.cli import main as jaxq_main
from jaxq.sweep import loads_grid, run_sweep
from jaxq.sweep.outputs import CSV_NAME, MANIFEST_NAME

GRID = """
scenario = "canonical"
seed = 3
[base]
n = 5
replicas = 3
horizon = 20.0
warmup = 4.0
room = 128
[grid]
"classes.lam" = {lams!r}
"""
LAMS = [0.3, 0.45, 0.6]
# 3 replicas pad to 4 on 2 or 4 devices (3 on 1): one point per chunk in every run here
MAX_BATCH = "4"
TIMEOUT_S = 300


def free_port(low: int = 0) -> int:
    """A port nobody listens on: the kernel's pick (``low`` = 0), else the first free one from ``low``."""
    for port in [0] if low == 0 else range(low, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port from {low}")


def launch(argv_env: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Run ``python -m jaxq.cli ARGV`` once per (argv, extra env) at the same time, one CPU device each;
    their standard outputs less gloo's connection lines, after all exited 0 (else fail showing every
    process's stdout and stderr)."""
    # a cluster job's own variables (this test run inside SLURM or MPI) would steer jax.distributed
    ours = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR"))}
    base = {**ours, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxq.cli", *argv], env={**base, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, env in argv_env]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs += [p.communicate() for p in procs[len(outs):]]
        pytest.fail(f"jax.distributed processes still running after {TIMEOUT_S} s:\n" + _show(outs))
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"exit codes {[p.returncode for p in procs]}:\n" + _show(outs))
    return ["".join(line for line in out.splitlines(keepends=True) if not line.startswith("[Gloo]"))
            for out, _ in outs]


def _show(outs):
    return "\n".join(f"--- process {k} stdout ---\n{o}\n--- process {k} stderr ---\n{e}"
                     for k, (o, e) in enumerate(outs))


def read_rows(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def assert_same_cells(multi, single):
    """The two CSVs have the same columns and rows, every cell equal as text (floats are written
    with repr: equal text is equal bits), except ``wall_s``."""
    cols_m, rows_m = read_rows(multi)
    cols_s, rows_s = read_rows(single)
    assert cols_m == cols_s
    assert [r["point"] for r in rows_m] == [r["point"] for r in rows_s]
    for rm, rs in zip(rows_m, rows_s):
        diff = {c: (rm[c], rs[c]) for c in cols_s if c != "wall_s" and rm[c] != rs[c]}
        assert not diff, f"point {rs['point']}: (two processes, one process) differ: {diff}"
    return rows_m


def one_process(lams, out):
    """The same grid run here, in this one process, on 2 of the host devices of tests/conftest.py: the
    layout of the two processes (2 devices, 2 replicas each). On another device count the float
    integrals can differ in their last bits (docs/sweeps.md, Devices), not the counts."""
    assert jax.process_count() == 1
    return run_sweep(loads_grid(GRID.format(lams=lams)), out, max_batch=int(MAX_BATCH), devices=jax.devices()[:2])


def test_two_processes_resume_a_one_process_run_and_equal_it(tmp_path):
    """Point 0 is run by one process; the two processes (--coordinator/--num-processes/--process-id)
    resume there and compute points 1 and 2. Process 1 is given its own --out: it creates nothing."""
    (tmp_path / "g.toml").write_text(GRID.format(lams=LAMS))
    one_process(LAMS[:1], tmp_path / "multi")  # a grid with points added is a compatible resume
    single = one_process(LAMS, tmp_path / "single")
    assert single.complete and single.computed == 3

    port = free_port()
    outs = launch([(["sweep", str(tmp_path / "g.toml"), "--out", str(tmp_path / out), "--max-batch", MAX_BATCH,
                     "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(k)], {})
                   for k, out in enumerate(["multi", "not-written"])])
    assert "3 points (2 simulated now, 1 from a previous run)" in outs[0]
    assert outs[1] == ""  # process 1 reports nothing ...
    assert not (tmp_path / "not-written").exists()  # ... and writes nothing

    rows = assert_same_cells(tmp_path / "multi" / CSV_NAME, tmp_path / "single" / CSV_NAME)
    assert len(rows) == 3
    manifest = json.loads((tmp_path / "multi" / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["points_done"] == 3
    assert manifest["devices"]["process_count"] == 2 and manifest["devices"]["count"] == 2
    assert [s["points_computed"] for s in manifest["sessions"]] == [1, 2]
    assert [s["devices"] for s in manifest["sessions"]] == [2, 2]


@pytest.mark.slow
def test_two_processes_find_each_other_from_a_slurm_environment(tmp_path):
    """``--distributed`` alone: jax.distributed.initialize() reads the variables srun sets (two tasks
    on one node here, named 127.0.0.1; the coordinator port JAX derives from SLURM_JOB_ID). JAX keeps
    the device of each task's SLURM_LOCALID on GPUs; a CPU client ignores it."""
    (tmp_path / "g.toml").write_text(GRID.format(lams=LAMS[1:]))
    single = one_process(LAMS[1:], tmp_path / "single")
    base_port = 65535 - 2**12 + 1  # JAX's SLURM port: base_port + SLURM_JOB_ID % 4096
    job_id = free_port(base_port) - base_port
    slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_NODES": "1"}
    outs = launch([(["sweep", str(tmp_path / "g.toml"), "--out", str(tmp_path / "multi"), "--max-batch", MAX_BATCH,
                     "--quiet", "--distributed"], {**slurm, "SLURM_PROCID": str(k), "SLURM_LOCALID": str(k)})
                   for k in range(2)])
    assert "2 points (2 simulated now, 0 from a previous run)" in outs[0] and outs[1] == ""
    assert single.computed == 2
    assert len(assert_same_cells(tmp_path / "multi" / CSV_NAME, tmp_path / "single" / CSV_NAME)) == 2
    assert json.loads((tmp_path / "multi" / MANIFEST_NAME).read_text())["devices"]["process_count"] == 2


class _Initialized(Exception):
    pass


@pytest.mark.parametrize("flags, detection", [
    (["--coordinator", "host0:1234", "--num-processes", "2", "--process-id", "1"], "deactivate"),
    (["--distributed"], None),
    (["--distributed", "--coordinator", "host0:1234"], None),
])
def test_explicit_flags_turn_cluster_detection_off(flags, detection, tmp_path, monkeypatch):
    """With --coordinator, --num-processes and --process-id all given, JAX's cluster detection is off:
    inside a SLURM job it would also restrict each process to the device of its local task id (one GPU
    of a one-task-per-host job). --distributed, or some flags missing, leaves detection on."""
    seen = {}

    def initialize(**kwargs):
        seen.update(kwargs)
        raise _Initialized

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    (tmp_path / "g.toml").write_text(GRID.format(lams=LAMS[:1]))
    with pytest.raises(_Initialized):
        jaxq_main(["sweep", str(tmp_path / "g.toml"), "--out", str(tmp_path / "out"), *flags])
    assert seen["cluster_detection_method"] == detection
    assert not (tmp_path / "out").exists()
