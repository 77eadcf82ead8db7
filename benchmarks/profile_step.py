"""Where an engine's time goes, by XLA thunk: `python benchmarks/profile_step.py [ENGINE] [R] [HORIZON]`.

Runs the canonical instance (n = 500, GG-SP) once under ``jax.profiler``, reads the trace back with
``jax.profiler.ProfileData`` and prints the share of thunk time per fused kernel and per kind of
operation (masked selects, random bits, reductions, the waiting rooms' shifts, loop bookkeeping,
copies), named from the HLO's op_name metadata. Tracing adds a cost per thunk, so read the shares, not
the absolute times (`jaxq bench` gives those)."""

from __future__ import annotations

import collections
import glob
import re
import shutil
import sys
import tempfile
import time

import jax

import jaxq
from jaxq.benchmarks.bench import EngineCase


def op_names(hlo_text: str) -> dict[str, str]:
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def kind_of(thunk: str, op: str) -> str:
    if "threefry" in op or "_uniform" in op or "random" in op:
        return "random bits (threefry)"
    if "/pad" in op or "concatenate" in op:
        return "pad / concatenate (room shifts)"
    if op.endswith("select_n"):
        return "select (masked updates)"
    if "reduce" in thunk or "reduce" in op or "argmin" in op:
        return "reductions"
    return op.split("/")[-1] if op else thunk.split(".")[0]


def main(engine="exact", replicas=512, horizon=0.1):
    case = EngineCase(engine, jaxq.load_scenario("canonical"), "gg-sp", 500, replicas, 800)
    names = op_names(case.compiled.as_text())
    go = case.call(horizon)
    go()
    where = tempfile.mkdtemp()
    jax.profiler.start_trace(where)
    t0 = time.perf_counter()
    go()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{where}/**/*.xplane.pb", recursive=True)[0])
    shutil.rmtree(where, ignore_errors=True)
    per_thunk = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                for ev in line.events:
                    if not ev.name.startswith("ThunkExecutor"):
                        per_thunk[ev.name] += ev.duration_ns
    total = sum(per_thunk.values()) or 1
    kinds = collections.Counter()
    for thunk, ns in per_thunk.items():
        kinds[kind_of(thunk, names.get(thunk, ""))] += ns
    print(f"{engine}, canonical n = 500, R = {replicas}, horizon {horizon:g} s: {wall:.2f} s wall under the profiler")
    for k, ns in kinds.most_common(12):
        print(f"  {100 * ns / total:5.1f}%  {k}")
    print("largest kernels:")
    for thunk, ns in per_thunk.most_common(8):
        print(f"  {100 * ns / total:5.1f}%  {thunk}  ({names.get(thunk, '')[-80:]})")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "exact", int(args[1]) if len(args) > 1 else 512, float(args[2]) if len(args) > 2 else 0.1)
