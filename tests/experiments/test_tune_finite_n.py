"""`jaxq reproduce tune-finite-n` at its smoke size: outputs exist and are sane (the quick size's numbers are in
docs/tuning.md)."""

from __future__ import annotations



from jaxq.experiments.reproduce import reproduce
from jaxq.testing.outputs import check_outputs as _check_outputs


def test_tune_finite_n_smoke(tmp_path):
    out = reproduce("tune-finite-n", "smoke", tmp_path)
    m = _check_outputs(out, [])
    assert m["files"] and m["claims"] and all(c["evidence"] for c in m["claims"])
