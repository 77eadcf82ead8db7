"""A plain per-round NumPy implementation of the same algorithms, for testing the vectorised code.

Written from BANDITS.md directly, without the tricks of the JAX code: every round it re-solves the ridge
systems with ``np.linalg.solve``, takes log-determinants with ``np.linalg.slogdet`` and forms the
certificate penalty from its definition. It is driven by a pre-drawn stream (contexts, noise, tie-break
uniforms; see :func:`jaxq.bandits.env.sample_stream`), so on the same stream it must take the same actions
as :func:`jaxq.bandits.rollout.rollout_actions`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass
class RefAlgorithm:
    use_online: bool = True
    use_pooled: bool = True
    rho: float = 0.0
    Minv: np.ndarray | None = None  # None: identity
    learned: bool = False
    box: bool = False
    tau1: int = 100
    delta_cert: float = 0.05
    lam: float = 1.0
    delta: float = 0.05
    sigma: float = 0.5
    S: float = 1.0
    c_beta: float = 1.0
    lam0: float = 1.0
    S_off: float = 2.0

    @classmethod
    def from_params(cls, params) -> "RefAlgorithm":
        """Read the fields of a (single, unbatched) :class:`MinUCBParams`."""
        g = lambda v: np.asarray(v).item()  # noqa: E731
        return cls(use_online=bool(g(params.use_online)), use_pooled=bool(g(params.use_pooled)),
                   rho=float(g(params.rho)), Minv=np.asarray(params.Minv, np.float64), learned=bool(g(params.learned)),
                   box=bool(g(params.box)), tau1=int(g(params.tau1)), delta_cert=float(g(params.delta_cert)),
                   lam=float(g(params.lam)), delta=float(g(params.delta)), sigma=float(g(params.sigma)),
                   S=float(g(params.S)), c_beta=float(g(params.c_beta)), lam0=float(g(params.lam0)),
                   S_off=float(g(params.S_off)))


def _radius(alg: RefAlgorithm, A: np.ndarray, lam: float, S: float, delta: float) -> float:
    d = A.shape[0]
    _, logdet = np.linalg.slogdet(A)
    info = max(logdet - d * math.log(lam), 0.0)
    return alg.c_beta * (alg.sigma * math.sqrt(2 * math.log(1 / delta) + info) + math.sqrt(lam) * S)


def _norm(x: np.ndarray, A: np.ndarray) -> float:
    """||x||_{A^{-1}} by a linear solve."""
    return math.sqrt(max(float(x @ np.linalg.solve(A, x)), 0.0))


class RefTrace(NamedTuple):
    arms: np.ndarray  # (T,)
    pooled_used: np.ndarray  # (T,)
    regrets: np.ndarray  # (T,)
    ucb_on: np.ndarray  # (T, K), inf where the branch is off
    ucb_pool: np.ndarray  # (T, K)
    cert_c: np.ndarray | None  # the last learned per-direction budgets (learned variant)


def run_reference(alg: RefAlgorithm, theta, G0, Zy, contexts, noise, tiebreak) -> RefTrace:
    """Play ``alg`` on the stream, one round at a time."""
    theta, G0, Zy = (np.asarray(a, np.float64) for a in (theta, G0, Zy))
    contexts, noise, tiebreak = (np.asarray(a, np.float64) for a in (contexts, noise, tiebreak))
    T, K, d = contexts.shape
    eye = np.eye(d)
    Minv = eye if alg.Minv is None else np.asarray(alg.Minv, np.float64)
    rho = alg.rho
    pooled_active = alg.use_pooled and not alg.learned
    cert_c = None

    # Offline quantities for the learned certificate.
    if alg.learned:
        V_off = alg.lam0 * eye + G0
        theta_off_hat = np.linalg.solve(V_off, Zy)
        beta_off = _radius(alg, V_off, alg.lam0, alg.S_off, alg.delta_cert)
        _, basis = np.linalg.eigh(G0)
        e_off = np.array([beta_off * _norm(basis[:, k], V_off) for k in range(d)])
        next_refresh = alg.tau1

    V = alg.lam * eye  # λI + Σ x xᵀ, accumulated sample by sample
    b = np.zeros(d)
    arms = np.zeros(T, np.int64)
    pooled_used = np.zeros(T, bool)
    regrets = np.zeros(T)
    ucb_on_all = np.zeros((T, K))
    ucb_pool_all = np.zeros((T, K))
    for t in range(T):
        W = V + G0
        c = Zy + b
        theta_hat = np.linalg.solve(V, b)
        theta_til = np.linalg.solve(W, c)
        beta_on = _radius(alg, V, alg.lam, alg.S, alg.delta)
        beta_pool = _radius(alg, W, alg.lam, alg.S, alg.delta)
        ucb_on = np.full(K, np.inf)
        ucb_pool = np.full(K, np.inf)
        for a in range(K):
            x = contexts[t, a]
            if alg.use_online:
                ucb_on[a] = x @ theta_hat + beta_on * _norm(x, V)
            if pooled_active:
                g = G0 @ np.linalg.solve(W, x)
                if alg.learned and alg.box:
                    penalty = sum(abs(basis[:, k] @ g) * cert_c[k] for k in range(d))
                else:
                    q = math.sqrt(max(float(g @ Minv @ g), 0.0))
                    penalty = rho * q if q > 0 else 0.0
                ucb_pool[a] = x @ theta_til + beta_pool * _norm(x, W) + penalty
        ucb_on_all[t], ucb_pool_all[t] = ucb_on, ucb_pool
        ucb = np.minimum(ucb_on, ucb_pool)
        top = ucb.max()
        tol = 100 * np.finfo(np.float64).eps * max(1.0, abs(top))
        candidates = np.flatnonzero(ucb >= top - tol)
        arm = int(candidates[np.argmax(tiebreak[t, candidates])])
        arms[t] = arm
        pooled_used[t] = ucb_pool[arm] < ucb_on[arm]
        means = contexts[t] @ theta
        regrets[t] = means.max() - means[arm]
        x = contexts[t, arm]
        V = V + np.outer(x, x)
        b = b + (means[arm] + noise[t]) * x

        if alg.learned and t + 1 == next_refresh:
            theta_hat = np.linalg.solve(V, b)
            beta = _radius(alg, V, alg.lam, alg.S, alg.delta_cert)
            delta_hat = theta_off_hat - theta_hat
            cert_c = np.array([abs(basis[:, k] @ delta_hat) + e_off[k] + beta * _norm(basis[:, k], V)
                               for k in range(d)])
            # ||Δ||_{M̂} <= 1 with M̂ = (1/d) Σ c_k^{-2} u_k u_kᵀ, so M̂^{-1} = d Σ c_k² u_k u_kᵀ.
            Minv = d * sum(cert_c[k] ** 2 * np.outer(basis[:, k], basis[:, k]) for k in range(d))
            rho = 1.0
            pooled_active = alg.use_pooled
            next_refresh *= 2
    return RefTrace(arms, pooled_used, regrets, ucb_on_all, ucb_pool_all, cert_c)


@dataclasses.dataclass
class RefSup:
    """SupLinUCB / its MINUCB version (§3.2), as in :mod:`jaxq.bandits.suplinucb`."""

    alpha: float
    threshold: float
    use_pooled: bool = False
    rho: float = 0.0
    Minv: np.ndarray | None = None
    lam: float = 1.0

    @classmethod
    def from_params(cls, params) -> "RefSup":
        g = lambda v: np.asarray(v).item()  # noqa: E731
        return cls(alpha=float(g(params.alpha)), threshold=float(g(params.threshold)),
                   use_pooled=bool(g(params.use_pooled)), rho=float(g(params.rho)),
                   Minv=np.asarray(params.Minv, np.float64), lam=float(g(params.lam)))


def run_reference_sup(alg: RefSup, stages: int, theta, G0, Zy, contexts, noise, tiebreak):
    """Returns (arms, stages updated (-1: none), regrets), one entry per round."""
    theta, G0, Zy = (np.asarray(a, np.float64) for a in (theta, G0, Zy))
    contexts, noise, tiebreak = (np.asarray(a, np.float64) for a in (contexts, noise, tiebreak))
    T, K, d = contexts.shape
    Minv = np.eye(d) if alg.Minv is None else alg.Minv
    A = [alg.lam * np.eye(d) for _ in range(stages)]
    b = [np.zeros(d) for _ in range(stages)]
    arms, upd, regrets = np.zeros(T, np.int64), np.zeros(T, np.int64), np.zeros(T)
    for t in range(T):
        X = contexts[t]
        active = list(range(K))
        arm, stage = None, -1
        for s in range(stages):
            yhat, what = {}, {}
            for a in active:
                x = X[a]
                y_on = x @ np.linalg.solve(A[s], b[s])
                w_on = alg.alpha * math.sqrt(max(x @ np.linalg.solve(A[s], x), 0.0))
                yhat[a], what[a] = y_on, w_on
                if alg.use_pooled:
                    P = A[s] + G0
                    y_p = x @ np.linalg.solve(P, Zy + b[s])
                    g = G0 @ np.linalg.solve(P, x)
                    q = math.sqrt(max(g @ Minv @ g, 0.0))
                    w_p = alg.alpha * math.sqrt(max(x @ np.linalg.solve(P, x), 0.0)) + (alg.rho * q if q > 0 else 0.0)
                    if y_p + w_p < y_on + w_on:
                        yhat[a], what[a] = y_p, w_p
            level = 2.0 ** (-(s + 1))
            ucb = {a: yhat[a] + what[a] for a in active}
            if all(what[a] <= alg.threshold for a in active):  # (a) exploit, no update
                top = max(ucb.values())
                tol = 100 * np.finfo(np.float64).eps * max(1.0, abs(top))
                tied = [a for a in active if ucb[a] >= top - tol]
                arm = max(tied, key=lambda a: tiebreak[t, a])
                break
            if all(what[a] <= level for a in active):  # (b) eliminate, next stage
                top = max(ucb.values())
                active = [a for a in active if ucb[a] >= top - 2 * level]
                continue
            wide = [a for a in active if what[a] > level]  # (c) explore, add t to Ψ^s
            arm = max(wide, key=lambda a: tiebreak[t, a])
            stage = s
            break
        x = X[arm]
        means = X @ theta
        regrets[t] = means.max() - means[arm]
        arms[t], upd[t] = arm, stage
        if stage >= 0:
            A[stage] = A[stage] + np.outer(x, x)
            b[stage] = b[stage] + (means[arm] + noise[t]) * x
    return arms, upd, regrets
