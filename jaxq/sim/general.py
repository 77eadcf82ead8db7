"""The general-service engine: the exact engine's policies with non-exponential prompt and output lengths.

The exact engine (:mod:`jaxq.sim.exact`) simulates the CTMC of MODEL.md §2, where every phase is
exponential. Here the prompt length P and output length D of each job follow a :class:`ServiceLaw`
(exponential, deterministic or lognormal, with the scenario's means P_i and D_i, or empirical: each
class's own samples, from a trace), and the engine keeps each job's remaining work:

* a running prefill's, per GPU, shape (n,);
* each decode stream's, and its class, per GPU and slot, shape (n, max_batch) (class -1: empty slot).

Speeds (tokens/s), constant between events: a prefill processes C/tau prompt tokens per second (it
runs P/C chunks of tau s each); a decode one output token per iteration, so 1/tau while it runs slow
(:func:`jaxq.sim.state.runs_slow`, the exact engine's rule) and gamma otherwise. A phase of mean
length therefore lasts 1/mu_p, 1/mu_m or 1/mu_s (MODEL.md eq. 4; :func:`phase_speeds`).

Remaining work is stored as the absolute time at which the job finishes at its current speed (float64;
:func:`remaining_work` converts back to tokens: (finish - t) x speed). Between events every speed is
constant, so these times stand still while every job's work drains at its speed; a speed changes only
when a prefill starts or ends on a GPU, and then only that GPU's streams are re-timed (their remaining
work kept, :meth:`PerJob._rescale`). This is the "advance all remaining work by speed x elapsed
time" bookkeeping done lazily: an event costs one read of the n x max_batch finish times (the argmin)
and O(max_batch) writes, not a rewrite of every job's work.

Exactness. Arrivals come from the exact engine's own stream (same keys: the same arrival times, common
random numbers). Patience stays exponential, so abandonment is a Gillespie clock on the total rate
theta x (waiting jobs), redrawn at every event (memoryless). Service completions are deterministic
given the state: the next one is the earliest finish time over prefills and decode slots. Each step
takes the earliest of the three candidate times and applies that event. With exponential laws the
remaining work of a job is exponential whatever its past (memorylessness), so the process is the exact
engine's CTMC in distribution (tested in tests/sim/test_general.py).

Lengths are drawn when the phase starts: the k-th prefill admission of class i takes the prompt length
from one uniform of ``fold_in(length_key, 0, i, k)``, the k-th decode start of class i the output
length from ``fold_in(length_key, 1, i, k)`` (inverted: exponential, lognormal via the normal
quantile, empirical through the class's sorted samples: samples[floor(u x count_i)]). These keys are independent of everything that decides k, so the lengths are i.i.d. per
class; two policies on one key see the same sequence of lengths per class. Completions that coincide
(deterministic lengths) are applied one per step at the same instant.

The law is data inside the step (:class:`LawArrays`): one compiled program runs every law when the
law is passed as an argument (``vmap`` over laws, as ``jaxq reproduce service-laws`` does).

This is a cluster of the event engine (:mod:`jaxq.sim.core`): the decision logic (gate, routing,
buffers, counters, time integrals, status) is the core's; the per-GPU arrays are the exact engine's
(:class:`~jaxq.sim.exact.PerGpu`, wrapped: its four functions that change a GPU are extended to keep
the per-job work in step), and the next completion is the earliest finish instead of a Gillespie draw.
Cost per event: one O(n x max_batch) read (the argmin of the finish times) on top of the exact
engine's O(n) passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Key

from .core import ABANDON_BUFFER, ABANDON_QUEUE, DECODE, PREFILL, AbstractCluster, Event, weighted_index
from .exact import AbstractGpuArrays, GpuArrays, PerGpu
from .state import ADMITTED, CAPACITY_VIOLATED, DECODE_STARTED, SimParams, SimSpec, runs_slow

_I32 = jnp.int32
LAWS = ("exponential", "deterministic", "lognormal", "empirical")
EMPIRICAL = LAWS.index("empirical")
PROMPT, OUTPUT = 0, 1  # length streams
# rounding tolerance between an empirical law's sample means and the scenario's P_i, D_i (relative)
MEAN_RTOL = 1e-3

# A replay's per-job latencies (TTFT, TPOT, end-to-end), kept as counts in log-spaced bins per (latency,
# class): LATENCY_BINS bins from 10**LATENCY_DECADES[0] to 10**LATENCY_DECADES[1] s, plus one below and
# one above. Counts, not a per-job table: the state is a while-loop carry, and under vmap every carry
# leaf is selected whole at every step, so an (I, J) table per replica made a replay step 2.6x slower.
# Bins of 4.1% (9 decades / 512); :func:`latency_percentiles` interpolates within a bin.
LATENCIES = ("ttft_s", "tpot_s", "end_to_end_s")
TTFT, TPOT, END_TO_END = range(3)
LATENCY_BINS = 512
LATENCY_DECADES = (-4.0, 5.0)


def latency_edges() -> np.ndarray:
    """The LATENCY_BINS + 1 edges (s) of the latency bins; bin 0 is below the first, the last above."""
    return np.logspace(*LATENCY_DECADES, LATENCY_BINS + 1)


def latency_bin(seconds):
    """The bin of each latency: 1 + floor of its place on the log grid, 0 below it (or <= 0), and
    LATENCY_BINS + 1 above it."""
    lo, hi = LATENCY_DECADES
    x = (jnp.log10(jnp.maximum(seconds, 1e-300)) - lo) * (LATENCY_BINS / (hi - lo))
    return jnp.clip(jnp.floor(x).astype(_I32) + 1, 0, LATENCY_BINS + 1)


def latency_percentiles(counts, qs) -> np.ndarray:
    """Percentiles ``qs`` (in 0..100) of the latencies counted in ``counts`` (..., LATENCY_BINS + 2),
    shape (..., len(qs)): the q-th is where the cumulative count crosses q/100 of the total, log-linearly
    interpolated within that bin (so within the bin's 4.1% of the sample percentile). NaN where nothing
    was counted, or where the percentile falls below or above the grid."""
    counts = np.asarray(counts, np.float64)
    edges = np.log10(latency_edges())
    total = counts.sum(-1)
    cum = np.cumsum(counts, -1)
    out = np.full(counts.shape[:-1] + (len(qs),), np.nan)
    for k, q in enumerate(qs):
        rank = q / 100.0 * total
        b = np.minimum((cum < rank[..., None]).sum(-1), LATENCY_BINS + 1)  # first bin reaching the rank
        inside = (b >= 1) & (b <= LATENCY_BINS) & (total > 0)
        bb = np.clip(b, 1, LATENCY_BINS)
        before = np.take_along_axis(cum, (bb - 1)[..., None], -1)[..., 0]
        here = np.take_along_axis(counts, bb[..., None], -1)[..., 0]
        frac = np.clip((rank - before) / np.where(here > 0, here, 1.0), 0.0, 1.0)
        out[..., k] = np.where(inside, 10.0 ** (edges[bb - 1] + frac * (edges[bb] - edges[bb - 1])), np.nan)
    return out


def _pad_width(k: int) -> int:
    """Samples per row as stored: the next power of two (at least 8), so traces of similar sizes share
    one compiled program when the law is passed as data."""
    return max(8, 1 << (int(k) - 1).bit_length())


@dataclasses.dataclass(frozen=True, eq=False)
class EmpiricalSamples:
    """Sorted length samples (tokens) per phase and class, as :meth:`ServiceLaw.empirical` builds them:
    ``values`` (2, I, K) float64, row (phase, i) holding ``count[phase, i]`` sorted samples then padding
    (the row's largest sample; never read); ``count`` (2, I), 0 for a phase without samples. Compared
    and hashed by content (a digest), so laws with equal samples share one compiled program."""

    values: np.ndarray
    count: np.ndarray
    digest: str

    @classmethod
    def of(cls, prompt, output) -> EmpiricalSamples:
        """From per-class sample lists (``prompt``/``output``: a sequence of 1-D arrays, one per class, or
        None for a phase without samples). Samples must be finite and >= 0 with a positive mean."""
        rows = {}
        num = None
        for phase, name, per_class in ((PROMPT, "prompt_samples", prompt), (OUTPUT, "output_samples", output)):
            if per_class is None:
                continue
            if isinstance(per_class, (str, bytes)) or not hasattr(per_class, "__len__") or len(per_class) == 0:
                raise ValueError(f"invalid ServiceLaw field '{name}': must be a list of 1-D arrays of lengths, "
                                 f"one per class, got {per_class!r:.80}")
            if num is not None and len(per_class) != num:
                raise ValueError(f"invalid ServiceLaw field '{name}': must have one array per class, as many as "
                                 f"prompt_samples ({num}), got {len(per_class)}")
            num = len(per_class)
            out = []
            for i, x in enumerate(per_class):
                try:
                    a = np.asarray(x, dtype=np.float64)
                except (TypeError, ValueError):
                    a = None
                if a is None or a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0) \
                        or not a.mean() > 0:
                    raise ValueError(f"invalid ServiceLaw field '{name}[{i}]': must be a non-empty 1-D array of "
                                     f"finite lengths >= 0 with a positive mean, got {x!r:.80}")
                out.append(np.sort(a))
            rows[phase] = out
        if not rows:
            raise ValueError("invalid ServiceLaw field 'prompt_samples': an empirical law needs prompt_samples, "
                             "output_samples or both")
        width = _pad_width(max(len(a) for r in rows.values() for a in r))
        values = np.zeros((2, num, width))
        count = np.zeros((2, num), np.int32)
        for phase, r in rows.items():
            for i, a in enumerate(r):
                values[phase, i, :] = a[-1]
                values[phase, i, :len(a)] = a
                count[phase, i] = len(a)
        values.setflags(write=False)
        count.setflags(write=False)
        digest = hashlib.sha256(values.tobytes() + count.tobytes() + str(values.shape).encode()).hexdigest()
        return cls(values=values, count=count, digest=digest)

    def has(self, phase: int) -> bool:
        return bool(np.all(self.count[phase] > 0))

    def means(self) -> np.ndarray:
        """(2, I): each row's sample mean (NaN for a phase without samples)."""
        total = np.where(np.arange(self.values.shape[2]) < self.count[..., None], self.values, 0.0).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, total / np.maximum(self.count, 1), np.nan)

    def __eq__(self, other):
        return isinstance(other, EmpiricalSamples) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)


@dataclasses.dataclass(frozen=True)
class ServiceLaw:
    """Laws of the prompt length P and the output length D of a job of class i, each with the scenario's
    mean (P_i, D_i): "exponential" (the paper's model, MODEL.md §1.3), "deterministic" (always the
    mean), "lognormal" with coefficient of variation ``cv`` (std / mean; used only by lognormal
    phases), or "empirical": the class's own samples (``samples``; build it with :meth:`empirical`),
    which then define the mean (the scenario's P_i, D_i must agree, :meth:`check_means`). Hashable:
    the api compiles one program per law; :meth:`arrays` passes it as data instead."""

    prompt: str = "exponential"
    output: str = "exponential"
    cv: float = 1.0
    samples: EmpiricalSamples | None = None

    def __post_init__(self):
        for name in ("prompt", "output"):
            v = getattr(self, name)
            if v not in LAWS:
                raise ValueError(f"invalid ServiceLaw field '{name}': must be one of {', '.join(LAWS)}, got {v!r}")
        cv = self.cv
        if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not math.isfinite(cv) or not cv > 0:
            raise ValueError(f"invalid ServiceLaw field 'cv': must be a finite number > 0, got {cv!r}")
        # cv only shapes lognormal phases: normalised otherwise, so equal behaviour means equal laws
        object.__setattr__(self, "cv", float(cv) if "lognormal" in (self.prompt, self.output) else 1.0)
        if self.samples is not None and not isinstance(self.samples, EmpiricalSamples):
            raise ValueError(f"invalid ServiceLaw field 'samples': must be EmpiricalSamples or None (build an "
                             f"empirical law with ServiceLaw.empirical), got {type(self.samples).__name__}")
        for phase, name in ((PROMPT, "prompt"), (OUTPUT, "output")):
            empirical = getattr(self, name) == "empirical"
            if empirical and (self.samples is None or not self.samples.has(phase)):
                raise ValueError(f"invalid ServiceLaw field '{name}': the 'empirical' law needs samples for every "
                                 f"class (ServiceLaw.empirical({name}_samples=...))")
            if not empirical and self.samples is not None and np.any(self.samples.count[phase] > 0):
                raise ValueError(f"invalid ServiceLaw field 'samples': {name} samples given but the {name} law "
                                 f"is {getattr(self, name)!r}, not 'empirical'")

    @classmethod
    def empirical(cls, prompt_samples=None, output_samples=None, *, other: str = "exponential",
                  cv: float = 1.0) -> ServiceLaw:
        """Lengths drawn from per-class samples (tokens, e.g. a trace's): ``prompt_samples`` and
        ``output_samples`` are lists with one 1-D array per class (any sizes: they are sorted and padded).
        A phase given None follows the law ``other`` (with ``cv``) instead. A length is
        samples_i[floor(u x count_i)] for one uniform u (the empirical quantile): the class's
        empirical distribution, so its mean is the sample mean."""
        samples = EmpiricalSamples.of(prompt_samples, output_samples)
        return cls(prompt="empirical" if prompt_samples is not None else other,
                   output="empirical" if output_samples is not None else other, cv=cv, samples=samples)

    @property
    def num_classes(self) -> int | None:
        """The classes the samples are for (None without samples: a law for any number of classes)."""
        return None if self.samples is None else int(self.samples.count.shape[1])

    def means(self):
        """(prompt, output) per-class sample means of the empirical phases (None for the others)."""
        if self.samples is None:
            return None, None
        m = self.samples.means()
        return (m[PROMPT] if self.prompt == "empirical" else None, m[OUTPUT] if self.output == "empirical" else None)

    def check_means(self, P, D, rtol: float = MEAN_RTOL) -> None:
        """Raise ValueError unless the samples are for len(P) classes and their means agree with the
        scenario's P_i, D_i (``classes.P``, ``classes.D``) to ``rtol``: the LP, the static plan and the
        revenue use those means, the engine the samples. :meth:`with_means` sets them."""
        if self.samples is None:
            return
        if self.num_classes != len(P):
            raise ValueError(f"invalid field 'service': the empirical samples are for {self.num_classes} classes, "
                             f"the scenario has {len(P)}")
        for field, want, got in (("classes.P", P, self.means()[0]), ("classes.D", D, self.means()[1])):
            if got is None:
                continue
            want = np.asarray(want, np.float64)
            bad = np.abs(got - want) > rtol * np.abs(got)
            if np.any(bad):
                i = int(np.argmax(bad))
                raise ValueError(f"invalid scenario field '{field}': must equal the empirical samples' mean within "
                                 f"{rtol:g} (relative), got {field}[{i}] = {want[i]:g} against the sample mean "
                                 f"{got[i]:.6g}; use ServiceLaw.with_means(scenario)")

    def with_means(self, scenario):
        """``scenario`` with classes.P and classes.D set to the sample means of the empirical phases."""
        p, d = self.means()
        changes = {}
        if p is not None:
            changes["classes.P"] = p
        if d is not None:
            changes["classes.D"] = d
        return scenario.replace(**changes) if changes else scenario

    @classmethod
    def of(cls, law: ServiceLaw | str | None, cv: float | None = None) -> ServiceLaw:
        """A law from a ServiceLaw, a kind name (that law for both phases) or None (exponential)."""
        if law is None:
            law = "exponential"
        if isinstance(law, ServiceLaw):
            return law if cv is None else dataclasses.replace(law, cv=cv)
        if isinstance(law, str):
            if law == "empirical":
                raise ValueError("invalid field 'service': the 'empirical' law needs samples: build it with "
                                 "ServiceLaw.empirical(prompt_samples, output_samples)")
            if law not in LAWS:
                raise ValueError(f"invalid field 'service': must be a ServiceLaw or one of "
                                 f"{', '.join(LAWS[:EMPIRICAL])}, got {law!r}")
            return cls(law, law, 1.0 if cv is None else cv)
        raise ValueError(f"invalid field 'service': must be a ServiceLaw or one of {', '.join(LAWS[:EMPIRICAL])}, "
                         f"got {law!r}")

    @property
    def is_exponential(self) -> bool:
        return self.prompt == "exponential" and self.output == "exponential"

    def label(self) -> str:
        parts = []
        for kind in dict.fromkeys((self.prompt, self.output)):
            parts.append(f"lognormal(cv={self.cv:g})" if kind == "lognormal" else kind)
        if self.samples is not None and self.prompt == self.output:
            return f"empirical ({int(self.samples.count.max())} samples at most per class)"
        if self.prompt == self.output:
            return parts[0]
        return f"prompt {parts[0]}, output {parts[-1]}"

    def arrays(self, jobs: TraceJobs | JobTable | None = None) -> LawArrays:
        """The law as arrays, to pass it to jitted code as data (one compile for every law; an empirical
        law's samples are arrays too, one compile per padded sample count); ``jobs``: a trace to replay."""
        extra = {} if jobs is None else {"jobs": jobs if isinstance(jobs, JobTable) else jobs.arrays()}
        if self.samples is not None:
            extra |= {"samples": jnp.asarray(self.samples.values, jnp.float64),
                      "count": jnp.asarray(self.samples.count, _I32)}
        return LawArrays(kind=jnp.asarray([LAWS.index(self.prompt), LAWS.index(self.output)], _I32),
                         cv=jnp.asarray(self.cv, jnp.float64), **extra)


class JobTable(eqx.Module):
    """A trace's own jobs as arrays, per class in arrival order: ``arrival`` (I, J) each job's arrival
    time (s, float64, nondecreasing; +inf past the class's last job, and the last column is always
    +inf), ``prompt`` and ``output`` (I, J) its token counts. Built by :meth:`TraceJobs.arrays`."""

    arrival: Float[Array, "I J"]
    prompt: Float[Array, "I J"]
    output: Float[Array, "I J"]


@dataclasses.dataclass(frozen=True, eq=False)
class TraceJobs:
    """The jobs of a trace to replay: per class, each job's arrival time and its own prompt and output
    tokens. A replay runs them through the general engine as they are (no arrival or length is drawn;
    patience stays exponential with the scenario's theta, and a randomised policy still draws its
    choices), so each replica is the trace itself and replicas differ only in abandonments and the
    policy's own draws. Job j of class i is the j-th of that class by arrival time (ties keep the
    trace's order)."""

    arrival: tuple  # per class: (J_i,) float64 arrival times (s), nondecreasing
    prompt: tuple  # per class: (J_i,) tokens
    output: tuple

    @classmethod
    def of(cls, arrival_s, prompt_tokens, output_tokens, labels, num_classes: int) -> TraceJobs:
        """From one row per job (any order): arrival time (s, >= 0), tokens (> 0) and class label in
        0..num_classes-1."""
        t = np.asarray(arrival_s, np.float64)
        p, d = (np.asarray(x, np.float64) for x in (prompt_tokens, output_tokens))
        lab = np.asarray(labels)
        if not (t.ndim == 1 and t.shape == p.shape == d.shape == lab.shape and t.size):
            raise ValueError(f"invalid field 'jobs': arrival times, prompt tokens, output tokens and labels must be "
                             f"1-D arrays of one equal, non-zero length, got shapes {t.shape}, {p.shape}, {d.shape}, "
                             f"{lab.shape}")
        for name, x in (("arrival_s", t), ("prompt_tokens", p), ("output_tokens", d)):
            lo = 0.0 if name == "arrival_s" else np.nextafter(0.0, 1.0)
            if not np.all(np.isfinite(x)) or np.any(x < lo):
                raise ValueError(f"invalid field 'jobs.{name}': must be finite and {'>= 0' if lo == 0 else '> 0'}, got "
                                 f"{x[~np.isfinite(x) | (x < lo)][:3]!r}")
        if not np.issubdtype(lab.dtype, np.integer) or np.any((lab < 0) | (lab >= num_classes)):
            raise ValueError(f"invalid field 'jobs.labels': must be integers in 0..{num_classes - 1}, got "
                             f"{np.unique(lab)[:8]!r}")
        order = np.argsort(t, kind="stable")
        per = [order[lab[order] == i] for i in range(num_classes)]
        return cls(arrival=tuple(t[o] for o in per), prompt=tuple(p[o] for o in per), output=tuple(d[o] for o in per))

    @property
    def num_classes(self) -> int:
        return len(self.arrival)

    def counts(self) -> np.ndarray:
        return np.array([len(a) for a in self.arrival])

    def arrays(self, width: int | None = None) -> JobTable:
        """Padded to J = ``width`` columns (default: a power of two above the largest class's count, so
        traces of similar sizes share one program), the padding's arrival +inf and tokens 1."""
        need = int(self.counts().max()) + 1
        width = _pad_width(need) if width is None else int(width)
        if width < need:
            raise ValueError(f"invalid field 'width': {width} columns hold fewer than this trace's {need - 1} jobs "
                             f"of one class plus the closing +inf")
        out = []
        for per_class, fill in ((self.arrival, np.inf), (self.prompt, 1.0), (self.output, 1.0)):
            a = np.full((self.num_classes, width), fill)
            for i, x in enumerate(per_class):
                a[i, :len(x)] = x
            out.append(jnp.asarray(a, jnp.float64))
        return JobTable(*out)


def stack_jobs(traces) -> JobTable:
    """One job table per replica, (R, I, J), from R :class:`TraceJobs` of one class count: replica r
    replays ``traces[r]`` (a trace generated per replica, for example by resampling). J fits the
    largest."""
    traces = list(traces)
    if not traces or any(not isinstance(t, TraceJobs) for t in traces):
        raise ValueError("invalid field 'replay': must be a TraceJobs or a non-empty sequence of TraceJobs "
                         "(one per replica)")
    if len({t.num_classes for t in traces}) != 1:
        raise ValueError(f"invalid field 'replay': the replicas' traces have different class counts "
                         f"{sorted({t.num_classes for t in traces})}")
    width = _pad_width(max(int(t.counts().max()) for t in traces) + 1)
    tables = [t.arrays(width) for t in traces]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *tables)


class LawArrays(eqx.Module):
    """A :class:`ServiceLaw` as arrays: ``kind`` (prompt, output) indexes LAWS; ``cv`` as there;
    ``samples`` and ``count`` the empirical law's sorted samples per (phase, class) and how many of each
    row are real (None for the parametric laws: their pytree has no such leaves). Stack several with
    ``jax.tree_util.tree_map(jnp.stack, ...)`` to ``vmap`` over laws."""

    kind: Int[Array, " 2"]
    cv: Float[Array, ""]
    samples: Float[Array, "2 I K"] | None = None
    count: Int[Array, "2 I"] | None = None
    jobs: JobTable | None = None  # a trace replay: each job's own arrival time and tokens


def empirical_quantile(u, samples, count):
    """The empirical quantile of the first ``count`` entries of sorted ``samples`` (K,) at ``u`` in [0, 1):
    samples[floor(u x count)], so each sample is drawn with probability 1/count."""
    index = jnp.floor(u * count.astype(jnp.float64)).astype(_I32)
    return samples[jnp.clip(index, 0, jnp.maximum(count, 1) - 1)]


def draw_length(key, kind, mean, cv, samples=None, count=None):
    """One length with mean ``mean`` (float64) of law ``kind`` (a name in LAWS or its index, possibly
    traced), from one uniform: exponential by inversion, lognormal through the normal quantile,
    empirical through ``samples``/``count`` (one row: :func:`empirical_quantile`; ``mean`` unused).
    Consumes ``key``."""
    kind = LAWS.index(kind) if isinstance(kind, str) else kind
    u = jax.random.uniform(key, dtype=jnp.float64)
    s2 = jnp.log1p(jnp.square(jnp.asarray(cv, jnp.float64)))  # lognormal with E = 1, std = cv
    lognormal = jnp.exp(jnp.sqrt(s2) * jax.scipy.special.ndtri(u) - 0.5 * s2)
    unit = jnp.where(kind == 0, -jnp.log1p(-u), jnp.where(kind == 1, 1.0, lognormal))
    length = jnp.asarray(mean, jnp.float64) * unit
    if samples is None:
        return length
    return jnp.where(kind == EMPIRICAL, empirical_quantile(u, samples, count), length)


def phase_speeds(model):
    """(prefill, slow decode, fast decode) speeds in tokens/s: C/tau, 1/tau, gamma. Divided by P_i, D_i,
    D_i they are mu_p, mu_m, mu_s (MODEL.md eq. 4)."""
    tau = model.alpha + model.beta * model.C
    return model.C / tau, 1.0 / tau, model.gamma




def first_argmin(x):
    """``jnp.argmin`` of a 1-D array (the first minimum) by two plain reductions, the minimum and then
    the least index attaining it: XLA's CPU argmin is a variadic (value, index) reduce, several times
    slower per entry (docs/simulation.md, "What a step costs"). Without a NaN the same index."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == jnp.min(x), index, x.shape[-1])), x.shape[-1] - 1)


def first_argmin_2d(x):
    """(row, column) of the first minimum of a 2-D array in row-major order, as ``divmod(jnp.argmin(
    x.ravel()), x.shape[1])`` would give: row minima (one plain pass), then :func:`first_argmin` over
    the rows, then over that row."""
    row = first_argmin(jnp.min(x, axis=1))
    return row, first_argmin(x[row])


class JobArrays(AbstractGpuArrays):
    """The per-GPU arrays plus each job's remaining work, stored as the absolute time at which it
    finishes at its current speed (see :func:`remaining_work` for the tokens left)."""

    group: Int[Array, " n"]
    prefill_class: Int[Array, " n"]
    decodes: Int[Array, "n I"]
    ndec: Int[Array, " n"]
    prefill_finish: Float[Array, " n"]  # when the running prefill finishes (+inf if none)
    decode_finish: Float[Array, "n S"]  # when each decode slot's stream finishes at its GPU's speed (+inf: empty)
    decode_class: Int[Array, "n S"]  # class in each decode slot, -1 if empty
    length_keys: Key[Array, "2 I"]  # the length stream of each (phase, class) (see the module docstring)
    # a replay's job index of each running prefill and decode slot (-1: none); None without a replay
    prefill_job: Int[Array, " n"] | None = None
    decode_job: Int[Array, "n S"] | None = None
    # a replay's first-token time of each decode slot's job (its prefill's end), and the counts of its
    # jobs' latencies (LATENCIES x class x bin; see LATENCY_BINS), of the jobs that arrived after the
    # warm-up: TTFT at each prefill's end, TPOT and end-to-end at each decode's
    decode_first: Float[Array, "n S"] | None = None
    latency_counts: Int[Array, "3 I B"] | None = None


def remaining_work(spec: SimSpec, params: SimParams, state):
    """Tokens left: (of each GPU's prefill (n,), of each decode slot (n, max_batch)); 0 where empty.
    Works on one replica or a batch (leading axes)."""
    pre, slow, fast = phase_speeds(params.model)
    jobs = state.gpus
    t = state.t[..., None]
    speed = jnp.where(runs_slow(spec.convention, jobs.group, jobs.prefill_class), slow, fast)
    left_p = jnp.where(jobs.prefill_class >= 0, (jobs.prefill_finish - t) * pre, 0.0)
    left_d = jnp.where(jobs.decode_class >= 0, (jobs.decode_finish - t[..., None]) * speed[..., None], 0.0)
    return left_p, left_d


class PerJob(AbstractCluster):
    """One row per GPU (the exact engine's :class:`~jaxq.sim.exact.PerGpu`, wrapped) plus each job's
    remaining work; the next completion is the earliest finish."""

    spec: SimSpec = eqx.field(static=True)
    gpu: PerGpu
    law: LawArrays
    means: Float[Array, "2 I"]  # (P_i, D_i): the mean lengths, from the params of this run
    warmup: Float[Array, ""]  # a replay counts the latencies of the jobs that arrive after it
    speeds: Float[Array, " 3"]  # tokens/s of a prefill, a slow decode, a fast decode (phase_speeds)

    def __init__(self, spec: SimSpec, params: SimParams, law: LawArrays):
        if spec.max_batch is None:
            raise ValueError("invalid SimSpec field 'max_batch': the general engine needs it (the batch size B "
                             "fixes its decode slots per GPU); see jaxq.sim.batch.engine_spec")
        self.spec, self.gpu, self.law = spec, PerGpu(spec), law
        self.means = jnp.stack([params.model.P, params.model.D]).astype(jnp.float64)
        self.warmup = jnp.asarray(params.warmup, jnp.float64)
        self.speeds = jnp.stack([jnp.asarray(v, jnp.float64) for v in phase_speeds(params.model)])

    def init(self, params, groups, service_key):
        n, S, num = self.spec.num_gpus, self.spec.max_batch, self.spec.num_classes
        base = GpuArrays.empty(groups, num)
        length_key = jax.random.fold_in(service_key, 2**31 - 1)
        keys = jax.vmap(lambda p: jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(length_key, p), c))(
            jnp.arange(num)))(jnp.arange(2))
        replay = self.law.jobs is not None
        return JobArrays(group=base.group, prefill_class=base.prefill_class, decodes=base.decodes, ndec=base.ndec,
                         prefill_finish=jnp.full((n,), jnp.inf), decode_finish=jnp.full((n, S), jnp.inf),
                         decode_class=jnp.full((n, S), -1, _I32), length_keys=keys,
                         prefill_job=jnp.full((n,), -1, _I32) if replay else None,
                         decode_job=jnp.full((n, S), -1, _I32) if replay else None,
                         decode_first=jnp.full((n, S), jnp.inf) if replay else None,
                         latency_counts=jnp.zeros((len(LATENCIES), num, LATENCY_BINS + 2), _I32) if replay else None)

    def job_table(self):
        return self.law.jobs

    def running_job(self, state, row):
        return state.gpus.prefill_job[jnp.maximum(row, 0)]

    def rows(self, state):
        return self.gpu.rows(state)

    def _draw(self, state, phase: int, c, index, job=None):
        kind = self.law.kind[phase]
        c = jnp.maximum(c, 0)
        if job is not None:  # a replay: the job's own tokens
            table = self.law.jobs.prompt if phase == PROMPT else self.law.jobs.output
            return table[c, jnp.clip(job, 0, table.shape[1] - 1)]
        mean = self.means[phase, c]
        key = jax.random.fold_in(state.gpus.length_keys[phase, c], index)
        if self.law.samples is None:
            return draw_length(key, kind, mean, self.law.cv)
        return draw_length(key, kind, mean, self.law.cv, self.law.samples[phase, c], self.law.count[phase, c])

    def _decode_speed(self, state, g):
        jobs = state.gpus
        slow = runs_slow(self.spec.convention, jobs.group[g], jobs.prefill_class[g])
        return jnp.where(slow, self.speeds[1], self.speeds[2])

    def _rescale(self, state, g, old_speed, do):
        """GPU g's decode speed changed from ``old_speed``: its streams' remaining work (finish - t) x
        speed is kept, so their finish times move. Only GPU g changes speed at this instant."""
        new_speed = self._decode_speed(state, g)
        row = state.gpus.decode_finish[g]
        moved = jnp.where(jnp.isfinite(row), state.t + (row - state.t) * (old_speed / new_speed), row)
        return eqx.tree_at(lambda s: s.gpus.decode_finish, state,
                           state.gpus.decode_finish.at[g].set(jnp.where(do & (new_speed != old_speed), moved, row)))

    # -- the functions that change a GPU: the per-GPU ones, plus the per-job work ---------------------
    def start_prefill(self, state, row, cls, do, job=None):
        index = state.totals[ADMITTED, jnp.maximum(cls, 0)]  # counted by the caller after this returns
        old_speed = self._decode_speed(state, row)
        state = self._rescale(self.gpu.start_prefill(state, row, cls, do), row, old_speed, do)
        end = state.t + self._draw(state, PROMPT, cls, index, job) / self.speeds[0]
        finish = state.gpus.prefill_finish
        state = eqx.tree_at(lambda s: s.gpus.prefill_finish, state, finish.at[row].set(jnp.where(do, end, finish[row])))
        return self._set_job(state, "prefill_job", row, None, job, do)

    def _count_latencies(self, state, cls, job, arrival, values, do):
        """Count job ``job`` of class ``cls``'s latencies ``values`` ({latency index: seconds}) in their
        bins where ``do`` and the job arrived (at ``arrival``) after the warm-up (one scatter-add)."""
        c = jnp.maximum(cls, 0)
        do = do & (job >= 0) & (cls >= 0) & (arrival >= self.warmup)
        kinds = jnp.asarray(list(values), _I32)
        bins = latency_bin(jnp.stack(list(values.values())))
        counts = state.gpus.latency_counts.at[kinds, c, bins].add(do.astype(_I32))
        return eqx.tree_at(lambda s: s.gpus.latency_counts, state, counts)

    def _set_job(self, state, name, row, slot, job, do):
        """Record (``job``) or clear (None) a replay's job index in a prefill or decode slot."""
        table = getattr(state.gpus, name)
        if table is None:
            return state
        at = row if slot is None else (row, slot)
        value = jnp.where(do, -1 if job is None else job, table[at])
        return eqx.tree_at(lambda s: getattr(s.gpus, name), state, table.at[at].set(value))

    def finish_prefill(self, state, row, do):
        if state.gpus.prefill_job is not None:
            g = jnp.maximum(row, 0)
            c, j = state.gpus.prefill_class[g], state.gpus.prefill_job[g]
            arrival = self.law.jobs.arrival[jnp.maximum(c, 0), jnp.maximum(j, 0)]
            state = self._count_latencies(state, c, j, arrival, {TTFT: state.t - arrival}, do)
        old_speed = self._decode_speed(state, row)
        state, c, after = self.gpu.finish_prefill(state, row, do)
        state = self._rescale(state, row, old_speed, do)
        finish = state.gpus.prefill_finish
        state = eqx.tree_at(lambda s: s.gpus.prefill_finish, state, finish.at[row].set(jnp.where(do, jnp.inf, finish[row])))
        return self._set_job(state, "prefill_job", row, None, None, do), c, after

    def add_decode(self, state, row, cls, do, job=None, first=None):
        """``job``, ``first``: a replay's job index and its first token's time (its prefill's end)."""
        do = do & (row >= 0) & (cls >= 0)
        gg, cc = jnp.maximum(row, 0), jnp.maximum(cls, 0)
        index = state.totals[DECODE_STARTED, cc]  # counted by the caller after this returns
        state = self.gpu.add_decode(state, row, cls, do)
        jobs = state.gpus
        free = jobs.decode_class[gg] < 0
        slot = jnp.argmax(free)
        ok = do & free[slot]
        end = state.t + self._draw(state, OUTPUT, cls, index, job) / self._decode_speed(state, gg)
        state = eqx.tree_at(
            lambda s: (s.gpus.decode_finish, s.gpus.decode_class, s.status), state,
            (jobs.decode_finish.at[gg, slot].set(jnp.where(ok, end, jobs.decode_finish[gg, slot])),
             jobs.decode_class.at[gg, slot].set(jnp.where(ok, cc, jobs.decode_class[gg, slot])),
             state.status | jnp.where(do & ~ok, CAPACITY_VIOLATED, 0)))
        if first is not None:
            table = state.gpus.decode_first
            state = eqx.tree_at(lambda s: s.gpus.decode_first, state,
                                table.at[gg, slot].set(jnp.where(ok, first, table[gg, slot])))
        return self._set_job(state, "decode_job", gg, slot, job, ok)

    def remove_decode(self, state, row, cls, slot, do):
        if state.gpus.decode_job is not None:
            g = jnp.maximum(row, 0)
            j = state.gpus.decode_job[g, slot]
            at = (jnp.maximum(cls, 0), jnp.maximum(j, 0))
            arrival, output = self.law.jobs.arrival[at], self.law.jobs.output[at]
            values = {TPOT: (state.t - state.gpus.decode_first[g, slot]) / output, END_TO_END: state.t - arrival}
            state = self._count_latencies(state, cls, j, arrival, values, do & (row >= 0))
        state = self.gpu.remove_decode(state, row, cls, slot, do)
        do = do & (row >= 0) & (cls >= 0)
        gg = jnp.maximum(row, 0)
        jobs = state.gpus
        state = eqx.tree_at(
            lambda s: (s.gpus.decode_finish, s.gpus.decode_class), state,
            (jobs.decode_finish.at[gg, slot].set(jnp.where(do, jnp.inf, jobs.decode_finish[gg, slot])),
             jobs.decode_class.at[gg, slot].set(jnp.where(do, -1, jobs.decode_class[gg, slot]))))
        return self._set_job(state, "decode_job", gg, slot, None, do)

    def next_event(self, key, model, state):
        """The earliest of an abandonment (a Gillespie clock on theta x waiting jobs, redrawn at every
        event: memoryless) and the earliest finish over prefills and decode slots."""
        num = self.spec.num_classes
        m = model
        u = jax.random.uniform(key, (3,), dtype=jnp.dtype(self.spec.dtype))
        # abandonment: [prefill queues | decode buffers]
        rates = jnp.concatenate([m.theta * state.q_p, (m.theta[None, :] * state.q_d).ravel()])
        total = jnp.sum(rates)
        dt_abandon = jnp.where(total > 0, -jnp.log1p(-u[0]) / jnp.where(total > 0, total, 1), jnp.inf)
        t_abandon = state.t + dt_abandon.astype(jnp.float64)
        e = weighted_index(u[1], rates)
        in_buffer = e >= num
        c_ab = jnp.where(in_buffer, (e - num) % num, e).astype(_I32)
        b = jnp.where(in_buffer, (e - num) // num, 0).astype(_I32)
        room_count = jnp.where(in_buffer, state.q_d[b, c_ab] if state.q_d.shape[0] else 0, state.q_p[c_ab])
        pos = jnp.minimum(jnp.floor(u[2] * room_count), room_count - 1).astype(_I32)
        # completions: the earliest finish over prefills and decode slots (absolute float64 times)
        jobs = state.gpus
        g_pre = first_argmin(jobs.prefill_finish)
        g_dec, slot_dec = first_argmin_2d(jobs.decode_finish)
        t_pre, t_dec = jobs.prefill_finish[g_pre], jobs.decode_finish[g_dec, slot_dec]
        is_prefill = t_pre <= t_dec
        t_done = jnp.minimum(t_pre, t_dec)
        is_done = t_done <= t_abandon
        g = jnp.where(is_prefill, g_pre, g_dec).astype(_I32)
        slot = jnp.where(is_prefill, 0, slot_dec).astype(_I32)
        c_done = jnp.where(is_prefill, jobs.prefill_class[g], jobs.decode_class[g, slot])
        kind = jnp.where(is_done, jnp.where(is_prefill, PREFILL, DECODE),
                         jnp.where(in_buffer, ABANDON_BUFFER, ABANDON_QUEUE)).astype(_I32)
        return Event(t=jnp.minimum(t_abandon, t_done), kind=kind, job_class=jnp.where(is_done, c_done, c_ab).astype(_I32),
                     buffer=b, pos=pos, row=g, slot=slot)

    def consistent(self, state):
        return jnp.bool_(True)
