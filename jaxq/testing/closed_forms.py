"""Closed forms for many-server queues, used to test the simulators.

* **Erlang-C** (M/M/c): c servers, Poisson arrivals at rate ``lam``, exponential service at rate ``mu``
  per server, infinite waiting room, nobody leaves. Needs ``lam < c * mu``.
* **Erlang-A** (M/M/c+M): the same, plus each *waiting* customer abandons after an exponential patience
  of rate ``theta`` (customers in service never abandon). Stable for every ``lam`` when ``theta > 0``.

Everything is computed from the stationary distribution of the birth-death chain on the number in
system N (births at ``lam``; deaths at ``min(k, c) * mu + max(k - c, 0) * theta`` in state k), in log
space so that c in the hundreds does not overflow:

* ``p_wait``     = P(N >= c): by PASTA, the probability that an arriving customer has to wait;
* ``mean_queue`` = E[(N - c)^+], the time-average number waiting;
* ``p_abandon``  = theta * E[queue] / lam (rate of abandonments over rate of arrivals);
* ``throughput`` = lam * (1 - p_abandon) = mu * E[min(N, c)], the service-completion rate;
* ``mean_wait``  = E[queue] / lam (Little's law over all arrivals, those who abandon included).

For ``theta > 0`` the infinite sum over k is truncated at the first k >= c at which the geometric bound
on the remaining tail, ``term_k * r / (1 - r)`` with ``r = lam / (c mu + (k + 1 - c) theta)`` (the
ratios decrease in k, so this bounds the tail), falls below ``1e-16`` times the running sum. For
``theta == 0`` the tail above c is summed exactly as a geometric series, which is Erlang-C.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_REL_TOL = 1e-16
_MAX_STATES = 10_000_000


@dataclasses.dataclass(frozen=True)
class QueueMetrics:
    """Stationary metrics of an M/M/c(+M) queue (see the module docstring for the definitions)."""

    c: int
    lam: float
    mu: float
    theta: float
    p_wait: float
    mean_queue: float
    p_abandon: float
    throughput: float
    mean_busy: float  # E[min(N, c)], mean number of busy servers
    mean_wait: float  # E[queue] / lam

    @property
    def mean_in_system(self) -> float:
        return self.mean_busy + self.mean_queue


def _check(c, lam, mu, theta) -> tuple[int, float, float, float]:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) < 1:
        raise ValueError(f"c must be an integer >= 1, got {c!r}")
    lam, mu, theta = float(lam), float(mu), float(theta)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
    if not (math.isfinite(theta) and theta >= 0):
        raise ValueError(f"theta must be a finite number >= 0, got {theta!r}")
    return int(c), lam, mu, theta


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


def birth_death_log_weights(c: int, lam: float, mu: float, theta: float) -> np.ndarray:
    """Unnormalised log stationary weights log w_k, k = 0..K, of the M/M/c+M chain, with w_0 = 1 and
    w_k = w_{k-1} * lam / (min(k, c) mu + max(k - c, 0) theta). For ``theta > 0`` K is the truncation
    point described in the module docstring; for ``theta == 0`` only k = 0..c are returned (the
    geometric tail is handled by the callers)."""
    c, lam, mu, theta = _check(c, lam, mu, theta)
    logs = [0.0]
    for k in range(1, c + 1):
        logs.append(logs[-1] + math.log(lam) - math.log(k * mu))
    if theta == 0.0:
        return np.asarray(logs)
    running = _logsumexp(logs)
    k = c
    while True:
        r = lam / (c * mu + (k + 1 - c) * theta)
        if r < 1.0:
            tail_bound = logs[-1] + math.log(r) - math.log1p(-r)
            if tail_bound < running + math.log(_REL_TOL):
                break
        k += 1
        if k > _MAX_STATES:
            raise ValueError(
                f"M/M/c+M with c={c}, lam={lam}, mu={mu}, theta={theta} needs more than {_MAX_STATES} "
                "states; theta is too small for the load"
            )
        logs.append(logs[-1] + math.log(lam) - math.log(c * mu + (k - c) * theta))
        # keep the running sum exact enough: update in log space
        running = running + math.log1p(math.exp(logs[-1] - running))
    return np.asarray(logs)


def stationary_distribution(c: int, lam: float, mu: float, theta: float) -> np.ndarray:
    """P(N = k), k = 0..K, of the M/M/c+M queue (``theta > 0``; truncated as in the module docstring)."""
    c, lam, mu, theta = _check(c, lam, mu, theta)
    if theta == 0.0:
        raise ValueError("theta must be > 0 for a finite stationary vector; use erlang_c for theta = 0")
    logs = birth_death_log_weights(c, lam, mu, theta)
    p = np.exp(logs - _logsumexp(list(logs)))
    return p / p.sum()


def erlang_c(c: int, lam: float, mu: float) -> QueueMetrics:
    """M/M/c (Erlang-C): requires ``lam < c * mu``.

    With a = lam/mu and rho = a/c: w_k = a^k / k! for k <= c and w_k = w_c rho^(k-c) above, so
    p_wait = w_c / (1 - rho) / Z, mean_queue = p_wait * rho / (1 - rho), Z = sum_{k<c} w_k + w_c/(1-rho).
    """
    c, lam, mu, _ = _check(c, lam, mu, 0.0)
    if not lam < c * mu:
        raise ValueError(f"Erlang-C needs lam < c*mu (stability), got lam={lam}, c*mu={c * mu}")
    rho = lam / (c * mu)
    logs = list(birth_death_log_weights(c, lam, mu, 0.0))
    log_tail = logs[c] - math.log1p(-rho)  # sum_{k>=c} w_k
    log_z = _logsumexp(logs[:c] + [log_tail])
    p_wait = math.exp(log_tail - log_z)
    mean_queue = p_wait * rho / (1.0 - rho)
    mean_busy = lam / mu  # every customer is served
    return QueueMetrics(c=c, lam=lam, mu=mu, theta=0.0, p_wait=p_wait, mean_queue=mean_queue,
                        p_abandon=0.0, throughput=lam, mean_busy=mean_busy, mean_wait=mean_queue / lam)


def erlang_a(c: int, lam: float, mu: float, theta: float) -> QueueMetrics:
    """M/M/c+M (Erlang-A). ``theta == 0`` reduces to :func:`erlang_c` (and then requires lam < c*mu)."""
    c, lam, mu, theta = _check(c, lam, mu, theta)
    if theta == 0.0:
        return erlang_c(c, lam, mu)
    p = stationary_distribution(c, lam, mu, theta)
    k = np.arange(len(p))
    p_wait = float(p[c:].sum())
    mean_queue = float((p * np.maximum(k - c, 0)).sum())
    mean_busy = float((p * np.minimum(k, c)).sum())
    p_abandon = theta * mean_queue / lam
    return QueueMetrics(c=c, lam=lam, mu=mu, theta=theta, p_wait=p_wait, mean_queue=mean_queue,
                        p_abandon=p_abandon, throughput=lam * (1.0 - p_abandon), mean_busy=mean_busy,
                        mean_wait=mean_queue / lam)


__all__ = ["QueueMetrics", "birth_death_log_weights", "erlang_a", "erlang_c", "stationary_distribution"]
