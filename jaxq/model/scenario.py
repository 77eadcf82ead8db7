"""Host-side description of a scenario: job classes, cluster, iteration-time law, prices.

Everything here is plain Python / NumPy float64 and is validated on construction, before any JAX
tracing: an invalid value raises ``ValueError`` naming the field (``"classes.P"``, ``"cluster.B"``) and
what is allowed. ``Scenario.params()`` turns a validated scenario into the array pytree
(:class:`jaxq.model.ModelParams`) that jitted code consumes; ``Scenario.spec()`` gives the static ints.

The formulas follow MODEL.md §1 (paper eqs. 1-4):

* iteration-time law  tau(b') = c + a * max(0, b' - b0);  mixed iteration tau_mix(C) = alpha + beta*C
  with alpha = c - a*b0, beta = a; solo decode token rate gamma = 1/tau_solo (= 1/c for the piecewise law);
* rates  mu_p = C / (P tau),  mu_m = 1 / (D tau),  mu_s = gamma / D.

An optional :class:`ArrivalSchedule` (TOML table ``[arrivals]``) makes the rates piecewise constant in
time: class i arrives at n lam_i f_{i,s} on [t_s, t_{s+1}). The LP and the fluid model keep the
constant lam; :meth:`Scenario.mean_lam` gives the time average lam_i x mean factor over [0, T].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .params import ModelParams, Rates, Spec, service_rates

PRICING_SCHEMES = ("bundled", "separate")
PricingScheme = Literal["bundled", "separate"]


def _fail(field: str, allowed: str, got) -> ValueError:
    return ValueError(f"invalid scenario field '{field}': must be {allowed}, got {got!r}")


def _check_real(field: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(field, "a real number", value)
    v = float(value)
    if not math.isfinite(v):
        raise _fail(field, "a finite number (not NaN or infinite)", value)
    if positive and not v > 0:
        raise _fail(field, "> 0", value)
    if nonneg and not v >= 0:
        raise _fail(field, ">= 0", value)
    return v


def _check_int(field: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise _fail(field, f"an integer >= {minimum}", value)
    if int(value) < minimum:
        raise _fail(field, f"an integer >= {minimum}", value)
    return int(value)


def _check_vector(field: str, value, length: int | None, *, positive=False, nonneg=False) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _fail(field, "a list of numbers, one per class", value)
    items = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
    if length is not None and len(items) != length:
        raise _fail(field, f"a list of length {length} (one entry per class, as many as classes.P has)",
                    f"length {len(items)}")
    if len(items) == 0:
        raise _fail(field, "a non-empty list (at least one class)", value)
    out = [
        _check_real(f"{field}[{k}]", v, positive=positive, nonneg=nonneg) for k, v in enumerate(items)
    ]
    arr = np.asarray(out, dtype=np.float64)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True)
class JobClasses:
    """Per-class workload: mean prompt length P, mean output length D (tokens), arrival rate lam per
    GPU (requests/s; the cluster sees n*lam), patience rate theta (1/s; 0 = never abandons)."""

    P: np.ndarray
    D: np.ndarray
    lam: np.ndarray
    theta: np.ndarray
    names: tuple[str, ...] = ()

    def __post_init__(self):
        P = _check_vector("classes.P", self.P, None, positive=True)
        num = len(P)
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "D", _check_vector("classes.D", self.D, num, positive=True))
        object.__setattr__(self, "lam", _check_vector("classes.lam", self.lam, num, positive=True))
        object.__setattr__(self, "theta", _check_vector("classes.theta", self.theta, num, nonneg=True))
        names = tuple(self.names) if self.names else tuple(f"class{i}" for i in range(num))
        if len(names) != num or not all(isinstance(s, str) and s for s in names):
            raise _fail("classes.names", f"a list of {num} non-empty strings (one per class)", self.names)
        if len(set(names)) != num:
            raise _fail("classes.names", "distinct names", self.names)
        object.__setattr__(self, "names", names)

    @property
    def num_classes(self) -> int:
        return len(self.P)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """n homogeneous GPUs, at most B concurrent slots each, prefill chunks of C tokens per iteration."""

    n: int
    B: int
    C: int

    def __post_init__(self):
        object.__setattr__(self, "n", _check_int("cluster.n", self.n, minimum=1))
        object.__setattr__(self, "B", _check_int("cluster.B", self.B, minimum=1))
        object.__setattr__(self, "C", _check_int("cluster.C", self.C, minimum=1))


@dataclasses.dataclass(frozen=True)
class IterationTime:
    """Mixed iteration time tau_mix(C) = alpha + beta*C (s) and solo decode token rate gamma (tokens/s
    per stream). Build it from the piecewise law with :meth:`from_piecewise`."""

    alpha: float
    beta: float
    gamma: float

    def __post_init__(self):
        object.__setattr__(self, "alpha", _check_real("timing.alpha", self.alpha, positive=True))
        object.__setattr__(self, "beta", _check_real("timing.beta", self.beta, positive=True))
        object.__setattr__(self, "gamma", _check_real("timing.gamma", self.gamma, positive=True))

    @classmethod
    def from_piecewise(cls, c: float, a: float, b0: float, gamma: float | None = None) -> "IterationTime":
        """From tau(b') = c + a*max(0, b'-b0) (paper eq. 1): alpha = c - a*b0, beta = a, and
        gamma = 1/c (decode-only iterations have b' <= b0, eq. 2) unless ``gamma`` is given."""
        c = _check_real("timing.c", c, positive=True)
        a = _check_real("timing.a", a, positive=True)
        b0 = _check_real("timing.b0", b0, nonneg=True)
        alpha = c - a * b0
        if not alpha > 0:
            raise _fail("timing.b0", f"< c/a = {c / a:g} so that alpha = c - a*b0 > 0", b0)
        return cls(alpha=alpha, beta=a, gamma=1.0 / c if gamma is None else gamma)

    def tau_mix(self, C: float) -> float:
        return self.alpha + self.beta * C


@dataclasses.dataclass(frozen=True)
class Pricing:
    """Prices per prefill token (c_p) and per decode token (c_d), and the charging scheme:
    'bundled' earns w_i = c_p P_i + c_d D_i at decode completion; 'separate' earns c_p P_i at prefill
    completion and c_d D_i at decode completion."""

    c_p: float
    c_d: float
    scheme: PricingScheme = "bundled"

    def __post_init__(self):
        object.__setattr__(self, "c_p", _check_real("prices.c_p", self.c_p, nonneg=True))
        object.__setattr__(self, "c_d", _check_real("prices.c_d", self.c_d, nonneg=True))
        if self.scheme not in PRICING_SCHEMES:
            raise _fail("prices.scheme", "one of " + ", ".join(repr(s) for s in PRICING_SCHEMES), self.scheme)
        if self.c_p == 0 and self.c_d == 0:
            raise _fail("prices.c_d", "> 0 when c_p is 0 (some price must be positive)", self.c_d)


@dataclasses.dataclass(frozen=True)
class ArrivalSchedule:
    """Piecewise-constant arrival-rate multipliers: class i arrives at n lam_i f_{i,s} per second on
    [t_s, t_{s+1}), the last piece extending to infinity. ``breakpoints`` t_0 = 0 < t_1 < ... (s);
    ``factors`` one row of S factors >= 0 per class, or a single row (a flat list) for every class.
    Every class needs a positive factor somewhere; the factors' mean need not be 1 (lam is a base rate).
    Checked on construction; the row count against the classes in :class:`Scenario`."""

    breakpoints: np.ndarray
    factors: np.ndarray

    def __post_init__(self):
        bp = self.breakpoints
        if isinstance(bp, (str, bytes)) or not isinstance(bp, (Sequence, np.ndarray)) or len(bp) == 0:
            raise _fail("arrivals.breakpoints", "a non-empty list of times (s) starting at 0", bp)
        bp = np.asarray([_check_real(f"arrivals.breakpoints[{k}]", v, nonneg=True) for k, v in enumerate(bp)])
        if bp[0] != 0.0:
            raise _fail("arrivals.breakpoints", "a list starting at 0.0", self.breakpoints)
        if np.any(np.diff(bp) <= 0):
            raise _fail("arrivals.breakpoints", "strictly increasing", self.breakpoints)
        num = len(bp)
        f = self.factors
        if isinstance(f, (str, bytes)) or not isinstance(f, (Sequence, np.ndarray)) or len(f) == 0:
            raise _fail("arrivals.factors", f"a list of {num} factors or a list of such rows, one per class", f)
        rows = [f] if not isinstance(f[0], (Sequence, np.ndarray)) or isinstance(f[0], (str, bytes)) else list(f)
        out = []
        for i, row in enumerate(rows):
            where = "arrivals.factors" if rows[0] is f else f"arrivals.factors[{i}]"
            if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)) or len(row) != num:
                raise _fail(where, f"a list of {num} factors (one per breakpoint)", row)
            vals = [_check_real(f"{where}[{s}]", v, nonneg=True) for s, v in enumerate(row)]
            if not any(v > 0 for v in vals):
                raise _fail(where, "a row with at least one factor > 0 (else the class never arrives)", row)
            out.append(vals)
        factors = np.asarray(out, dtype=np.float64)
        bp.setflags(write=False)
        factors.setflags(write=False)
        object.__setattr__(self, "breakpoints", bp)
        object.__setattr__(self, "factors", factors)

    @property
    def num_pieces(self) -> int:
        return len(self.breakpoints)

    def for_classes(self, num_classes: int) -> "ArrivalSchedule":
        """The schedule with one row per class (a single row repeated); raises unless it has 1 or
        ``num_classes`` rows."""
        rows = self.factors.shape[0]
        if rows == num_classes:
            return self
        if rows != 1:
            raise _fail("arrivals.factors", f"a single row or {num_classes} rows (one per class, as many as "
                        "classes.P has)", f"{rows} rows")
        return ArrivalSchedule(self.breakpoints, np.repeat(self.factors, num_classes, axis=0))

    def integral(self, t: float) -> np.ndarray:
        """int_0^t f_i (factor-seconds) per row, for t >= 0."""
        ends = np.append(self.breakpoints[1:], np.inf)
        overlap = np.clip(np.minimum(ends, t) - self.breakpoints, 0.0, None)
        return self.factors @ overlap

    def mean_factor(self, horizon: float) -> np.ndarray:
        """(1/T) int_0^T f_i per row: the time-average multiplier over [0, T]."""
        horizon = _check_real("horizon", horizon, positive=True)
        return self.integral(horizon) / horizon

    def arrays(self, num_classes: int | None = None):
        """The schedule as a :class:`jaxq.model.params.RateSchedule` (float64 arrays), one row per class."""
        import jax.numpy as jnp

        from .params import RateSchedule

        sched = self if num_classes is None else self.for_classes(num_classes)
        return RateSchedule(breakpoints=jnp.asarray(sched.breakpoints, jnp.float64),
                            factors=jnp.asarray(sched.factors, jnp.float64))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A complete, validated model instance (MODEL.md §1). Immutable; derive variants with
    :meth:`replace`."""

    classes: JobClasses
    cluster: Cluster
    timing: IterationTime
    pricing: Pricing
    name: str = "unnamed"
    version: int = 1
    description: str = ""
    arrivals: ArrivalSchedule | None = None  # None: constant rates lam

    def __post_init__(self):
        for field, typ in (("classes", JobClasses), ("cluster", Cluster), ("timing", IterationTime),
                           ("pricing", Pricing)):
            if not isinstance(getattr(self, field), typ):
                raise _fail(field, f"a {typ.__name__}", getattr(self, field))
        if self.cluster.C < 1:
            raise _fail("cluster.C", "an integer >= 1", self.cluster.C)
        if self.arrivals is not None:
            if not isinstance(self.arrivals, ArrivalSchedule):
                raise _fail("arrivals", "an ArrivalSchedule or None", self.arrivals)
            object.__setattr__(self, "arrivals", self.arrivals.for_classes(self.num_classes))

    # -- derived quantities (float64, host side) -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def tau(self) -> float:
        """Mixed iteration time tau = alpha + beta*C (s)."""
        return self.timing.tau_mix(self.cluster.C)

    @property
    def rates(self) -> Rates:
        return service_rates(self.classes.P, self.classes.D, self.cluster.C, self.tau, self.timing.gamma)

    @property
    def w(self) -> np.ndarray:
        """Bundled price per class-i request, w_i = c_p P_i + c_d D_i."""
        return self.pricing.c_p * self.classes.P + self.pricing.c_d * self.classes.D

    def mean_lam(self, horizon: float) -> np.ndarray:
        """The time-average arrival rate per GPU over [0, horizon], lam_i x (1/T) int_0^T f_i (lam itself
        without a schedule). The LP and the fluid model use the constant ``classes.lam``: pass
        ``replace(**{"classes.lam": s.mean_lam(T)})`` to plan for the average instead."""
        if self.arrivals is None:
            return self.classes.lam.copy()
        return self.classes.lam * self.arrivals.mean_factor(horizon)

    @property
    def peak_lam(self) -> np.ndarray:
        """The largest arrival rate per GPU of each class over time (lam without a schedule)."""
        if self.arrivals is None:
            return self.classes.lam.copy()
        return self.classes.lam * self.arrivals.factors.max(axis=1)

    def prop_3_2_holds(self) -> bool:
        """Prop 3.2: gamma*tau >= (B-1)/B implies an optimal bundled LP solution with q_d = 0."""
        return self.timing.gamma * self.tau >= (self.cluster.B - 1) / self.cluster.B

    def replace(self, **changes) -> "Scenario":
        """Copy with changes. Keys are top-level fields or dotted leaves, e.g.
        ``replace(**{"cluster.n": 20, "classes.lam": [0.4, 0.4]})``; the result is re-validated."""
        groups: dict[str, dict] = {}
        top: dict = {}
        for key, value in changes.items():
            if "." in key:
                head, leaf = key.split(".", 1)
                groups.setdefault(head, {})[leaf] = value
            else:
                top[key] = value
        attr = {"prices": "pricing"}
        for head, leaves in groups.items():
            name = attr.get(head, head)
            if name not in ("classes", "cluster", "timing", "pricing", "arrivals"):
                raise _fail(head, "one of classes, cluster, timing, prices, arrivals", head)
            sub = getattr(self, name)
            if sub is None:
                raise _fail(head, "set as a whole first (this scenario has no arrival schedule)", head)
            valid = {f.name for f in dataclasses.fields(sub)}
            for leaf in leaves:
                if leaf not in valid:
                    raise _fail(f"{head}.{leaf}", "one of " + ", ".join(sorted(valid)), leaf)
            top[name] = dataclasses.replace(sub, **leaves)
        return dataclasses.replace(self, **top)

    # -- JAX views ---------------------------------------------------------------------------------
    def params(self) -> ModelParams:
        """The array pytree for jitted code (:class:`jaxq.model.ModelParams`)."""
        return ModelParams.from_scenario(self)

    def spec(self) -> Spec:
        return Spec(num_classes=self.num_classes, num_gpus=self.cluster.n)
