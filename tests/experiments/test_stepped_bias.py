"""`jaxq reproduce stepped-bias` at its smoke size: outputs exist and are sane (the quick size's numbers are in
docs/time-stepped.md)."""

from __future__ import annotations



from jaxq.experiments.reproduce import reproduce
from jaxq.testing.outputs import check_outputs as _check_outputs
from jaxq.testing.outputs import rows as _rows


def test_stepped_bias_smoke(tmp_path):
    out = reproduce("stepped-bias", "smoke", tmp_path)
    m = _check_outputs(out, [])
    rows = _rows(out.dir / m["files"][0])
    assert {r["policy"] for r in rows} == {"gg-sp", "jsq"}  # a built-in and an example policy
    assert len(m["claims"]) == 1 and m["claims"][0]["holds"] is None  # 4 replicas decide nothing
