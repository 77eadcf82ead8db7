"""OFUL, naive warm start, scalar-shift MINUCB and Ellipsoidal-MINUCB as one parametrised algorithm.

Every algorithm of BANDITS.md §3.1, §3.3 and §4 is the same two-branch rule with different parameters:

=========================  ==========  ==========  ==========================================
algorithm                  online      pooled      certificate (M^{-1}, ρ)
=========================  ==========  ==========  ==========================================
OFUL / LinUCB              yes         no          --
naive warm start           no          yes         ρ = 0 (offline data taken as unbiased)
pooled only                no          yes         the oracle certificate (for claim A6)
scalar-shift MINUCB        yes         yes         M = I, ρ = V
Ellipsoidal-MINUCB         yes         yes         the known certificate (M, ρ)
learned-certificate        yes         yes (≥ τ₁)  (M̂_j, ρ̂_j = 1), refreshed at τ₁·2^{j-1}
=========================  ==========  ==========  ==========================================

so a stack of :class:`MinUCBParams` is vmapped in one compiled program, and two algorithms run on the same
key see the same contexts, noise and tie-break uniforms (common random numbers).

The functions follow optax's pattern: ``init(params, offline) -> state``, ``act(key, params, state,
contexts) -> (arm, info)``, ``update(params, state, x, r) -> state`` and ``refresh(params, state) ->
state`` (the periodic exact recomputation of the Gram inverses, called by the rollout every
``record_every`` rounds). :func:`make_algorithm` closes them over the params into a
:class:`BanditAlgorithm` triple.

Conventions. ``delta`` is the confidence level of *each* branch (the joint level of the min-rule is
2δ by the union bound of §2.4; pass δ/2 for a joint δ). ``c_beta`` multiplies every statistical radius
(β^on, β^pool and, for the learned certificate, β_off and β^on in e_j); it does not multiply the
certificate penalty ρ||G_0 W^{-1}x||_{M^{-1}}, which is not a statistical radius.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._linalg import inv_logdet, quad_norms, rank_one_update, symmetric_eigh
from ._types import ArmVector, BoolScalar, Contexts, IntScalar, Matrix, Scalar, Vector
from .env import OfflineStats, tiebreak_uniforms

PENALTY_FORMS = ("ellipsoid", "box")


class MinUCBParams(eqx.Module):
    """Dynamic parameters of one algorithm (all arrays, so a stack of them is vmapped)."""

    lam: Scalar  # ridge λ of the online and pooled estimators
    delta: Scalar  # confidence level of each branch
    sigma: Scalar  # sub-Gaussian noise level
    S: Scalar  # bound on ||θ||
    c_beta: Scalar  # radius scale, applied to every statistical radius
    use_online: BoolScalar
    use_pooled: BoolScalar
    rho: Scalar  # certificate radius (inf: the pooled branch never wins where G_0 W^{-1} x != 0)
    Minv: Matrix  # certificate M^{-1}
    learned: BoolScalar  # epoch-wise learned certificate (§3.3) instead of (Minv, rho)
    box: BoolScalar  # learned certificate: box penalty Σ_k |<u_k, G_0 W^{-1} x>| c_k instead of M̂
    tau1: IntScalar  # first refresh time; later ones double
    delta_cert: Scalar  # δ_j = δ / (2J) used at each refresh
    lam0: Scalar  # ridge of the offline estimator (learned certificate)
    S_off: Scalar  # bound on ||θ_off|| (learned certificate)


class MinUCBState(eqx.Module):
    """The scan carry of one algorithm on one replica."""

    # dynamics: online branch (V = λI + Σ x xᵀ, b = Σ r x) and pooled branch (W = V + G_0, c = Zᵀy + b)
    V: Matrix
    Vinv: Matrix
    logdetV: Scalar
    b: Vector
    Winv: Matrix
    logdetW: Scalar
    c: Vector
    # the certificate in force (refreshed by the learned variant)
    Minv: Matrix
    rho: Scalar
    cert_c: Vector  # per-direction budgets c_k (learned variant)
    pooled_active: BoolScalar
    # constants of the offline data
    G0: Matrix
    basis: Matrix  # eigenvectors of G_0, the directions in which the certificate is learned
    theta_off_hat: Vector
    e_off: Vector  # β_off ||u_k||_{V_off^{-1}}
    # counters
    n: IntScalar  # online samples so far
    next_refresh: IntScalar  # next certificate refresh (-1: never)


class ActInfo(NamedTuple):
    """Per-arm confidence intervals of both branches (±inf where a branch is off) and the branch used."""

    pooled_used: BoolScalar  # the chosen arm's min-UCB was attained by the pooled branch
    ucb_on: ArmVector
    lcb_on: ArmVector
    ucb_pool: ArmVector
    lcb_pool: ArmVector


class BanditAlgorithm(NamedTuple):
    """An algorithm closed over its parameters (optax's ``GradientTransformation`` pattern)."""

    init: Callable[[OfflineStats], MinUCBState]
    act: Callable[[PRNGKeyArray, MinUCBState, Contexts], tuple[IntScalar, ActInfo]]
    update: Callable[[MinUCBState, Vector, Scalar], MinUCBState]
    refresh: Callable[[MinUCBState], MinUCBState]


# ----------------------------------------------------------------------------------------------------
# Radii


def confidence_radius(params: MinUCBParams, logdet: Scalar, delta: Scalar, lam: Scalar, S: Scalar, d: int):
    """c_β (σ sqrt(2 log(1/δ) + log(det A / λ^d)) + √λ S), the self-normalised radius of Abbasi-Yadkori
    et al. (2011), with the log-det kept incrementally by the caller."""
    info = jnp.maximum(logdet - d * jnp.log(lam), 0.0)
    return params.c_beta * (params.sigma * jnp.sqrt(2.0 * jnp.log(1.0 / delta) + info) + jnp.sqrt(lam) * S)


def argmax_tiebreak(values: ArmVector, uniforms: ArmVector) -> IntScalar:
    """argmax with ties broken at random: among the arms within a few ulps of the maximum, the one with
    the largest uniform. Ties are structural, e.g. OFUL's first round, where every UCB is β ||x|| = β."""
    top = jnp.max(values)
    tol = 100.0 * jnp.finfo(values.dtype).eps * jnp.maximum(1.0, jnp.abs(top))
    return jnp.argmax(jnp.where(values >= top - tol, uniforms, -1.0))


# ----------------------------------------------------------------------------------------------------
# init / act / update / refresh


def init(params: MinUCBParams, offline: OfflineStats) -> MinUCBState:
    G0 = offline.G0
    d = G0.shape[-1]
    dtype = G0.dtype
    eye = jnp.eye(d, dtype=dtype)
    V = params.lam * eye
    # Both inverses go through the same Cholesky path, so with G_0 = 0 the branches coincide bitwise.
    Vinv, logdetV = inv_logdet(V)
    Winv, logdetW = inv_logdet(V + G0)

    # Offline ridge, used only by the learned certificate.
    Voff_inv, logdet_off = inv_logdet(params.lam0 * eye + G0)
    theta_off_hat = Voff_inv @ offline.Zy
    beta_off = confidence_radius(params, logdet_off, params.delta_cert, params.lam0, params.S_off, d)
    _, basis = symmetric_eigh(G0)
    e_off = beta_off * quad_norms(basis.T, Voff_inv)

    return MinUCBState(
        V=V, Vinv=Vinv, logdetV=logdetV, b=jnp.zeros(d, dtype), Winv=Winv, logdetW=logdetW, c=offline.Zy,
        Minv=params.Minv, rho=params.rho, cert_c=jnp.full((d,), jnp.inf, dtype),
        pooled_active=params.use_pooled & ~params.learned,
        G0=G0, basis=basis, theta_off_hat=theta_off_hat, e_off=e_off,
        n=jnp.asarray(0, jnp.int32), next_refresh=jnp.where(params.learned, params.tau1, -1).astype(jnp.int32),
    )


def shift_penalty(params: MinUCBParams, state: MinUCBState, g: Contexts) -> ArmVector:
    """Certificate-weighted shift penalty b_t(x) for rows ``g = G_0 W^{-1} x``."""
    q = quad_norms(g, state.Minv)
    # Guard ρ = inf times q = 0 (no offline data in that direction imports no bias).
    ell = jnp.where(q > 0, state.rho * q, 0.0)
    box = jnp.abs(g @ state.basis) @ jnp.where(jnp.isfinite(state.cert_c), state.cert_c, 0.0)
    return jnp.where(params.learned & params.box, box, ell)


def act(key: PRNGKeyArray, params: MinUCBParams, state: MinUCBState, contexts: Contexts):
    """Choose an arm: argmax_a min(U^on_a, U^pool_a). Consumes ``key`` (the tie-break)."""
    K, d = contexts.shape
    dtype = contexts.dtype
    u = tiebreak_uniforms(key, K, dtype)

    centre_on = contexts @ (state.Vinv @ state.b)
    beta_on = confidence_radius(params, state.logdetV, params.delta, params.lam, params.S, d)
    width_on = beta_on * quad_norms(contexts, state.Vinv)

    wx = contexts @ state.Winv  # rows W^{-1} x (W symmetric)
    centre_pool = contexts @ (state.Winv @ state.c)
    beta_pool = confidence_radius(params, state.logdetW, params.delta, params.lam, params.S, d)
    width_pool = beta_pool * jnp.sqrt(jnp.maximum(jnp.sum(wx * contexts, axis=-1), 0.0))
    width_pool = width_pool + shift_penalty(params, state, wx @ state.G0)

    inf = jnp.asarray(jnp.inf, dtype)
    pooled_on = params.use_pooled & state.pooled_active
    ucb_on = jnp.where(params.use_online, centre_on + width_on, inf)
    lcb_on = jnp.where(params.use_online, centre_on - width_on, -inf)
    ucb_pool = jnp.where(pooled_on, centre_pool + width_pool, inf)
    lcb_pool = jnp.where(pooled_on, centre_pool - width_pool, -inf)
    arm = argmax_tiebreak(jnp.minimum(ucb_on, ucb_pool), u)
    info = ActInfo(pooled_used=ucb_pool[arm] < ucb_on[arm], ucb_on=ucb_on, lcb_on=lcb_on,
                   ucb_pool=ucb_pool, lcb_pool=lcb_pool)
    return arm, info


def update(params: MinUCBParams, state: MinUCBState, x: Vector, r: Scalar) -> MinUCBState:
    """Add the sample (x, r) to both branches; refresh the learned certificate at its refresh times."""
    d = x.shape[-1]
    Vinv, logdetV = rank_one_update(state.Vinv, state.logdetV, x)
    Winv, logdetW = rank_one_update(state.Winv, state.logdetW, x)
    V = state.V + jnp.outer(x, x)
    b = state.b + r * x
    c = state.c + r * x
    n = state.n + 1

    # Learned certificate (§3.3): cheap (O(d³)), so it is computed every round and selected, which
    # avoids a cond that vmap would turn into both branches anyway.
    refresh_now = params.learned & (n == state.next_refresh)
    theta_hat = Vinv @ b
    beta_on = confidence_radius(params, logdetV, params.delta_cert, params.lam, params.S, d)
    e_on = beta_on * quad_norms(state.basis.T, Vinv)
    cert_c = jnp.abs(state.basis.T @ (state.theta_off_hat - theta_hat)) + state.e_off + e_on
    # M̂ = (1/d) Σ c_k^{-2} u_k u_kᵀ, ρ̂ = 1: Δᵀ M̂ Δ = (1/d) Σ (<u_k,Δ>/c_k)² <= 1 when each |<u_k,Δ>| <= c_k.
    Minv_hat = d * (state.basis * (cert_c**2)[None, :]) @ state.basis.T
    return MinUCBState(
        V=V, Vinv=Vinv, logdetV=logdetV, b=b, Winv=Winv, logdetW=logdetW, c=c,
        Minv=jnp.where(refresh_now, Minv_hat, state.Minv),
        rho=jnp.where(refresh_now, jnp.ones_like(state.rho), state.rho),
        cert_c=jnp.where(refresh_now, cert_c, state.cert_c),
        pooled_active=state.pooled_active | (refresh_now & params.use_pooled),
        G0=state.G0, basis=state.basis, theta_off_hat=state.theta_off_hat, e_off=state.e_off,
        n=n, next_refresh=jnp.where(refresh_now, 2 * state.next_refresh, state.next_refresh),
    )


def refresh(params: MinUCBParams, state: MinUCBState) -> MinUCBState:
    """Recompute V^{-1}, W^{-1} and their log-dets exactly from V, discarding rank-one rounding error."""
    del params
    Vinv, logdetV = inv_logdet(state.V)
    Winv, logdetW = inv_logdet(state.V + state.G0)
    return eqx.tree_at(lambda s: (s.Vinv, s.logdetV, s.Winv, s.logdetW), state, (Vinv, logdetV, Winv, logdetW))


def make_algorithm(params: MinUCBParams) -> BanditAlgorithm:
    return BanditAlgorithm(
        init=lambda offline: init(params, offline),
        act=lambda key, state, contexts: act(key, params, state, contexts),
        update=lambda state, x, r: update(params, state, x, r),
        refresh=lambda state: refresh(params, state),
    )


# ----------------------------------------------------------------------------------------------------
# Constructors


def num_refreshes(T: int, tau1: int) -> int:
    """J = #{j >= 1 : τ₁ 2^{j-1} <= T} (at least 1, so δ/(2J) is defined)."""
    return max(1, int(math.floor(math.log2(T / tau1))) + 1) if T >= tau1 else 1


def _check_positive(name, value, allow_zero=False, allow_inf=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (allow_inf or math.isfinite(value))
    if not ok:
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"invalid algorithm field '{name}': must be a {'' if allow_inf else 'finite '}number "
                         f"{rel}, got {value!r}")


def minucb_params(d: int, *, use_online: bool = True, use_pooled: bool = True, rho: float = 0.0,
                  Minv=None, learned: bool = False, penalty: str = "ellipsoid", tau1: int = 100,
                  T: int | None = None, lam: float = 1.0, delta: float = 0.05, sigma: float = 0.5,
                  S: float = 1.0, c_beta: float = 1.0, lam0: float | None = None, S_off: float = 2.0,
                  dtype=jnp.float64) -> MinUCBParams:
    """General constructor; the named constructors below are the intended entry points."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"invalid algorithm field 'd': must be an integer >= 1, got {d!r}")
    if not (use_online or use_pooled):
        raise ValueError("invalid algorithm fields 'use_online'/'use_pooled': at least one branch must be on")
    if penalty not in PENALTY_FORMS:
        raise ValueError(f"invalid algorithm field 'penalty': allowed values are {', '.join(PENALTY_FORMS)}, "
                         f"got {penalty!r}")
    if learned and not use_online:
        raise ValueError("invalid algorithm field 'use_online': the learned certificate needs the online "
                         "branch (it is the only branch before τ₁)")
    for name, value in (("lam", lam), ("sigma", sigma), ("S_off", S_off), ("c_beta", c_beta)):
        _check_positive(name, value)
    _check_positive("S", S, allow_zero=True)
    _check_positive("rho", rho, allow_zero=True, allow_inf=True)
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"invalid algorithm field 'delta': must be in (0, 1), got {delta!r}")
    if isinstance(tau1, bool) or not isinstance(tau1, int) or tau1 < 1:
        raise ValueError(f"invalid algorithm field 'tau1': must be an integer >= 1, got {tau1!r}")
    lam0 = lam if lam0 is None else lam0
    _check_positive("lam0", lam0)
    if learned and T is None:
        raise ValueError("invalid algorithm field 'T': the learned certificate needs the horizon T "
                         "(δ_j = δ/(2J) with J the number of refreshes up to T)")
    J = num_refreshes(T, tau1) if learned else 1
    Minv = jnp.eye(d, dtype=dtype) if Minv is None else jnp.asarray(Minv, dtype)
    if Minv.shape != (d, d):
        raise ValueError(f"invalid algorithm field 'Minv': must have shape ({d}, {d}), got {Minv.shape}")
    f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return MinUCBParams(
        lam=f(lam), delta=f(delta), sigma=f(sigma), S=f(S), c_beta=f(c_beta),
        use_online=jnp.asarray(use_online), use_pooled=jnp.asarray(use_pooled), rho=f(rho), Minv=Minv,
        learned=jnp.asarray(learned), box=jnp.asarray(penalty == "box"), tau1=jnp.asarray(tau1, jnp.int32),
        delta_cert=f(delta / (2 * J)), lam0=f(lam0), S_off=f(S_off),
    )


def oful(d: int, **kw) -> MinUCBParams:
    """OFUL/LinUCB: the online branch alone (§2.1)."""
    return minucb_params(d, use_online=True, use_pooled=False, **kw)


def naive_warm_start(d: int, **kw) -> MinUCBParams:
    """Pooled ridge with ρ = 0 and no online branch: the offline data treated as unbiased (§4)."""
    return minucb_params(d, use_online=False, use_pooled=True, rho=0.0, **kw)


def pooled_only(Minv, rho: float, **kw) -> MinUCBParams:
    """The pooled branch alone with the certificate penalty (the comparison of claim A6)."""
    Minv = jnp.asarray(Minv)
    return minucb_params(Minv.shape[-1], use_online=False, use_pooled=True, rho=rho, Minv=Minv, **kw)


def scalar_minucb(d: int, V: float, **kw) -> MinUCBParams:
    """MINUCB with the Euclidean certificate ||θ_off - θ||_2 <= V (M = I, ρ = V)."""
    return minucb_params(d, rho=V, Minv=None, **kw)


def ellipsoidal_minucb(Minv, rho: float, **kw) -> MinUCBParams:
    """Ellipsoidal-MINUCB with a known certificate ||θ_off - θ||_M <= ρ, given as M^{-1} (§3.1)."""
    Minv = jnp.asarray(Minv)
    return minucb_params(Minv.shape[-1], rho=rho, Minv=Minv, **kw)


def learned_minucb(d: int, T: int, *, tau1: int = 100, penalty: str = "ellipsoid", **kw) -> MinUCBParams:
    """Ellipsoidal-MINUCB with the epoch-wise learned certificate (§3.3): online only before τ₁, then the
    certificate (M̂_j, 1) (or the box form, ``penalty="box"``) recomputed at τ₁·2^{j-1}."""
    return minucb_params(d, learned=True, tau1=tau1, penalty=penalty, T=T, **kw)


def certificate_inverse(M, mu_min: float = 1e-8):
    """M^{-1} of a symmetric PSD certificate matrix, with its eigenvalues clipped at ``mu_min`` (§1)."""
    evals, evecs = symmetric_eigh(jnp.asarray(M))
    return (evecs / jnp.maximum(evals, mu_min)[None, :]) @ evecs.T


__all__ = [
    "ActInfo", "BanditAlgorithm", "MinUCBParams", "MinUCBState", "act", "argmax_tiebreak",
    "certificate_inverse", "confidence_radius", "ellipsoidal_minucb", "init", "learned_minucb",
    "make_algorithm", "minucb_params", "naive_warm_start", "num_refreshes", "oful", "pooled_only", "refresh",
    "scalar_minucb", "shift_penalty", "update",
]

