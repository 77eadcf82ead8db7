"""SupLinUCB (Chu et al. 2011) and its MINUCB version with the min-width of §3.2, vectorised.

SupLinUCB's round is a data-dependent loop over at most S = ⌈log₂ T⌉ stages. It becomes fixed-shape:

* every stage s keeps its own Gram inverse over its index set Ψ^s (stacked: S x d x d, and the same for
  the pooled branch A_pool = λI + G₀ + Σ_{Ψ^s} x xᵀ);
* every round evaluates the centres and widths of all stages for all arms, an (S, K) array;
* the stage loop is a ``lax.scan`` over s carrying the active-arm mask Â_s, a done flag, the arm and
  the stage to update; the three cases (a) exploit, (b) eliminate, (c) explore are branch-free selects;
* the update adds x to stage s only: a rank-one update of every stage with x masked to s (a zero vector
  leaves a stage unchanged).

Per-arm widths follow §3.2: ŵ^s_a is the width of whichever branch has the smaller UCB ŷ + ŵ, and ŷ its
centre. α = c_β sqrt(½ ln(2TK/δ)) for both branches (the original's constant; the pooled branch has no
published constant, so it shares α), plus the certificate penalty ρ‖G₀ A_pool⁻¹ x‖_{M⁻¹} on the pooled
width. With ``use_pooled = False`` this is SupLinUCB.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._linalg import inv_logdet
from ._types import BoolScalar, Contexts, IntScalar, Matrix, Scalar, Vector
from .algorithms import argmax_tiebreak
from .env import OfflineStats, tiebreak_uniforms


class SupParams(eqx.Module):
    lam: Scalar
    alpha: Scalar  # c_β sqrt(½ ln(2TK/δ))
    threshold: Scalar  # 1/√T: below it, exploit without updating
    use_pooled: BoolScalar
    rho: Scalar
    Minv: Matrix


class SupState(eqx.Module):
    A: Float[Array, "S d d"]  # λI + Σ_{Ψ^s} x xᵀ (kept for the exact refresh)
    Ainv: Float[Array, "S d d"]
    b: Float[Array, "S d"]
    Pinv: Float[Array, "S d d"]  # (A_s + G₀)⁻¹
    c: Float[Array, "S d"]  # Zᵀy + Σ_{Ψ^s} r x
    G0: Matrix


class SupInfo(NamedTuple):
    """:class:`ActInfo` fields (the intervals are per stage here and are not reported: ±inf) and the
    stage whose index set receives the round (-1: none, case (a))."""

    pooled_used: BoolScalar
    ucb_on: Float[Array, " K"]
    lcb_on: Float[Array, " K"]
    ucb_pool: Float[Array, " K"]
    lcb_pool: Float[Array, " K"]
    stage: IntScalar


def num_stages(T: int) -> int:
    return max(1, math.ceil(math.log2(T)))


def sup_params(d: int, T: int, K: int, *, use_pooled: bool = False, rho: float = 0.0, Minv=None,
               lam: float = 1.0, delta: float = 0.05, c_beta: float = 1.0, dtype=jnp.float64) -> SupParams:
    """SupLinUCB (``use_pooled=False``) or its Ellipsoidal-MINUCB version with certificate (M⁻¹, ρ)."""
    for name, value in (("T", T), ("K", K), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid algorithm field '{name}': must be an integer >= 1, got {value!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"invalid algorithm field 'delta': must be in (0, 1), got {delta!r}")
    if not (isinstance(c_beta, (int, float)) and c_beta > 0):
        raise ValueError(f"invalid algorithm field 'c_beta': must be a number > 0, got {c_beta!r}")
    if not (isinstance(rho, (int, float)) and rho >= 0):
        raise ValueError(f"invalid algorithm field 'rho': must be a number >= 0, got {rho!r}")
    f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return SupParams(lam=f(lam), alpha=f(c_beta * math.sqrt(0.5 * math.log(2 * T * K / delta))),
                     threshold=f(1.0 / math.sqrt(T)), use_pooled=jnp.asarray(use_pooled), rho=f(rho),
                     Minv=jnp.eye(d, dtype=dtype) if Minv is None else jnp.asarray(Minv, dtype))


def init(params: SupParams, offline: OfflineStats, stages: int) -> SupState:
    d = offline.G0.shape[-1]
    dtype = offline.G0.dtype
    A = params.lam * jnp.eye(d, dtype=dtype)
    Ainv, _ = inv_logdet(A)
    Pinv, _ = inv_logdet(A + offline.G0)
    stack = lambda a: jnp.broadcast_to(a, (stages,) + a.shape)  # noqa: E731
    return SupState(A=stack(A), Ainv=stack(Ainv), b=jnp.zeros((stages, d), dtype), Pinv=stack(Pinv),
                    c=stack(offline.Zy), G0=offline.G0)


def stage_estimates(params: SupParams, state: SupState, contexts: Contexts):
    """Centres ŷ, widths ŵ (both (S, K)) and whether the pooled branch gave them."""
    def norms(inv):  # ||x||_{inv} for every stage and arm
        return jnp.sqrt(jnp.maximum(jnp.einsum("kd,sde,ke->sk", contexts, inv, contexts), 0.0))

    y_on = jnp.einsum("kd,sd->sk", contexts, jnp.einsum("sde,se->sd", state.Ainv, state.b))
    w_on = params.alpha * norms(state.Ainv)
    y_pool = jnp.einsum("kd,sd->sk", contexts, jnp.einsum("sde,se->sd", state.Pinv, state.c))
    g = jnp.einsum("kd,sde,ef->skf", contexts, state.Pinv, state.G0)  # rows G₀ A_pool⁻¹ x
    q = jnp.sqrt(jnp.maximum(jnp.einsum("skd,de,ske->sk", g, params.Minv, g), 0.0))
    w_pool = params.alpha * norms(state.Pinv) + jnp.where(q > 0, params.rho * q, 0.0)
    ucb_on, ucb_pool = y_on + w_on, jnp.where(params.use_pooled, y_pool + w_pool, jnp.inf)
    use_pool = ucb_pool < ucb_on
    return jnp.where(use_pool, y_pool, y_on), jnp.where(use_pool, w_pool, w_on), use_pool


def act(key: PRNGKeyArray, params: SupParams, state: SupState, contexts: Contexts):
    """One SupLinUCB round. Consumes ``key`` (tie-breaks, and the choice among the arms of case (c))."""
    K = contexts.shape[0]
    stages = state.b.shape[0]
    u = tiebreak_uniforms(key, K, contexts.dtype)
    yhat, what, use_pool = stage_estimates(params, state, contexts)
    ninf = jnp.asarray(-jnp.inf, contexts.dtype)

    def stage_step(carry, s):
        active, done, arm, stage, at = carry
        ucb, w = yhat[s] + what[s], what[s]
        level = 2.0 ** (-(s + 1.0))
        all_tiny = jnp.all(jnp.where(active, w <= params.threshold, True))
        all_small = jnp.all(jnp.where(active, w <= level, True))
        exploit = argmax_tiebreak(jnp.where(active, ucb, ninf), u)
        explore = jnp.argmax(jnp.where(active & (w > level), u, -1.0))
        top = jnp.max(jnp.where(active, ucb, ninf))
        case_a = ~done & all_tiny
        case_b = ~done & ~all_tiny & all_small
        case_c = ~done & ~all_tiny & ~all_small
        arm = jnp.where(case_a, exploit, jnp.where(case_c, explore, arm)).astype(jnp.int32)
        stage = jnp.where(case_c, s, stage)
        at = jnp.where(case_a | case_c, s, at)
        active = jnp.where(case_b, active & (ucb >= top - 2.0 * level), active)
        return (active, done | case_a | case_c, arm, stage, at), None

    zero = jnp.asarray(0, jnp.int32)
    carry = (jnp.ones((K,), bool), jnp.asarray(False), zero, zero - 1, zero)
    # Some stage always decides: at the last one, 2^{-S} <= 1/T <= 1/√T, so case (b) is impossible there.
    (_, _, arm, stage, at), _ = jax.lax.scan(stage_step, carry, jnp.arange(stages, dtype=jnp.int32))
    inf = jnp.full((K,), jnp.inf, contexts.dtype)
    info = SupInfo(pooled_used=use_pool[at, arm], ucb_on=inf, lcb_on=-inf, ucb_pool=inf, lcb_pool=-inf,
                   stage=stage)
    return arm, info


def update(params: SupParams, state: SupState, x: Vector, r: Scalar, stage: IntScalar) -> SupState:
    """Add (x, r) to the index set of ``stage`` (none if -1)."""
    del params
    mask = (jnp.arange(state.b.shape[0]) == stage).astype(x.dtype)
    xs = mask[:, None] * x[None, :]  # (S, d): zero rows leave their stage unchanged

    def sm(inv):
        ax = jnp.einsum("sde,se->sd", inv, xs)
        q = jnp.sum(ax * xs, axis=-1)
        return inv - jnp.einsum("sd,se->sde", ax, ax) / (1.0 + q)[:, None, None]

    return SupState(A=state.A + jnp.einsum("sd,se->sde", xs, xs), Ainv=sm(state.Ainv), b=state.b + r * xs,
                    Pinv=sm(state.Pinv), c=state.c + r * xs, G0=state.G0)


def refresh(params: SupParams, state: SupState) -> SupState:
    del params
    Ainv = jax.vmap(lambda a: inv_logdet(a)[0])(state.A)
    Pinv = jax.vmap(lambda a: inv_logdet(a + state.G0)[0])(state.A)
    return eqx.tree_at(lambda s: (s.Ainv, s.Pinv), state, (Ainv, Pinv))

