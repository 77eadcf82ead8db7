"""Array views of a scenario for jitted code: static :class:`Spec` and dynamic :class:`ModelParams`.

``Spec`` holds the Python ints that fix array shapes (changing it recompiles). ``ModelParams`` holds
every number as a JAX array, so a new rate, price or even batch cap B reuses the compiled code, and a
sweep is a ``vmap`` over a stacked ``ModelParams``. Derived rates are properties computed from the
primitives, so gradients flow to alpha, beta, gamma, P, D (issue 7).

An optional :class:`RateSchedule` (``ModelParams.arrivals``) makes the arrival rates piecewise constant
in time. Its number of pieces is its arrays' shape, so it is fixed at trace time: without a schedule
(``None``, no leaves) or with one piece the engines compile the constant-rate code they always had.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._types import ClassVector, Scalar

if TYPE_CHECKING:
    from .scenario import Scenario


@dataclasses.dataclass(frozen=True)
class Rates:
    """Exponential service rates per class (1/s): prefill mu_p, decode on a prefilling GPU mu_m,
    decode on a GPU without prefill mu_s."""

    mu_p: np.ndarray
    mu_m: np.ndarray
    mu_s: np.ndarray


def service_rates(P, D, C, tau, gamma) -> Rates:
    """Paper eq. 4. Works on NumPy or JAX arrays alike (pure arithmetic)."""
    return Rates(mu_p=C / (P * tau), mu_m=1.0 / (D * tau), mu_s=gamma / D)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static shape constants: number of job classes I and of GPUs n."""

    num_classes: int
    num_gpus: int


class RateSchedule(eqx.Module):
    """Piecewise-constant arrival-rate multipliers as arrays: class i arrives at rate n lam_i f[i, s] on
    [t_s, t_{s+1}) (the last piece runs on forever). Built from a validated
    :class:`jaxq.model.scenario.ArrivalSchedule` (``.arrays()``); times are float64.

    ``integral`` and ``invert`` are the cumulative factor F_i(t) = int_0^t f_i and its inverse: a
    nonstationary Poisson process of intensity n lam_i f_i(t) has its next point after t at
    F_i^{-1}(F_i(t) + E / (n lam_i)) with E ~ Exp(1). Both are O(S) vectorised compares (no loop), for
    one class or all."""

    breakpoints: Float[Array, " S"]  # t_0 = 0 < t_1 < ... < t_{S-1} (s)
    factors: Float[Array, "I S"]  # f[i, s] >= 0

    @property
    def num_pieces(self) -> int:
        return self.breakpoints.shape[-1]

    def cumulative(self, cls=None):
        """F at the breakpoints: (I, S), or (S,) for class ``cls`` only (a row of the whole table: the
        table depends on the params alone, so XLA computes it once outside an engine's loop)."""
        steps = self.factors[:, :-1] * jnp.diff(self.breakpoints)[None, :]
        table = jnp.concatenate([jnp.zeros_like(self.factors[:, :1]), jnp.cumsum(steps, axis=-1)], axis=-1)
        return table if cls is None else table[cls]

    def integral(self, t, cls=None):
        """F(t) = int_0^t f (factor-seconds): (I,), or a scalar for class ``cls``. ``t`` >= 0."""
        k = jnp.maximum(jnp.sum(self.breakpoints <= t) - 1, 0)  # the piece holding t
        f = self.factors if cls is None else self.factors[cls]
        return self.cumulative(cls)[..., k] + f[..., k] * (t - self.breakpoints[k])

    def invert(self, cls, y):
        """The earliest time at which class ``cls``'s F reaches ``y`` (+inf if never: the last piece has
        factor 0 and F stays below ``y``). Zero-rate pieces are skipped: F is flat on them."""
        cum = self.cumulative(cls)
        j = jnp.maximum(jnp.sum(cum < y) - 1, 0)  # the last piece whose start F is below y
        f = self.factors[cls, j]
        return jnp.where(f > 0, self.breakpoints[j] + (y - cum[j]) / jnp.where(f > 0, f, 1.0), jnp.inf)


class ModelParams(eqx.Module):
    """Model numbers as arrays (float64 under jaxq's default x64 mode). ``arrivals``: the optional rate
    schedule (None: the constant rates lam)."""

    P: ClassVector
    D: ClassVector
    lam: ClassVector
    theta: ClassVector
    B: Scalar
    C: Scalar
    alpha: Scalar
    beta: Scalar
    gamma: Scalar
    c_p: Scalar
    c_d: Scalar
    arrivals: RateSchedule | None = None

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "ModelParams":
        f = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
        return cls(
            P=f(scenario.classes.P), D=f(scenario.classes.D), lam=f(scenario.classes.lam),
            theta=f(scenario.classes.theta), B=f(scenario.cluster.B), C=f(scenario.cluster.C),
            alpha=f(scenario.timing.alpha), beta=f(scenario.timing.beta), gamma=f(scenario.timing.gamma),
            c_p=f(scenario.pricing.c_p), c_d=f(scenario.pricing.c_d),
            arrivals=None if scenario.arrivals is None else scenario.arrivals.arrays(scenario.num_classes),
        )

    @property
    def tau(self) -> Scalar:
        return self.alpha + self.beta * self.C

    @property
    def mu_p(self) -> ClassVector:
        return service_rates(self.P, self.D, self.C, self.tau, self.gamma).mu_p

    @property
    def mu_m(self) -> ClassVector:
        return service_rates(self.P, self.D, self.C, self.tau, self.gamma).mu_m

    @property
    def mu_s(self) -> ClassVector:
        return service_rates(self.P, self.D, self.C, self.tau, self.gamma).mu_s

    @property
    def w(self) -> ClassVector:
        """Bundled revenue per request, c_p P_i + c_d D_i."""
        return self.c_p * self.P + self.c_d * self.D
