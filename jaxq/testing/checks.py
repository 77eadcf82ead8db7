"""Checks that any engine's batched final states must pass, whatever the policy: every job accounted
for (conservation), every GPU within its slots, the groups of the plan, status bits that match what
happened. Used by the tests of every engine, and by anyone writing a policy of their own:

    state, _ = jaxq.sim.run_replicas(keys, params, spec, policy, engine="stepped")
    check_final_states(state, params, spec, policy, engine="stepped")
"""

from __future__ import annotations

import jax
import numpy as np

from ..policies.view import ANY, MIXED, SOLO
from ..sim.engines import build, check
from ..sim.state import ABANDON_DECODE, ABANDON_PREFILL, ARRIVED, DECODE_DONE, LOST, OVERFLOW


def _engine(engine, spec, policy, params):
    dt, law = check(engine, spec, policy)
    return build(engine, spec, policy, params, dt=dt, law=law)


def final_levels(states, params, spec, policy, engine: str = "exact") -> np.ndarray:
    """(R, 6, I) levels (Q_p, X, Q_d, Y_m, Y_s, Y on G_mix) of a batch of final states."""
    sim = _engine(engine, spec, policy, params)
    return np.asarray(jax.vmap(sim.levels)(states))


def final_rows(states, params, spec, policy, engine: str = "exact"):
    """The batch's rows (group, prefill_class, decodes, ndec, weight) as numpy arrays, weight all ones
    on the per-GPU engines."""
    sim = _engine(engine, spec, policy, params)
    r = jax.vmap(sim.rows)(states)
    out = {k: np.asarray(getattr(r, k)) for k in ("group", "prefill_class", "decodes", "ndec")}
    out["weight"] = np.ones_like(out["ndec"]) if r.weight is None else np.asarray(r.weight)
    return out


def in_system(states, params, spec, policy, engine: str = "exact") -> np.ndarray:
    """(R, I) jobs in the system per class: waiting, in prefill, in a decode buffer or decoding."""
    return final_levels(states, params, spec, policy, engine)[:, :5].sum(1).astype(np.int64)


def check_final_states(states, params, spec, policy, engine: str = "exact", *, allow_overflow: bool = False):
    """Assert on a batch of final states (leading axis R):

    * conservation: arrived = abandoned + decoded + lost + in the system, per class and replica;
    * no counter or level negative; every row within its group's slots (G_mix: B - 1 decodes and one
      prefill, G_solo: B decodes and no prefill, "any": B jobs of which at most one prefill), and the
      maintained decode counts equal to the rows' decodes;
    * the GPUs per group as the policy's partition lays them out;
    * no status bit, except OVERFLOW where ``allow_overflow`` (a full waiting room is data), which must
      then coincide with lost jobs."""
    t = np.asarray(states.totals)
    out = t[:, ABANDON_PREFILL] + t[:, ABANDON_DECODE] + t[:, DECODE_DONE] + t[:, LOST]
    levels = final_levels(states, params, spec, policy, engine)
    np.testing.assert_array_equal(t[:, ARRIVED], out + levels[:, :5].sum(1), err_msg="conservation")
    assert np.all(t >= 0) and np.all(levels >= 0), "a negative counter or level"
    status = np.asarray(states.status)
    assert np.all((status & ~(OVERFLOW if allow_overflow else 0)) == 0), status
    np.testing.assert_array_equal((status & OVERFLOW) != 0, t[:, LOST].sum(-1) > 0, err_msg="OVERFLOW vs lost")

    r = final_rows(states, params, spec, policy, engine)
    B = int(params.model.B)
    there = r["weight"] > 0
    pre, ndec, group = r["prefill_class"] >= 0, r["ndec"], r["group"]
    np.testing.assert_array_equal(r["decodes"].sum(-1), ndec, err_msg="decode counts")
    assert np.all(r["decodes"] >= 0) and np.all(r["weight"] >= 0)
    cap = np.where(group == MIXED, B - 1, np.where(group == SOLO, B, B - pre))
    assert np.all(~there | (ndec <= cap)), "a GPU over its decode slots"
    assert not np.any(there & pre & (group == SOLO)), "a prefill on G_solo"
    assert np.all(~there | ~pre | (group != ANY) | (ndec + 1 <= B)), "an 'any' GPU over B jobs"
    np.testing.assert_array_equal(r["weight"].sum(-1), spec.num_gpus, err_msg="GPUs")
    groups = np.asarray(policy.partition.groups(params.targets, spec.num_gpus))
    for g in (SOLO, MIXED, ANY):
        np.testing.assert_array_equal((r["weight"] * (group == g)).sum(-1), (groups == g).sum(), err_msg=f"group {g}")
