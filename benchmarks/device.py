"""Every device measurement in one prepared run, for the few minutes a machine with a GPU is lent.

``benchmarks/device.sh`` runs this (``python benchmarks/device.py [--tiny] [--out PATH]``). Stages, each
in its own process with its own time limit so that one slow or failing stage cannot eat the others'
time, and each recorded whatever its outcome:

1. ``tests``: the tests that exercise what differs on an accelerator (sharding over devices, the
   engines' conservation and status bits, waiting rooms, the fingerprints: bit-identity across
   platforms is not promised, so a fingerprint failure there is a finding, not a crash);
2. ``bench``: ``jaxq bench`` (engines' events/s at large replica counts, the simplest JAX chain, the
   step profile and the memory-bandwidth bound of the exact engine);
3. ``sec63``: the Sec 6.3 baselines study at the paper's size (configs/sweeps/sec63-baselines.toml,
   250 cells of n = 500, T = 10,000 s, time-stepped) timed; stopped at its limit it reports the cells
   done and the time extrapolated to all of them.

One JSON record (schema ``jaxq-device/1``) with the device name goes to ``benchmarks/results/``. With
``--tiny`` every stage runs at a size of seconds on any machine (CPU included): what the test
tests/benchmarks/test_device_script.py runs, so that the script is known to work before a device is lent.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "jaxq-device/1"
GPU_TESTS = ("tests/sim/test_batch.py", "tests/sim/test_rooms.py", "tests/sim/test_core.py",
             "tests/sim/test_fingerprints.py")
SEC63 = ROOT / "configs" / "sweeps" / "sec63-baselines.toml"


def _run(cmd, limit_s, env=None, log=None):
    """(return code or None when stopped at ``limit_s``, seconds, last lines of output)."""
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            out, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            code = None
        else:
            code = proc.returncode
        sink.write(out or "")
        lines = (out or "").splitlines()
    return code, time.perf_counter() - t0, lines[-40:]


def device_info(env) -> dict:
    code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
            "'device_kind': d.device_kind, 'num_devices': jax.device_count(), 'jax': jax.__version__}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_tests(tiny, env, limit_s, log):
    # tiny: collected only (the list is valid and imports), the tests themselves run in the suite anyway
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *GPU_TESTS]
    code, secs, tail = _run(cmd + ["--collect-only"] if tiny else cmd, limit_s, env, log)
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error|tests? collected)", ln)), None)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|tests? collected)", summary or "")}
    return {"files": list(GPU_TESTS), "collect_only": tiny, "returncode": code, "seconds": round(secs, 1), "summary": summary,
            "counts": counts, "tail": None if code == 0 else tail}


def stage_bench(tiny, env, limit_s, out_json, log):
    size = ["--tiny"] if tiny else ["--quick", "--replicas", "64,1024,8192"]
    cmd = [sys.executable, "-m", "jaxq.cli", "bench", *size, "--out", str(out_json)]
    code, secs, tail = _run(cmd, limit_s, env, log)
    row = {"returncode": code, "seconds": round(secs, 1), "tail": None if code == 0 else tail}
    if code == 0 and out_json.is_file():
        row["record"] = json.loads(out_json.read_text())
    return row


def tiny_grid(path: Path) -> Path:
    """The Sec 6.3 grid (its instance family unchanged) at a size of seconds: n = 20, T = 20 s, one policy
    (one compile), two instances, two replicas."""
    text = SEC63.read_text()
    base = {"n": "20", "replicas": "2", "horizon": "20.0", "warmup": "5.0"}
    for key, value in base.items():
        text, k = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert k == 1, key
    text = re.sub(r'(?m)^policy = \[.*\]$', 'policy = ["gg-sp"]', text, count=1)
    head, *points = text.split("[[points]]")
    path.write_text(head + "[[points]]" + "[[points]]".join(points[:2]))
    return path


def stage_sec63(tiny, env, limit_s, work: Path, log):
    grid = tiny_grid(work / "sec63-tiny.toml") if tiny else SEC63
    out = work / "sec63"
    cmd = [sys.executable, "-m", "jaxq.cli", "sweep", str(grid), "--out", str(out), "--restart", "--quiet"]
    code, secs, tail = _run(cmd, limit_s, env, log)
    rows = []
    if (out / "results.csv").is_file():
        with open(out / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    total = manifest.get("points_total")
    done = len(rows)
    row = {"grid": str(grid.relative_to(ROOT) if grid.is_relative_to(ROOT) else grid.name), "returncode": code,
           "seconds": round(secs, 1), "cells_done": done, "cells_total": total, "finished": code == 0,
           "tail": None if code == 0 else tail}
    if code is None and done and isinstance(total, int):
        row["seconds_extrapolated"] = round(secs * total / done, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/device.py", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every stage at a size of seconds (any machine, CPU too)")
    parser.add_argument("--out", default=None, help="the JSON record (default benchmarks/results/device-<platform>-"
                                                    "<device>-<date>.json)")
    parser.add_argument("--work", default=None, help="folder for logs and stage outputs (default next to --out)")
    parser.add_argument("--limits", default="150,300,240",
                        help="seconds for the tests, bench and sec63 stages (default 150,300,240: 11.5 min in all)")
    args = parser.parse_args(argv)
    try:
        limits = [float(v) for v in args.limits.split(",")]
        assert len(limits) == 3 and all(v > 0 for v in limits)
    except (ValueError, AssertionError):
        parser.error(f"invalid field 'limits': must be three positive seconds, got {args.limits!r}")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    info = device_info(env)
    date = dt.date.today().isoformat()
    kind = re.sub(r"[^A-Za-z0-9.]+", "_", info["device_kind"]).strip("_") or "device"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"device-{info['platform']}-{kind}-{date}.json"
    work = Path(args.work) if args.work else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    print(f"device run ({'tiny' if args.tiny else 'full'}) on {info['platform']}:{info['device_kind']} "
          f"x{info['num_devices']}; logs in {work}", flush=True)

    record = {"schema": SCHEMA, "mode": "tiny" if args.tiny else "full", "date": date, "device": info,
              "commit": _commit(), "stages": {}}
    t_all = time.perf_counter()
    stages = (("tests", lambda: stage_tests(args.tiny, env, limits[0], work / "tests.log")),
              ("bench", lambda: stage_bench(args.tiny, env, limits[1], work / "bench.json", work / "bench.log")),
              ("sec63", lambda: stage_sec63(args.tiny, env, limits[2], work, work / "sec63.log")))
    for name, stage in stages:
        row = stage()
        record["stages"][name] = row
        print(f"  {name}: return code {row['returncode']} in {row['seconds']} s", flush=True)
        out.write_text(json.dumps(record, indent=1, default=str) + "\n")  # written after each stage: nothing lost
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    s = record["stages"]
    print(f"  tests: {s['tests']['summary']}")
    print(f"  sec63: {s['sec63']['cells_done']}/{s['sec63']['cells_total']} cells in {s['sec63']['seconds']} s"
          + (f" (all cells extrapolated: {s['sec63']['seconds_extrapolated']} s)" if "seconds_extrapolated" in s["sec63"] else ""))
    print(f"wrote {out} ({record['seconds']} s in all)")
    return 0 if all(r["returncode"] == 0 for r in s.values()) else 1


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
