"""`benchmarks/device.sh --tiny`, the prepared device run at a size of seconds, and the `jaxq bench`
record it makes in its tiny mode: every section runs and the JSON records have the expected shape.
Speed itself is never asserted, only that each rate is a positive finite number."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxq.benchmarks import PRESETS

ROOT = Path(__file__).resolve().parents[2]


def _rate(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def device_record(tmp_path_factory):
    """One run of the device script (its bench stage is the bench record the other tests check)."""
    out = tmp_path_factory.mktemp("device") / "device.json"
    # the script runs `python`: this interpreter's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def record(device_record):
    return device_record["stages"]["bench"]["record"]


def test_device_script(device_record):
    rec = device_record
    assert rec["schema"] == "jaxq-device/1" and rec["mode"] == "tiny"
    assert rec["device"]["platform"] == "cpu" and rec["device"]["device_kind"]
    assert set(rec["stages"]) == {"tests", "bench", "sec63"}
    assert all(s["returncode"] == 0 for s in rec["stages"].values()), rec["stages"]
    tests = rec["stages"]["tests"]
    assert tests["collect_only"] and tests["counts"].get("tests collected", 0) >= len(tests["files"])
    sec63 = rec["stages"]["sec63"]
    assert sec63["finished"] and sec63["cells_done"] == sec63["cells_total"] == 2
    assert rec["stages"]["bench"]["record"]["machine"]["platform"] == "cpu"


def test_engine_sections(record):
    assert record["schema"] == "jaxq-bench/1" and record["mode"] == "tiny"
    for key in ("platform", "device_kind", "cpu_model", "cpu_cores", "jax", "jaxq"):
        assert record["machine"][key] not in (None, "")
    assert record["engines"]["exact"] == "available"
    rows = [r for r in record["canonical"] if r["engine"] == "exact"]
    assert [r["replicas"] for r in rows] == list(PRESETS["tiny"].replicas)
    for r in rows:
        assert r["events"] > 0 and r["steps"] >= r["events"] and 0 < r["loop_efficiency"] <= 1
        for key in ("events_per_s", "us_per_event", "run_s", "compile_s", "horizon_s"):
            assert _rate(r[key]), (key, r[key])
    # replicas split over the host devices as the library's runs do (tests/conftest.py: 4), and the
    # same case again on one device
    assert all(r["devices"] == 2 for r in rows)
    (one,) = record["canonical_one_device"]
    assert one["devices"] == 1 and one["replicas"] == rows[0]["replicas"] and _rate(one["events_per_s"])
    for dim in ("replicas", "n", "horizon"):
        assert "exact" in record["scaling"][dim]
    assert all(_rate(r["events_per_s"]) for r in record["scaling"]["horizon"]["exact"]["rows"])
    (bw,) = record["bandwidth"]
    for key in ("bytes_per_event", "bandwidth_Bps", "bound_us_per_event", "ratio_measured_to_bound",
                "ratio_step_to_bound"):
        assert _rate(bw[key]), (key, bw[key])
    assert record["errors"] == {}
    (prof,) = [p for p in record["step_profile"] if p["engine"] == "exact"]
    assert prof["fused_kernels"] > 0 and prof["hlo_instructions"] >= prof["fused_kernels"]
    assert _rate(prof["bytes_per_replica_step"])


def test_chain_yardstick(record):
    (chain,) = record["chain"]
    assert chain["replicas"] == PRESETS["tiny"].mmc_replicas[0] and _rate(chain["events_per_s"])
    assert chain["devices"] == 2  # split like the engines it is the yardstick of
    (ratio,) = [q for q in record["ratios"] if q["engine"] == "exact"]
    assert _rate(ratio["vs_chain"])


def test_chain_agrees_with_erlang_a():
    """The yardstick is a correct simulator: its queue length and abandonment probability within 4 SE
    (over replicas) of Erlang A, at a load where both are far from 0."""
    from jaxq.benchmarks.chain import simplest_chain

    r = simplest_chain(c=5, lam=5.0, mu=1.0, theta=0.5, replicas=256, steps=6_000, seed=1)
    assert abs(r.z_queue) < 4 and abs(r.z_abandon) < 4, r
    assert r.mean_queue > 10 * r.mean_queue_se
    # split over 4 devices: the same replicas, so the same numbers
    split = simplest_chain(c=5, lam=5.0, mu=1.0, theta=0.5, replicas=256, steps=6_000, seed=1,
                           devices=tuple(jax.devices()[:4]))
    assert (split.mean_queue, split.p_abandon) == (r.mean_queue, r.p_abandon)


def test_reference_and_engine_on_mmc(record):
    assert _rate(record["peers"]["reference"]["events_per_s"])
    (row,) = [r for r in record["mmc_engine"] if r["engine"] == "exact"]
    assert _rate(row["mmc_events_per_s"]) and row["mmc_events"] <= row["events"]


@pytest.mark.parametrize("peer", ["ciw", "simpy"])
def test_peer(record, peer):
    pytest.importorskip(peer)
    r = record["peers"][peer]
    assert r["events"] > 0 and _rate(r["events_per_s"]) and r["version"]
    (ratio,) = [q for q in record["ratios"] if q["engine"] == "exact"]
    assert _rate(ratio[f"vs_{peer}"])
