"""Behaviour kept: every built-in policy on every engine gives, for fixed seeds, the per-replica
accumulators recorded in tests/data/fingerprints.npz (``python -m jaxq.testing.fingerprints``).
Integers must match exactly and floats to 1e-12 (the same events in the same order); a change that
alters them on purpose rewrites the file and says why in its commit."""

from pathlib import Path

import numpy as np
import pytest

from jaxq.testing.fingerprints import ENGINES, FIELDS, fingerprint, policy_names

RECORD = Path(__file__).parent.parent / "data" / "fingerprints.npz"
# the default run covers every decision path (greedy, coupled, prefill-first, two buffers, bursts) on
# every engine; --run-slow runs every pair
DEFAULT = {("exact", p) for p in ("gg-sp", "fi-wsp", "gf-wsp", "sli", "gg-sp-hb")} | {
    ("population", "gg-sp"), ("population", "fi-wsp"), ("general", "gg-sp"), ("general", "gf-wsp"),
    ("general-lognormal", "sli"), ("stepped", "gg-sp"), ("stepped", "fi-wsp"), ("stepped", "sli"),
    ("exact-A", "gi-wsp")}


def _pairs():
    for engine in ENGINES:
        for policy in policy_names():
            marks = () if (engine, policy) in DEFAULT else (pytest.mark.slow,)
            yield pytest.param(engine, policy, marks=marks, id=f"{engine}-{policy}")


@pytest.mark.parametrize("engine, policy", list(_pairs()))
def test_fingerprint(engine, policy):
    record = np.load(RECORD)
    got = fingerprint(engine, policy)
    for field in FIELDS:
        want = record[f"{engine}/{policy}/{field}"]
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got[field], want, err_msg=field)
        else:
            np.testing.assert_allclose(got[field], want, rtol=1e-12, atol=0, err_msg=field)
