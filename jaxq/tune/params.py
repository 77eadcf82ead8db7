"""The tunable part of a static-planning policy, in unconstrained coordinates (docs/tuning.md §2).

Three arrays of the paper's policies decide their fluid fixed point (MODEL.md §5): the gate's
per-class prefill targets x_i*, the mixed fraction m, and the SLI router's solo probabilities p_s,i.
They are tuned as

    x_target_i = rho_i * sigmoid(fill_logits_i),   rho_i = lam_i / mu_p,i (full-service occupancy)
    m          = min(1, sum_i x_target_i)           (static planning: M/n -> sum_i x_i*)
    p_solo_i   = sigmoid(solo_logits_i + beta),     beta such that the solo group's share of the decode
                 work, sum_i p_i T_i / sum_i T_i with T_i = mu_p,i x_target_i / mu_s,i, equals
                 sigmoid(solo_share_logit)          (only the "sli" kind uses p_solo)

Why targets as fractions of rho and m = sum x_target, not a free m with free targets: the GG-SP
gate sees only the direction of x_target, and a class whose target exceeds what it can use
(x_i* > rho_i, or a share of a larger m) is empty at the fixed point, so its target has no effect at
all. With m and the targets free, the fluid objective has plateaus where the gradient in the
targets is exactly zero; Adam stalls on them (canonical instance: 2.3% below R*, docs/tuning.md
§2). With x_target_i < rho_i and m = sum x_target every class waits, the fixed point is x = x_target
exactly, and every coordinate matters. The LP's own points (x_i* = rho_i for a fully served class)
are limits, reached to 1e-9 by a logit of ~21.

Why the router's solo share as its own coordinate: revenue is maximal only when both decode groups
are exactly full, one linear condition on p (the solo group's load sum_i p_i T_i equals its
capacity). Off it the revenue has a kink, so in the plain coordinates logit(p_i) the optimum of a
decode-fairness penalty lies on a non-smooth ridge oblique to the axes, along which Adam crawls
(canonical, decode fairness 1: 0.8% short after 150 steps, docs/tuning.md §5). With the solo share
as one coordinate the ridge is axis-aligned: that coordinate oscillates around it and the class
composition (solo_logits, defined up to a common shift) moves along it.

Classes the base policy cannot admit (x_i* = 0 in its LP) keep target 0 and stay excluded.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from .._types import ClassVector, Scalar
from ..fluid.dynamics import FluidPolicyParams
from ..model.params import ModelParams

# Fractions built from arrays are clipped to [_CLIP, 1 - _CLIP] before taking logits, so an LP point
# with x_i* = rho_i or p_s = 1 maps to a finite logit (~21) and a numerically identical policy.
_CLIP = 1e-9
# Perturbed starts keep every fraction within [_START_LO, 1 - _START_LO] (logits within +-2.9), so the
# optimiser does not start on a saturated sigmoid.
_START_LO = 0.05


def full_service_occupancy(model: ModelParams) -> ClassVector:
    """rho_i = lam_i / mu_p,i: the prefill occupancy that admits every class-i arrival."""
    return model.lam / model.mu_p


class TunableParams(eqx.Module):
    """Unconstrained policy parameters; optax moves these freely. See the module docstring."""

    fill_logits: ClassVector
    solo_share_logit: Scalar
    solo_logits: ClassVector

    # -- constrained values ---------------------------------------------------------------------
    def x_target(self, model: ModelParams, admissible: Bool[Array, " I"] | None = None) -> ClassVector:
        x = full_service_occupancy(model) * jax.nn.sigmoid(self.fill_logits)
        return x if admissible is None else jnp.where(admissible, x, 0.0)

    def mixed_fraction(self, model: ModelParams, admissible: Bool[Array, " I"] | None = None) -> Scalar:
        return jnp.minimum(jnp.sum(self.x_target(model, admissible)), 1.0)

    def p_solo(self, model: ModelParams, admissible: Bool[Array, " I"] | None = None) -> ClassVector:
        load = decode_load(model, self.x_target(model, admissible))
        return solo_probabilities(self.solo_logits, jax.nn.sigmoid(self.solo_share_logit), load)

    def apply(self, base: FluidPolicyParams, model: ModelParams) -> FluidPolicyParams:
        """``base`` with (mixed_fraction, x_target, p_solo) replaced by these values; every other field
        (admissible mask, priority key, eps, eps_tie, kappa, buffer_rate) is kept."""
        adm = base.admissible
        return eqx.tree_at(
            lambda p: (p.mixed_fraction, p.x_target, p.p_solo),
            base,
            (self.mixed_fraction(model, adm), self.x_target(model, adm), self.p_solo(model, adm)),
        )

    def values(self, model: ModelParams, admissible=None) -> dict[str, np.ndarray]:
        """Host-side constrained values {mixed_fraction, x_target, p_solo, solo_share}."""
        return {"mixed_fraction": np.asarray(self.mixed_fraction(model, admissible)),
                "x_target": np.asarray(self.x_target(model, admissible)),
                "p_solo": np.asarray(self.p_solo(model, admissible)),
                "solo_share": np.asarray(jax.nn.sigmoid(self.solo_share_logit))}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_values(cls, model: ModelParams, x_target, p_solo, *, clip: float = _CLIP) -> TunableParams:
        """Logits of given targets and solo probabilities (host side). x_target_i / rho_i and p_solo
        are clipped to [clip, 1 - clip]; targets above rho_i (never used at a fixed point) become rho_i."""
        rho = np.asarray(full_service_occupancy(model))
        xt = np.asarray(x_target, dtype=np.float64)
        ps = np.asarray(p_solo, dtype=np.float64)
        if xt.shape != rho.shape or ps.shape != rho.shape:
            raise ValueError(f"invalid tune field 'x_target'/'p_solo': must have shape {rho.shape} (one per class), "
                             f"got {xt.shape} and {ps.shape}")
        if not (np.all(np.isfinite(xt)) and np.all(xt >= 0)):
            raise ValueError(f"invalid tune field 'x_target': must be finite and >= 0, got {xt!r}")
        if not (np.all(np.isfinite(ps)) and np.all((ps >= 0) & (ps <= 1))):
            raise ValueError(f"invalid tune field 'p_solo': must be probabilities in [0, 1], got {ps!r}")
        fill = np.clip(xt / np.where(rho > 0, rho, 1.0), clip, 1.0 - clip)
        ps = np.clip(ps, clip, 1.0 - clip)
        load = np.asarray(decode_load(model, jnp.asarray(fill * rho)))
        share = float(np.clip(np.sum(ps * load) / np.sum(load), clip, 1.0 - clip)) if np.sum(load) > 0 else 0.5
        logit = lambda p: jnp.asarray(np.log(p / (1.0 - p)), dtype=jnp.float64)
        return cls(fill_logits=logit(fill), solo_share_logit=logit(share), solo_logits=logit(ps))

    @classmethod
    def from_policy(cls, policy: FluidPolicyParams, model: ModelParams) -> TunableParams:
        """The tunable coordinates of an existing policy (e.g. :func:`jaxq.fluid.policy_params`). Its
        mixed fraction is not a coordinate: it must equal sum x_target (the fluid static plan)."""
        return cls.from_values(model, np.asarray(policy.x_target), np.asarray(policy.p_solo))

    def perturbed(self, model: ModelParams, amount: float) -> TunableParams:
        """A start ``amount`` away from these values (host side): x_target_i * (1 + amount) for even i
        and * (1 - amount) for odd i (class 0 up, class 1 down, ...), p_solo pulled toward 1/2 by the
        factor (1 - amount); fractions are then kept within [0.05, 0.95] of their range. ``amount = 0``
        returns these parameters unchanged."""
        if not (0.0 <= amount < 1.0):
            raise ValueError(f"invalid tune field 'perturb': must be in [0, 1), got {amount!r}")
        if amount == 0:
            return self
        rho = np.asarray(full_service_occupancy(model))
        xt = np.asarray(self.x_target(model))
        sign = np.where(np.arange(xt.shape[0]) % 2 == 0, 1.0, -1.0)
        fill = np.clip(xt * (1.0 + amount * sign) / rho, _START_LO, 1.0 - _START_LO)
        ps = np.clip(0.5 + (np.asarray(self.p_solo(model)) - 0.5) * (1.0 - amount), _START_LO, 1.0 - _START_LO)
        return TunableParams.from_values(model, fill * rho, ps)


def decode_load(model: ModelParams, x: ClassVector) -> ClassVector:
    """T_i = mu_p,i x_i / mu_s,i: class i's decodes in progress if all of them ran solo (Little's law
    with the prefill completion flow mu_p,i x_i as the decode arrival rate)."""
    return model.mu_p * x / model.mu_s


def solo_probabilities(logits: ClassVector, share: Scalar, load: ClassVector) -> ClassVector:
    """p_i = sigmoid(logits_i + beta) with beta such that sum_i p_i load_i = share * sum_i load_i.

    The left side increases in beta from 0 to sum load, so beta is unique; it is found by bisection
    (no derivative taken) and its derivative given by the implicit function theorem through one
    Newton step with a frozen slope. Without load (sum load = 0), p = sigmoid(logits)."""
    total = jnp.sum(load)
    target = share * total
    z = jax.lax.stop_gradient(logits)
    tgt = jax.lax.stop_gradient(target)
    ld = jax.lax.stop_gradient(load)

    def g(beta):
        return jnp.sum(ld * jax.nn.sigmoid(z + beta))

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        up = g(mid) < tgt
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 200, body, (-jnp.max(z) - 60.0, -jnp.min(z) + 60.0))
    beta0 = 0.5 * (lo + hi)
    s0 = jax.nn.sigmoid(z + beta0)
    slope = jnp.sum(ld * s0 * (1.0 - s0))
    ok = (total > 0) & (slope > 0)
    resid = jnp.sum(load * jax.nn.sigmoid(logits + beta0)) - target  # carries the derivatives
    beta = beta0 - jnp.where(ok, resid / jnp.where(ok, slope, 1.0), 0.0)
    beta = beta - jax.lax.stop_gradient(beta - beta0)  # value beta0, derivative d beta0 / d(inputs)
    return jax.nn.sigmoid(logits + jnp.where(total > 0, beta, 0.0))


__all__ = ["TunableParams", "decode_load", "full_service_occupancy", "solo_probabilities"]
