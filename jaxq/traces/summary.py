"""Summary statistics and plots of a :class:`~jaxq.traces.reader.Trace` (``jaxq trace summary``).

Rates: ``requests / duration`` with duration the span of the arrivals (last minus first). Rates per bin
count the arrivals in consecutive bins of ``bin_s`` seconds from the first request; only full bins are
used (a last, shorter bin would be noisier and biased low), and a trace shorter than one bin has none.
Lengths: mean, median, 90th and 99th percentiles (linear interpolation), coefficient of variation
(sample standard deviation over the mean); the correlation is Pearson's, of log prompt and log output
length.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .reader import Trace

FIVE_MINUTES_S = 300.0
# at most this many points in the joint scatter (a fixed-seed subsample beyond), so a 1e6-row trace plots fast
SCATTER_POINTS = 50_000


@dataclasses.dataclass(frozen=True)
class LengthStats:
    mean: float
    median: float
    p90: float
    p99: float
    cv: float
    min: int
    max: int

    @classmethod
    def of(cls, x: np.ndarray) -> "LengthStats":
        x = np.asarray(x, dtype=np.float64)
        sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(mean=float(x.mean()), median=float(p50), p90=float(p90), p99=float(p99),
                   cv=sd / float(x.mean()), min=int(x.min()), max=int(x.max()))


@dataclasses.dataclass(frozen=True)
class BinnedRate:
    """Arrival rate (requests/s) in consecutive full bins of ``bin_s`` seconds."""

    bin_s: float
    rates: np.ndarray = dataclasses.field(repr=False)

    @classmethod
    def of(cls, arrival_s: np.ndarray, bin_s: float) -> "BinnedRate":
        full = int(np.floor((arrival_s[-1] - arrival_s[0]) / bin_s))
        if full == 0:
            return cls(bin_s=bin_s, rates=np.zeros(0))
        counts = np.bincount(((arrival_s - arrival_s[0]) // bin_s).astype(np.int64), minlength=full + 1)[:full]
        return cls(bin_s=bin_s, rates=counts / bin_s)

    @property
    def num_bins(self) -> int:
        return len(self.rates)

    def describe(self) -> str:
        if self.num_bins == 0:
            return f"none (the trace is shorter than one {self.bin_s:g} s bin)"
        r = self.rates
        cv = r.std(ddof=1) / r.mean() if self.num_bins > 1 and r.mean() > 0 else float("nan")
        return (f"min {r.min():.3g}, max {r.max():.3g}, CV {cv:.2f} over {self.num_bins} full bins of "
                f"{self.bin_s:g} s")


@dataclasses.dataclass(frozen=True)
class TraceSummary:
    source: str
    schema: str
    origin: str
    requests: int
    dropped: int
    duration_s: float
    mean_rate: float  # requests / duration, per second
    gap_cv: float  # coefficient of variation of the gaps between arrivals (1 for a Poisson process)
    per_bin: BinnedRate
    per_5min: BinnedRate
    prompt: LengthStats
    output: LengthStats
    log_corr: float  # Pearson correlation of log prompt and log output length

    def format(self) -> str:
        lines = [
            f"trace {self.source} ({self.schema} schema): first request at {self.origin}",
            f"  requests: {self.requests:,}" + (f"  ({self.dropped:,} bad rows dropped)" if self.dropped else ""),
            f"  duration: {self.duration_s:,.1f} s (first to last arrival)",
            f"  mean rate: {self.mean_rate:.4g} requests/s; CV of the gaps between arrivals {self.gap_cv:.2f} "
            "(1 for Poisson arrivals)",
            f"  rate per {self.per_bin.bin_s:g} s bin: {self.per_bin.describe()}",
            f"  rate per 5-minute bin: {self.per_5min.describe()}",
        ]
        if 0 < self.per_5min.num_bins <= 24:
            lines.append("    " + " ".join(f"{r:.2f}" for r in self.per_5min.rates))
        lines.append(f"  {'tokens':<8}{'mean':>9}{'median':>9}{'p90':>9}{'p99':>9}{'CV':>7}{'min':>7}{'max':>8}")
        for name, s in (("prompt", self.prompt), ("output", self.output)):
            lines.append(f"  {name:<8}{s.mean:>9.1f}{s.median:>9.1f}{s.p90:>9.1f}{s.p99:>9.1f}{s.cv:>7.2f}"
                         f"{s.min:>7d}{s.max:>8d}")
        lines.append(f"  correlation of log prompt and log output length: {self.log_corr:.3f}")
        return "\n".join(lines)


def summarize(trace: Trace, *, bin_s: float = 60.0) -> TraceSummary:
    """The statistics ``jaxq trace summary`` prints (module docstring)."""
    if not (np.isfinite(bin_s) and bin_s > 0):
        raise ValueError(f"bin: must be a number of seconds > 0, got {bin_s!r}")
    if trace.num_requests < 2 or trace.duration_s <= 0:
        raise ValueError(f"{trace.source}: a summary needs at least two requests at different times, got "
                         f"{trace.num_requests} over {trace.duration_s:g} s")
    t = trace.arrival_s
    gaps = np.diff(t)
    lp, lo = np.log(trace.prompt_tokens), np.log(trace.output_tokens)
    corr = float(np.corrcoef(lp, lo)[0, 1]) if lp.std() > 0 and lo.std() > 0 else float("nan")
    return TraceSummary(
        source=trace.source, schema=trace.schema, origin=trace.origin, requests=trace.num_requests,
        dropped=trace.dropped, duration_s=trace.duration_s, mean_rate=trace.num_requests / trace.duration_s,
        gap_cv=float(gaps.std(ddof=1) / gaps.mean()) if len(gaps) > 1 else float("nan"),
        per_bin=BinnedRate.of(t, float(bin_s)), per_5min=BinnedRate.of(t, FIVE_MINUTES_S),
        prompt=LengthStats.of(trace.prompt_tokens), output=LengthStats.of(trace.output_tokens), log_corr=corr,
    )


def _log_bins(x: np.ndarray, per_decade: int = 20) -> np.ndarray:
    lo, hi = np.log10(max(x.min(), 1) * 0.999), np.log10(x.max() * 1.001)
    return np.logspace(lo, hi, max(int(np.ceil((hi - lo) * per_decade)), 1) + 1)


def plot_summary(trace: Trace, out_dir: str | os.PathLike, *, bin_s: float = 60.0) -> list[Path]:
    """Write rate.png (arrivals per ``bin_s`` bin), lengths.png (prompt and output histograms, log
    axes) and joint.png (output against prompt length, log-log) into ``out_dir``; returns their paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(trace.source).name
    t = trace.arrival_s
    paths = []

    binned = BinnedRate.of(t, bin_s)
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    if binned.num_bins:
        ax.step(np.arange(binned.num_bins + 1) * bin_s / 60.0, np.r_[binned.rates, binned.rates[-1]], where="post")
    ax.axhline(trace.num_requests / trace.duration_s, color="gray", ls="--", lw=1, label="mean")
    ax.set(xlabel="minutes from the first request", ylabel="requests/s",
           title=f"{name}: arrival rate per {bin_s:g} s bin")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    paths.append(out / "rate.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    for k, (label, x) in enumerate((("prompt", trace.prompt_tokens), ("output", trace.output_tokens))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.hist(x, bins=_log_bins(x), color=f"C{k}")
        ax.set_xscale("log")
        ax.axvline(x.mean(), color="k", ls="--", lw=1, label=f"mean {x.mean():.0f}")
        ax.set(xlabel=f"{label} length (tokens, log scale)", ylabel="requests", title=f"{label} lengths")
        ax.legend()
    fig.suptitle(name)
    paths.append(out / "lengths.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    idx = np.arange(trace.num_requests)
    note = ""
    if len(idx) > SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, SCATTER_POINTS, replace=False))
        note = f" ({SCATTER_POINTS:,} of {trace.num_requests:,} requests)"
    ax.scatter(trace.prompt_tokens[idx], trace.output_tokens[idx], s=3, alpha=0.25, lw=0, rasterized=True)
    ax.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="output length (tokens)",
           title=f"{name}: joint lengths{note}")
    paths.append(out / "joint.png")
    fig.savefig(paths[-1], dpi=120)
    return paths
