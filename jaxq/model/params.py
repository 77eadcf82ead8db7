"""Array views of a scenario for jitted code: static :class:`Spec` and dynamic :class:`ModelParams`.

``Spec`` holds the Python ints that fix array shapes (changing it recompiles). ``ModelParams`` holds
every number as a JAX array, so a new rate, price or even batch cap B reuses the compiled code, and a
sweep is a ``vmap`` over a stacked ``ModelParams``. Derived rates are properties computed from the
primitives, so gradients flow to alpha, beta, gamma, P, D (issue 7).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import equinox as eqx
import jax.numpy as jnp
import numpy as np

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


class ModelParams(eqx.Module):
    """Model numbers as arrays (float64 under jaxq's default x64 mode)."""

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

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "ModelParams":
        f = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
        return cls(
            P=f(scenario.classes.P), D=f(scenario.classes.D), lam=f(scenario.classes.lam),
            theta=f(scenario.classes.theta), B=f(scenario.cluster.B), C=f(scenario.cluster.C),
            alpha=f(scenario.timing.alpha), beta=f(scenario.timing.beta), gamma=f(scenario.timing.gamma),
            c_p=f(scenario.pricing.c_p), c_d=f(scenario.pricing.c_d),
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
