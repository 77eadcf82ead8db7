"""Host-side metrics from the engine's in-scan accumulators, and their summary across replicas.

Per replica, over the window [warmup, horizon] of length W (the warm-up deletion: counters and time
integrals only accumulate after ``warmup``):

* revenue per GPU per second: bundled sum_i w_i S_d,i / (n W); separate
  sum_i (c_p P_i S_p,i + c_d D_i S_d,i) / (n W);
* per class: arrival, admission, prefill and decode completion rates per GPU; abandonment fractions
  from each queue; the fraction of arrivals that waited;
* time averages per GPU (fluid scale): Q_p/n, X/n, Q_d/n, Y_m/n, Y_s/n;
* Little's law on the counts (means over the window, exact in the long run, with an O(1/W) edge
  effect from jobs straddling the window's ends):
  waiting time = int Q_p / arrivals (all arrivals, abandoning or not);
  time to first token = waiting time + int X / admissions (mean prefill time);
  decode wait = int Q_d / prefill completions;
  time per output token = (int (Y_m + Y_s) / decode starts) / D_i;
  end-to-end = int (Q_p + X + Q_d + Y_m + Y_s) / arrivals.

Across replicas: mean, standard error (sample std / sqrt(R)) and a 95% Student-t interval.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats

from ..sim.state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ARRIVED,
    DECODE_DONE,
    DECODE_STARTED,
    INT_QD,
    INT_QP,
    INT_X,
    INT_YM,
    INT_YS,
    LOST,
    PREFILL_DONE,
    STATUS_NAMES,
    WAITED,
)


def _ratio(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def replica_metrics(state, scenario, n: int, horizon: float, warmup: float) -> dict[str, np.ndarray]:
    """Metrics per replica from a batched final state (leading axis R). Class metrics are (R, I)."""
    counts = np.asarray(state.counts, dtype=np.float64)
    integ = np.asarray(state.integrals, dtype=np.float64)
    W = float(horizon) - float(warmup)
    if not W > 0:
        raise ValueError(f"invalid field 'warmup': must be < horizon = {horizon}, got {warmup}")
    P, D = scenario.classes.P, scenario.classes.D
    c_p, c_d = scenario.pricing.c_p, scenario.pricing.c_d
    S_p, S_d = counts[:, PREFILL_DONE], counts[:, DECODE_DONE]
    arrived = counts[:, ARRIVED]
    y = integ[:, INT_YM] + integ[:, INT_YS]
    out = {
        "revenue_bundled": (S_d * scenario.w).sum(-1) / (n * W),
        "revenue_separate": (c_p * P * S_p + c_d * D * S_d).sum(-1) / (n * W),
        "arrival_rate": arrived / (n * W),
        "admission_rate": counts[:, ADMITTED] / (n * W),
        "prefill_rate": S_p / (n * W),
        "throughput": S_d / (n * W),
        "abandon_prefill_fraction": _ratio(counts[:, ABANDON_PREFILL], arrived),
        "abandon_decode_fraction": _ratio(counts[:, ABANDON_DECODE], arrived),
        "wait_probability": _ratio(counts[:, WAITED], arrived),
        "lost": counts[:, LOST],
        "q_p": integ[:, INT_QP] / (n * W),
        "x": integ[:, INT_X] / (n * W),
        "q_d": integ[:, INT_QD] / (n * W),
        "y_m": integ[:, INT_YM] / (n * W),
        "y_s": integ[:, INT_YS] / (n * W),
        "waiting_time": _ratio(integ[:, INT_QP], arrived),
        "decode_wait": _ratio(integ[:, INT_QD], S_p),
        "time_per_output_token": _ratio(y, counts[:, DECODE_STARTED]) / D,
        "end_to_end": _ratio(integ[:, INT_QP] + integ[:, INT_X] + integ[:, INT_QD] + y, arrived),
    }
    out["time_to_first_token"] = out["waiting_time"] + _ratio(integ[:, INT_X], counts[:, ADMITTED])
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    mean: np.ndarray
    se: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    replicas: int

    def __str__(self):
        m, s = np.atleast_1d(self.mean), np.atleast_1d(self.se)
        return ", ".join(f"{a:.6g} ± {1.96 * b:.2g}" for a, b in zip(m, s))


def estimate(samples, confidence: float = 0.95) -> Estimate:
    """Mean, standard error and Student-t confidence interval over axis 0 (replicas), NaNs ignored."""
    x = np.asarray(samples, dtype=np.float64)
    R = np.sum(np.isfinite(x), axis=0)
    # a metric undefined on every replica (e.g. a decode wait with no prefill finished) is NaN, quietly
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=0)
        se = np.where(R > 1, np.nanstd(x, axis=0, ddof=1) / np.sqrt(np.maximum(R, 1)), np.nan)
        half = stats.t.ppf(0.5 + confidence / 2, np.maximum(R - 1, 1)) * se
    return Estimate(mean=mean, se=se, lo=mean - half, hi=mean + half, replicas=int(np.max(R)) if np.size(R) else 0)


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, Estimate]:
    return {k: estimate(v) for k, v in metrics.items()}


def status_report(status) -> dict[str, int]:
    """How many replicas raised each status bit."""
    status = np.asarray(status)
    return {name: int(np.sum((status & bit) != 0)) for bit, name in STATUS_NAMES.items() if np.any(status & bit)}
