"""The environment: a linear contextual bandit with K arms per round and biased offline regression data.

Three kinds of object (see STYLE.md):

* :class:`BanditSpec` (static, hashable): the dimensions that fix array shapes.
* :class:`EnvParams` (arrays, vmappable): noise level, shift geometry, certificate profile, ``n0``.
  ``n0`` is dynamic: offline data are drawn for ``spec.n0_max`` rows and masked, so a sweep over the
  offline sample size does not recompile.
* :class:`Problem` (arrays): one drawn instance (θ, θ_off, the basis, the offline sufficient statistics
  and the oracle certificate). It is the same for every algorithm run on a seed.

Generation follows BANDITS.md §5.2: θ uniform on the sphere, a random orthonormal basis ``U`` whose
first ``covered`` columns span the offline-covered subspace S, offline covariates in S (plus an optional
leakage into S^⊥), and online contexts ``x ∝ U_S a + w U_⊥ b`` normalised to the unit sphere.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._linalg import orthonormalise
from ._types import Contexts, Matrix, Scalar, Vector

SHIFT_KINDS = ("uncovered", "covered", "single_uncovered")


@dataclasses.dataclass(frozen=True)
class BanditSpec:
    """Shape constants. Changing any of them recompiles."""

    d: int = 10
    K: int = 20
    covered: int = 5
    n0_max: int = 2000

    def __post_init__(self):
        for name in ("d", "K", "covered"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid bandit spec field '{name}': must be an integer >= 1, got {value!r}")
        if self.covered >= self.d:
            raise ValueError(f"invalid bandit spec field 'covered': must be in 1..d-1 = 1..{self.d - 1}, "
                             f"got {self.covered!r}")
        if isinstance(self.n0_max, bool) or not isinstance(self.n0_max, int) or self.n0_max < 0:
            raise ValueError(f"invalid bandit spec field 'n0_max': must be an integer >= 0, got {self.n0_max!r}")


class EnvParams(eqx.Module):
    """Dynamic environment parameters. A sweep is a ``vmap`` over a stack of these."""

    n0: Array  # int: offline sample size, <= spec.n0_max
    sigma: Array  # noise standard deviation, online and offline
    shift_kind: Array  # int: index into SHIFT_KINDS
    shift_norm: Array  # ||Δ||_2 of the main shift component
    shift_leak: Array  # norm of the small component of Δ in the other subspace
    context_uncovered_scale: Array  # w in x ∝ U_S a + w U_⊥ b (1 = isotropic contexts)
    offline_leakage: Array  # ε in z = U_S a + ε U_⊥ b (0 = no offline coverage of S^⊥)
    mu_covered: Array  # oracle certificate eigenvalue on S
    mu_uncovered: Array  # oracle certificate eigenvalue on S^⊥

    @classmethod
    def make(cls, *, n0=2000, sigma=0.5, shift_kind="uncovered", shift_norm=0.5, shift_leak=0.01,
             context_uncovered_scale=0.3, offline_leakage=0.0, mu_covered=100.0, mu_uncovered=1.0,
             dtype=jnp.float64) -> "EnvParams":
        """Validated constructor from Python values (raises ``ValueError`` naming the field)."""
        if shift_kind not in SHIFT_KINDS:
            raise ValueError(f"invalid env field 'shift_kind': allowed values are {', '.join(SHIFT_KINDS)}, "
                             f"got {shift_kind!r}")
        if isinstance(n0, bool) or not isinstance(n0, int) or n0 < 0:
            raise ValueError(f"invalid env field 'n0': must be an integer >= 0, got {n0!r}")
        checks = {"sigma": (sigma, 0.0, False), "shift_norm": (shift_norm, 0.0, True),
                  "shift_leak": (shift_leak, 0.0, True),
                  "context_uncovered_scale": (context_uncovered_scale, 0.0, True),
                  "offline_leakage": (offline_leakage, 0.0, True), "mu_covered": (mu_covered, 0.0, False),
                  "mu_uncovered": (mu_uncovered, 0.0, False)}
        for name, (value, low, inclusive) in checks.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= low if inclusive else value > low)
            if not ok:
                rel = ">=" if inclusive else ">"
                raise ValueError(f"invalid env field '{name}': must be a number {rel} {low}, got {value!r}")
        f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
        return cls(n0=jnp.asarray(n0, jnp.int32), sigma=f(sigma),
                   shift_kind=jnp.asarray(SHIFT_KINDS.index(shift_kind), jnp.int32), shift_norm=f(shift_norm),
                   shift_leak=f(shift_leak), context_uncovered_scale=f(context_uncovered_scale),
                   offline_leakage=f(offline_leakage), mu_covered=f(mu_covered), mu_uncovered=f(mu_uncovered))


class OfflineStats(eqx.Module):
    """Sufficient statistics of the offline regression data D_0 = {(z_i, y_i)}: G_0 = ZᵀZ and Zᵀy."""

    G0: Matrix
    Zy: Vector


class Problem(eqx.Module):
    """One drawn instance. ``cert_Minv``/``cert_rho`` are the oracle certificate: M = U diag(μ) Uᵀ, ρ = ||Δ||_M."""

    theta: Vector
    theta_off: Vector
    basis: Matrix  # U; columns [:covered] span S
    offline: OfflineStats
    cert_Minv: Matrix
    cert_rho: Scalar  # ||Δ||_M for the oracle M
    shift_l2: Scalar  # ||Δ||_2, the tight scalar (M = I) certificate
    sigma: Scalar
    context_scales: Vector  # per basis direction: 1 on S, w on S^⊥


class RoundDraw(NamedTuple):
    contexts: Contexts
    noise: Scalar  # η_t: one draw per round, shared by whichever arm is played (common random numbers)
    tie_key: PRNGKeyArray  # consumed by the algorithm's tie-break


def _unit(v, eps):
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


def make_problem(key: PRNGKeyArray, spec: BanditSpec, params: EnvParams) -> Problem:
    """Draw θ, the basis, the shift Δ and the offline data. Consumes ``key``."""
    d, k = spec.d, spec.covered
    dtype = params.sigma.dtype
    # Two normal draws in all (compiling each jax.random.normal call site costs about a second on CPU):
    # the problem's geometry, then the offline data, so θ and U do not depend on n0_max.
    k_geometry, k_offline = jax.random.split(key)
    eps = jnp.finfo(dtype).tiny
    g = jax.random.normal(k_geometry, (d * d + 2 * d,), dtype)
    theta = _unit(g[:d], eps)
    basis = orthonormalise(g[d:d + d * d].reshape(d, d))  # Haar-distributed
    v_shift = g[d + d * d:]
    off = jax.random.normal(k_offline, (spec.n0_max, d + 1), dtype)

    in_s = jnp.arange(d) < k
    v = basis.T @ v_shift  # coordinates in the basis U
    dir_s = basis @ _unit(jnp.where(in_s, v, 0.0), eps)
    dir_perp = basis @ _unit(jnp.where(in_s, 0.0, v), eps)
    first_perp = basis[:, k]
    main = jnp.select([params.shift_kind == 0, params.shift_kind == 1], [dir_perp, dir_s], first_perp)
    leak = jnp.where(params.shift_kind == 1, dir_perp, dir_s)
    shift = params.shift_norm * main + params.shift_leak * leak
    theta_off = theta + shift

    # Offline design: rows beyond n0 are masked, so n0 can be swept without recompiling.
    scale_off = jnp.where(in_s, 1.0, params.offline_leakage).astype(dtype)
    z = (off[:, :d] * scale_off[None, :]) @ basis.T
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1.0)  # ||z_i|| <= 1
    z = z * (jnp.arange(spec.n0_max) < params.n0)[:, None].astype(dtype)
    y = z @ theta_off + params.sigma * off[:, d]
    offline = OfflineStats(G0=z.T @ z, Zy=z.T @ y)

    mu = jnp.where(in_s, params.mu_covered, params.mu_uncovered)
    cert_Minv = (basis / mu[None, :]) @ basis.T
    cert_rho = jnp.sqrt(jnp.sum(mu * (basis.T @ shift) ** 2))
    context_scales = jnp.where(in_s, 1.0, params.context_uncovered_scale).astype(dtype)
    return Problem(theta=theta, theta_off=theta_off, basis=basis, offline=offline, cert_Minv=cert_Minv,
                   cert_rho=cert_rho, shift_l2=jnp.linalg.norm(shift), sigma=params.sigma,
                   context_scales=context_scales)


def draw_round(key: PRNGKeyArray, spec: BanditSpec, problem: Problem) -> RoundDraw:
    """Draw one round's contexts and noise. Consumes ``key``; the tie-break key is split off, so the
    contexts and the noise do not depend on how an algorithm uses it."""
    k_draw, k_tie = jax.random.split(key)
    dtype = problem.theta.dtype
    # One normal draw per round for the contexts and the noise together (one call site compiles faster).
    g = jax.random.normal(k_draw, (spec.K * spec.d + 1,), dtype)
    coeff = g[:-1].reshape(spec.K, spec.d) * problem.context_scales[None, :]
    x = coeff @ problem.basis.T
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    noise = problem.sigma * g[-1]
    return RoundDraw(contexts=x, noise=noise, tie_key=k_tie)


def round_key(stream_key: PRNGKeyArray, t) -> PRNGKeyArray:
    """Key of round ``t`` (0-based): ``fold_in`` so any round can be regenerated independently."""
    return jax.random.fold_in(stream_key, t)


def tiebreak_uniforms(key: PRNGKeyArray, K: int, dtype) -> Float[Array, " K"]:
    """The uniforms an algorithm uses to break exact ties between arms. Consumes ``key``."""
    return jax.random.uniform(key, (K,), dtype)


class Stream(NamedTuple):
    contexts: Float[Array, "T K d"]
    noise: Float[Array, " T"]
    tiebreak: Float[Array, "T K"]


def sample_stream(stream_key: PRNGKeyArray, spec: BanditSpec, problem: Problem, T: int) -> Stream:
    """The first ``T`` rounds as arrays, exactly as the scanned rollout sees them (for the reference)."""

    def one(t):
        draw = draw_round(round_key(stream_key, t), spec, problem)
        return draw.contexts, draw.noise, tiebreak_uniforms(draw.tie_key, spec.K, problem.theta.dtype)

    return Stream(*jax.vmap(one)(jnp.arange(T)))
