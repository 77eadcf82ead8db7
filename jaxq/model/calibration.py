"""Calibrate the iteration-time law (MODEL.md §1.2) from measurements.

Two routes, both host-side NumPy/SciPy:

* **Your own engine** (the paper's method, MODEL.md §7.1): run mixed iterations at several prefill
  chunk sizes C and record the mean iteration time, run decode-only ("solo") batches and record the
  per-stream token speed. :func:`fit_mixed_law` fits tau_mix(C) = alpha + beta*C by ordinary least
  squares, :func:`fit_gamma` takes gamma as the mean solo speed, and :func:`calibrate_from_csv` does
  both from a CSV file in the format below, returning a :class:`jaxq.model.IterationTime`.
* **Vidur operator profiles** (microsoft/vidur ``mlp.csv``, MODEL.md §10): per-layer times of the
  linear and norm operators against the number of tokens in the batch. :func:`fit_vidur_token_linear`
  stacks them for a given number of layers and fits the token-linear part of the law. It cannot give
  attention or CPU costs, so it yields beta and lower/upper bounds only; see :data:`VIDUR_LIMITATIONS`.

Measurement CSV format (:func:`load_measurements_csv`)
------------------------------------------------------
UTF-8, comma-separated, header row required, one measurement per row, blank lines ignored::

    mode,chunk_tokens,iteration_s,tokens_per_s
    mixed,256,0.03341,
    mixed,512,0.04912,
    solo,,,45.2

* ``mode``: ``mixed`` (a prefill chunk of ``chunk_tokens`` tokens ran alongside decodes) or ``solo``
  (decode-only iterations). Case and surrounding spaces are ignored.
* ``chunk_tokens``: prefill chunk size C in tokens (> 0). Mixed rows only; empty in solo rows.
* ``iteration_s``: iteration time in seconds (> 0), usually the mean over many iterations at that C.
  Mixed rows only; empty in solo rows.
* ``tokens_per_s``: per-stream decode speed in tokens/s (> 0), usually the mean over the streams of one
  run. Solo rows only; empty in mixed rows.
* ``note`` (optional column): free text, ignored.

Cells that do not apply must be empty rather than ignored, so a value typed in the wrong column is
reported instead of silently dropped. Any other column is an error (it is usually a misspelling, e.g.
``iteration_ms``). Bad input raises ``ValueError`` naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.optimize

from .scenario import IterationTime

MEASUREMENT_COLUMNS = ("mode", "chunk_tokens", "iteration_s", "tokens_per_s")
OPTIONAL_COLUMNS = ("note",)
MODES = ("mixed", "solo")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
EXAMPLE_MEASUREMENTS = DATA_DIR / "example_measurements.csv"
VIDUR_SAMPLE = DATA_DIR / "vidur_a100_meta-llama-3-8b_mlp_sample.csv"

# The law the shipped example was drawn from: the paper's Qwen-8B fit on A100 (MODEL.md §7.1).
PAPER_QWEN8B = {"alpha": 0.0174, "beta": 6.2e-5, "gamma": 45.45}


def _readonly(a) -> np.ndarray:
    arr = np.array(a, dtype=np.float64)
    arr.setflags(write=False)
    return arr


# ----------------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixedLawFit:
    """OLS fit of tau_mix(C) = alpha + beta*C.

    Standard errors are the textbook OLS ones (homoscedastic errors, n - 2 degrees of freedom); with
    exactly two points they are not estimable and are NaN. ``residual_std`` is sqrt(SSR / (n - 2)).
    ``cov_alpha_beta`` lets :meth:`tau_se` give the standard error of the fitted line at any C."""

    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    cov_alpha_beta: float
    r2: float
    n_points: int
    residual_std: float
    chunk_min: float
    chunk_max: float

    def tau(self, C: float) -> float:
        return self.alpha + self.beta * C

    def tau_se(self, C: float) -> float:
        """Standard error of the fitted mean iteration time at chunk size C."""
        var = self.alpha_se**2 + C**2 * self.beta_se**2 + 2.0 * C * self.cov_alpha_beta
        return math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan


def _as_positive_vector(name: str, values, *, allow_zero: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: must be finite numbers, got {arr[~np.isfinite(arr)][0]!r}")
    bad = arr < 0 if allow_zero else arr <= 0
    if np.any(bad):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {arr[bad][0]!r}")
    return arr


def _ols_line(x: np.ndarray, y: np.ndarray) -> MixedLawFit:
    n = len(x)
    design = np.column_stack([np.ones(n), x])
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - (intercept + slope * x)
    ssr = float(resid @ resid)
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else math.nan
    # Closed-form OLS covariance, written in centred x: better conditioned than inverting X^T X when
    # x spans 1..32768 tokens.
    sxx = float(((x - x.mean()) ** 2).sum())
    dof = n - 2
    s2 = ssr / dof if dof > 0 else math.nan
    xbar = float(x.mean())
    return MixedLawFit(
        alpha=float(intercept),
        beta=float(slope),
        alpha_se=math.sqrt(s2 * (1.0 / n + xbar**2 / sxx)) if dof > 0 else math.nan,
        beta_se=math.sqrt(s2 / sxx) if dof > 0 else math.nan,
        cov_alpha_beta=-xbar * s2 / sxx if dof > 0 else math.nan,
        r2=r2,
        n_points=n,
        residual_std=math.sqrt(s2) if dof > 0 else math.nan,
        chunk_min=float(x.min()),
        chunk_max=float(x.max()),
    )


def fit_mixed_law(chunk_tokens, iteration_s) -> MixedLawFit:
    """Fit tau_mix(C) = alpha + beta*C by ordinary least squares.

    ``chunk_tokens`` (C, tokens) and ``iteration_s`` (seconds) are paired 1-D sequences; each pair is
    one point of the regression (pass per-C means to fit as the paper did, see
    :func:`calibrate_from_csv`). At least two distinct chunk sizes are needed; three or more points
    give standard errors. The law only holds for C above the piecewise threshold b0 (MODEL.md §1.2),
    so leave out chunk sizes in the flat, overhead-dominated region."""
    x = _as_positive_vector("chunk_tokens", chunk_tokens)
    y = _as_positive_vector("iteration_s", iteration_s)
    if x.shape != y.shape:
        raise ValueError(f"chunk_tokens and iteration_s: must have the same length, got {len(x)} and {len(y)}")
    if len(np.unique(x)) < 2:
        raise ValueError(
            "chunk_tokens: must contain at least 2 distinct chunk sizes to fit a line, got "
            f"{sorted(set(x.tolist()))}"
        )
    return _ols_line(x, y)


@dataclasses.dataclass(frozen=True)
class GammaFit:
    """Solo decode token rate gamma (tokens/s per stream) as the mean of the measured speeds, with the
    standard error of that mean (NaN for a single measurement) and the sample standard deviation."""

    gamma: float
    gamma_se: float
    n_points: int
    std: float


def fit_gamma(tokens_per_s) -> GammaFit:
    """gamma = mean per-stream decode speed in solo mode (MODEL.md §7.1).

    The paper averages speeds, not step times, so 1/gamma is the harmonic mean of the runs' step
    times; the model uses gamma as a rate (mu_s = gamma/D, eq. 4), and rates are what get averaged."""
    v = _as_positive_vector("tokens_per_s", tokens_per_s)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("tokens_per_s: must contain at least one solo-decode speed")
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return GammaFit(gamma=float(v.mean()), gamma_se=std / math.sqrt(n) if n > 1 else math.nan,
                    n_points=n, std=std)


# ----------------------------------------------------------------------------------------------------
# Measurement CSV
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Measurements:
    """Rows of a measurement CSV, split by mode (arrays in file order, read-only)."""

    path: str
    chunk_tokens: np.ndarray
    iteration_s: np.ndarray
    tokens_per_s: np.ndarray

    @property
    def n_mixed(self) -> int:
        return len(self.chunk_tokens)

    @property
    def n_solo(self) -> int:
        return len(self.tokens_per_s)


def _cell_error(path, row: int, line: int, column: str, allowed: str, got) -> ValueError:
    return ValueError(f"{path}: row {row} (line {line}), column '{column}': must be {allowed}, got {got!r}")


def _parse_positive(path, row, line, column, text: str, what: str) -> float:
    allowed = f"a finite number > 0 ({what})"
    try:
        v = float(text)
    except ValueError:
        raise _cell_error(path, row, line, column, allowed, text) from None
    if not (math.isfinite(v) and v > 0):
        raise _cell_error(path, row, line, column, allowed, text)
    return v


def _data_rows(reader, path, header):
    """Yield (row number, line number, {column: stripped cell}) for the non-blank rows of a CSV,
    raising a ValueError that names the row when its field count differs from the header's."""
    row = 0
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        row += 1
        line = reader.line_num
        if len(fields) != len(header):
            raise ValueError(
                f"{path}: row {row} (line {line}): has {len(fields)} fields, the header has {len(header)} "
                f"({', '.join(header)})"
            )
        yield row, line, {name: value.strip() for name, value in zip(header, fields)}


def load_measurements_csv(path: str | os.PathLike) -> Measurements:
    """Read a measurement CSV (format in the module docstring). Checks every cell; the whole-file
    requirements (two chunk sizes, a solo row) are checked by :func:`calibrate_from_csv`."""
    path = Path(path)
    allowed_cols = ", ".join(MEASUREMENT_COLUMNS) + " (optional: " + ", ".join(OPTIONAL_COLUMNS) + ")"
    try:
        # utf-8-sig: spreadsheets often prepend a byte-order mark, which would corrupt the first name.
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{path}: cannot open measurement file: {err.strerror or err}") from err
    with fh:
        reader = csv.reader(fh)
        header = None
        header_line = 0
        for fields in reader:
            if any(f.strip() for f in fields):
                header = [f.strip() for f in fields]
                header_line = reader.line_num
                break
        if header is None:
            raise ValueError(f"{path}: empty file; the first line must be the header {allowed_cols}")
        for name in header:
            if name not in MEASUREMENT_COLUMNS and name not in OPTIONAL_COLUMNS:
                raise ValueError(
                    f"{path}: line {header_line}: unknown column {name!r}; allowed columns: {allowed_cols}"
                )
        for name in set(header):
            if header.count(name) > 1:
                raise ValueError(f"{path}: line {header_line}: column {name!r} appears twice in the header")
        for name in MEASUREMENT_COLUMNS:
            if name not in header:
                raise ValueError(
                    f"{path}: missing column '{name}' in the header (line {header_line}); required columns: "
                    + ", ".join(MEASUREMENT_COLUMNS)
                )

        chunks, iters, speeds = [], [], []
        for row, line, cells in _data_rows(reader, path, header):
            mode = cells["mode"].lower()
            if mode not in MODES:
                raise _cell_error(path, row, line, "mode", "one of " + ", ".join(MODES), cells["mode"])
            needed = ("chunk_tokens", "iteration_s") if mode == "mixed" else ("tokens_per_s",)
            for name in MEASUREMENT_COLUMNS[1:]:
                if name not in needed and cells[name] != "":
                    raise _cell_error(path, row, line, name, f"empty in a {mode} row", cells[name])
                if name in needed and cells[name] == "":
                    raise _cell_error(path, row, line, name, f"filled in a {mode} row", "")
            if mode == "mixed":
                chunks.append(_parse_positive(path, row, line, "chunk_tokens", cells["chunk_tokens"], "tokens"))
                iters.append(_parse_positive(path, row, line, "iteration_s", cells["iteration_s"], "seconds"))
            else:
                speeds.append(_parse_positive(path, row, line, "tokens_per_s", cells["tokens_per_s"],
                                              "tokens/s per stream"))
    return Measurements(path=str(path), chunk_tokens=_readonly(chunks), iteration_s=_readonly(iters),
                        tokens_per_s=_readonly(speeds))


def _se(se: float) -> str:
    return f"{se:.2g}" if math.isfinite(se) else "n/a (too few points)"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibrated iteration-time law with the statistics of the fits it came from."""

    timing: IterationTime
    mixed: MixedLawFit
    solo: GammaFit
    source: str
    n_mixed_rows: int
    averaged_repeats: bool

    def tau_mix(self, C: float) -> float:
        return self.timing.tau_mix(C)

    def to_toml(self) -> str:
        """A ``[timing]`` table that drops into a scenario file (jaxq/scenarios/*.toml)."""
        m, s = self.mixed, self.solo
        how = "per-C means" if self.averaged_repeats else "rows"
        return (
            f"# calibrated by `jaxq calibrate` from {Path(self.source).name}: OLS on {m.n_points} {how}, "
            f"C in [{m.chunk_min:g}, {m.chunk_max:g}], R^2 = {m.r2:.4f}; gamma = mean of {s.n_points} solo speeds\n"
            f"[timing]   # tau_mix(C) = alpha + beta*C (s); gamma = solo decode tokens/s per stream\n"
            f"alpha = {self.timing.alpha:.6g}   # SE {_se(m.alpha_se)}\n"
            f"beta = {self.timing.beta:.6g}   # SE {_se(m.beta_se)}\n"
            f"gamma = {self.timing.gamma:.6g}   # SE {_se(s.gamma_se)}\n"
        )


def calibrate_from_csv(path: str | os.PathLike, *, average_repeats: bool = True) -> Calibration:
    """Fit (alpha, beta) and gamma from a measurement CSV and return them as an :class:`IterationTime`.

    With ``average_repeats`` (default, the paper's method) the mixed rows are first averaged per distinct
    chunk size and the line is fitted to those means, so R^2 measures how straight the mean iteration
    time is in C (comparable to the paper's 0.998). Without it every row is a point: the coefficients
    barely change but R^2 then also counts the run-to-run scatter."""
    meas = load_measurements_csv(path)
    distinct = np.unique(meas.chunk_tokens)
    if len(distinct) < 2:
        got = "no mixed rows" if meas.n_mixed == 0 else f"only chunk size {distinct[0]:g}"
        raise ValueError(
            f"{meas.path}: column 'chunk_tokens': the mixed rows must cover at least 2 distinct chunk sizes "
            f"(3 or more for standard errors) to fit alpha and beta, got {got}"
        )
    if meas.n_solo == 0:
        raise ValueError(
            f"{meas.path}: column 'tokens_per_s': no rows with mode 'solo'; gamma needs at least one solo "
            f"row with its per-stream decode speed (2 or more for a standard error)"
        )
    if average_repeats:
        x = distinct
        y = np.array([meas.iteration_s[meas.chunk_tokens == c].mean() for c in distinct])
    else:
        x, y = meas.chunk_tokens, meas.iteration_s
    mixed = fit_mixed_law(x, y)
    solo = fit_gamma(meas.tokens_per_s)
    for name, value in (("alpha", mixed.alpha), ("beta", mixed.beta)):
        if not value > 0:
            raise ValueError(
                f"{meas.path}: column 'iteration_s': the fitted {name} = {value:.4g} is not > 0, so "
                f"tau_mix = alpha + beta*C does not describe these data over C in "
                f"[{mixed.chunk_min:g}, {mixed.chunk_max:g}]; check the units (seconds) and drop chunk "
                f"sizes below the threshold b0 where iteration time is flat"
            )
    timing = IterationTime(alpha=mixed.alpha, beta=mixed.beta, gamma=solo.gamma)
    return Calibration(timing=timing, mixed=mixed, solo=solo, source=meas.path, n_mixed_rows=meas.n_mixed,
                       averaged_repeats=average_repeats)


def synthetic_measurements(
    alpha: float = PAPER_QWEN8B["alpha"],
    beta: float = PAPER_QWEN8B["beta"],
    gamma: float = PAPER_QWEN8B["gamma"],
    *,
    chunks: Sequence[float] = (128, 256, 384, 512, 768, 1024, 1536, 2048),
    repeats: int = 4,
    iteration_noise_s: float = 0.002,
    n_solo: int = 8,
    speed_noise: float = 1.0,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Rows of a measurement CSV drawn from a known law with Gaussian noise: each mixed row is
    alpha + beta*C + N(0, iteration_noise_s^2), each solo row gamma + N(0, speed_noise^2). Used for the
    shipped example (``jaxq/data/example_measurements.csv``: the defaults, seed 0) and for tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(repeats):
        for c in chunks:
            t = alpha + beta * c + iteration_noise_s * rng.standard_normal()
            rows.append({"mode": "mixed", "chunk_tokens": f"{c:g}", "iteration_s": f"{t:.6g}", "tokens_per_s": ""})
    for _ in range(n_solo):
        v = gamma + speed_noise * rng.standard_normal()
        rows.append({"mode": "solo", "chunk_tokens": "", "iteration_s": "", "tokens_per_s": f"{v:.4f}"})
    return rows


def write_measurements_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MEASUREMENT_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# Vidur operator profiles
# ----------------------------------------------------------------------------------------------------

VIDUR_LIMITATIONS = """\
Vidur's mlp.csv holds per-layer times of the linear and norm operators only (QKV and output
projections, rotary embedding, MLP up/activation/down, layer norms, residual add, plus the embedding).
It does not contain:
  * attention itself: prefill attention, whose cost per chunk grows with the context already in the
    KV cache, and decode attention, which reads every stream's KV cache (Vidur's attention.csv);
  * CPU and scheduling overheads: scheduler, input preparation, sampling, detokenisation, kernel
    launches (Vidur's cpu_overheads.csv);
  * the LM head, and for tensor parallelism > 1 the all-reduce traffic between GPUs (Vidur's network
    profiles).
Hence, for the same model and kernels:
  * beta here is the token-linear slope of these operators alone, a lower bound on the engine's beta
    (attention adds per-token cost that grows with context);
  * the intercept is only the weight-reading part of alpha, a lower bound on alpha;
  * gamma cannot be derived: a decode-only step takes at least the flat part c of the piecewise fit,
    so gamma <= 1/c is only an upper bound.
Measure alpha and gamma on your own engine (`jaxq calibrate FILE.csv`) before using them in a scenario.
"""

_VIDUR_KEYS = ("num_tokens", "num_tensor_parallel_workers")
_VIDUR_STATS = ("min", "max", "mean", "median", "std")


@dataclasses.dataclass(frozen=True, eq=False)
class VidurProfile:
    """A Vidur ``mlp.csv``: per-layer operator times (ms) per row, keyed by column name
    (``time_stats.<op>.<stat>``), against ``num_tokens`` and ``num_tensor_parallel_workers``. ``model``
    holds the other columns (n_embd, n_head, ...) when they are constant over the file."""

    path: str
    num_tokens: np.ndarray = dataclasses.field(repr=False)
    tensor_parallel: np.ndarray = dataclasses.field(repr=False)
    times_ms: Mapping[str, np.ndarray] = dataclasses.field(repr=False)
    model: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def ops(self, stat: str = "mean") -> tuple[str, ...]:
        """Operator names that have a ``time_stats.<op>.<stat>`` column, in file order."""
        suffix = f".{stat}"
        return tuple(c[len("time_stats."):-len(suffix)] for c in self.times_ms if c.endswith(suffix))


def read_vidur_mlp_csv(path: str | os.PathLike) -> VidurProfile:
    """Read a Vidur ``data/profiling/compute/<gpu>/<org>/<model>/mlp.csv`` (or a column/row subset of
    one, such as the sample shipped in ``jaxq/data``). Times are milliseconds per layer."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{path}: cannot open Vidur profile: {err.strerror or err}") from err
    with fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        for key in _VIDUR_KEYS:
            if key not in header:
                raise ValueError(f"{path}: missing column '{key}'; a Vidur mlp.csv has columns "
                                 f"num_tokens, num_tensor_parallel_workers and time_stats.<op>.<stat>")
        time_cols = [h for h in header if h.startswith("time_stats.")]
        for col in time_cols:
            parts = col.split(".")
            if len(parts) != 3 or parts[2] not in _VIDUR_STATS:
                raise ValueError(f"{path}: column {col!r}: expected time_stats.<op>.<stat> with stat one of "
                                 + ", ".join(_VIDUR_STATS))
        if not time_cols:
            raise ValueError(f"{path}: no time_stats.<op>.<stat> columns; is this a Vidur mlp.csv?")
        other_cols = [h for h in header if h not in time_cols and h not in _VIDUR_KEYS]
        tokens, tps = [], []
        times = {c: [] for c in time_cols}
        other = {c: set() for c in other_cols}
        for row, line, cells in _data_rows(reader, path, header):
            for key, out in (("num_tokens", tokens), ("num_tensor_parallel_workers", tps)):
                try:
                    v = int(cells[key])
                except ValueError:
                    raise _cell_error(path, row, line, key, "an integer >= 1", cells[key]) from None
                if v < 1:
                    raise _cell_error(path, row, line, key, "an integer >= 1", cells[key])
                out.append(v)
            for col in time_cols:
                try:
                    v = float(cells[col])
                except ValueError:
                    raise _cell_error(path, row, line, col, "a finite number >= 0 (ms)", cells[col]) from None
                if not (math.isfinite(v) and v >= 0):
                    raise _cell_error(path, row, line, col, "a finite number >= 0 (ms)", cells[col])
                times[col].append(v)
            for col in other_cols:
                other[col].add(cells[col])
    if row == 0:
        raise ValueError(f"{path}: no data rows")
    return VidurProfile(
        path=str(path),
        num_tokens=_readonly(tokens).astype(np.int64),
        tensor_parallel=_readonly(tps).astype(np.int64),
        times_ms={c: _readonly(v) for c, v in times.items()},
        model={c: next(iter(v)) for c, v in other.items() if len(v) == 1},
    )


def layer_stack_time_s(
    profile: VidurProfile, num_layers: int, *, tensor_parallel: int = 1, stat: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Time of the token-linear operators of a whole forward pass, in seconds, per profile row:
    L * (sum of the per-layer operators) + the embedding once. Returns (num_tokens, seconds) for the
    rows with this tensor-parallel degree, sorted by num_tokens; repeated num_tokens rows (Vidur
    profiled some sizes twice) are kept, in file order, as separate measurements."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers: must be an integer >= 1, got {num_layers!r}")
    ops = profile.ops(stat)
    if not ops:
        have = sorted({c.rsplit(".", 1)[1] for c in profile.times_ms})
        raise ValueError(f"{profile.path}: no time_stats.<op>.{stat} columns; stats present: {', '.join(have)}")
    if "emb" not in ops:
        raise ValueError(f"{profile.path}: missing column 'time_stats.emb.{stat}' (the embedding, counted once)")
    rows = profile.tensor_parallel == tensor_parallel
    if not rows.any():
        have = ", ".join(str(t) for t in sorted(set(profile.tensor_parallel.tolist())))
        raise ValueError(f"tensor_parallel: must be one of the degrees profiled in {profile.path} ({have}), "
                         f"got {tensor_parallel!r}")
    per_layer = sum(profile.times_ms[f"time_stats.{op}.{stat}"][rows] for op in ops if op != "emb")
    total_ms = num_layers * per_layer + profile.times_ms[f"time_stats.emb.{stat}"][rows]
    order = np.argsort(profile.num_tokens[rows], kind="stable")
    return profile.num_tokens[rows][order], total_ms[order] / 1e3


@dataclasses.dataclass(frozen=True)
class PiecewiseFit:
    """Least-squares fit of tau(b') = c + a*max(0, b' - b0) (paper eq. 1) to the operator times."""

    c: float
    a: float
    b0: float
    r2: float
    n_points: int
    tokens_min: int
    tokens_max: int

    @property
    def alpha(self) -> float:
        """c - a*b0, the intercept of the linear branch (eq. 3)."""
        return self.c - self.a * self.b0


def fit_piecewise_law(num_tokens, time_s, *, relative: bool = True) -> PiecewiseFit:
    """Fit tau(b') = c + a*max(0, b'-b0). For fixed b0 the model is linear in (c, a), so b0 is found by
    minimising the profiled sum of squares (grid over the observed token counts, then a bounded scalar
    search between the neighbours of the best grid point); (c, a) come from lstsq at that b0.

    ``relative`` weights each point by 1/time (least squares on relative error). Absolute least squares
    on data spanning 10 ms to 2 s is decided by the largest batches and places the knee b0 almost
    arbitrarily; relative weighting lets the small batches, where the knee is, count."""
    x = _as_positive_vector("num_tokens", num_tokens)
    y = _as_positive_vector("time_s", time_s)
    if len(np.unique(x)) < 3:
        raise ValueError("num_tokens: the piecewise law needs at least 3 distinct token counts")
    w = 1.0 / y if relative else np.ones_like(y)

    def solve(b0: float):
        design = np.column_stack([np.ones_like(x), np.maximum(0.0, x - b0)]) * w[:, None]
        coef, *_ = np.linalg.lstsq(design, y * w, rcond=None)
        resid = design @ coef - y * w
        return float(resid @ resid), coef

    # b0 <= min(x) all give the same straight line, so 0 stands for them; b0 >= max(x) has no slope.
    grid = np.concatenate([[0.0], np.unique(x)[:-1]])
    sse = np.array([solve(b)[0] for b in grid])
    k = int(np.argmin(sse))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    if hi > lo:
        res = scipy.optimize.minimize_scalar(lambda b: solve(b)[0], bounds=(lo, hi), method="bounded",
                                             options={"xatol": 1e-3})
        b0 = float(res.x) if res.fun <= sse[k] else float(grid[k])
    else:
        b0 = float(grid[k])
    _, (c, a) = solve(b0)
    pred = c + a * np.maximum(0.0, x - b0)
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    return PiecewiseFit(c=float(c), a=float(a), b0=b0, r2=r2, n_points=len(x), tokens_min=int(x.min()),
                        tokens_max=int(x.max()))


@dataclasses.dataclass(frozen=True, eq=False)
class VidurFit:
    """Token-linear part of the iteration-time law from Vidur operator profiles.

    ``linear`` is the OLS line total_s = intercept + beta*num_tokens over ``[tokens_min, tokens_max]``
    (its ``alpha`` field is the intercept, its ``chunk_*`` fields the token range); ``piecewise`` is the
    eq.-1 fit over all rows up to ``tokens_max``, exposing the knee b0. ``num_tokens``/``total_s`` are
    every row of this tensor-parallel degree. Read ``limitations`` before using any of it."""

    source: str
    model: Mapping[str, str]
    num_layers: int
    tensor_parallel: int
    stat: str
    ops: tuple[str, ...]
    linear: MixedLawFit
    piecewise: PiecewiseFit | None
    num_tokens: np.ndarray = dataclasses.field(repr=False)
    total_s: np.ndarray = dataclasses.field(repr=False)
    limitations: str = dataclasses.field(default=VIDUR_LIMITATIONS, repr=False)

    @property
    def beta(self) -> float:
        return self.linear.beta

    @property
    def beta_se(self) -> float:
        return self.linear.beta_se

    @property
    def intercept_s(self) -> float:
        return self.linear.alpha

    @property
    def r2(self) -> float:
        return self.linear.r2

    def total_at(self, num_tokens: int) -> np.ndarray:
        """Stacked operator time (s) of every profile row with exactly this many tokens."""
        return self.total_s[self.num_tokens == num_tokens]


def fit_vidur_token_linear(
    profile: VidurProfile | str | os.PathLike,
    num_layers: int,
    *,
    tensor_parallel: int = 1,
    stat: str = "mean",
    min_tokens: int = 256,
    max_tokens: int | None = 8192,
    piecewise: bool = True,
) -> VidurFit:
    """Stack Vidur's per-layer operator times for ``num_layers`` layers (+ embedding once) and fit
    their token-linear part.

    The default range, 256 to 8192 tokens, is where prefill chunks live (vLLM's chunk budgets): below a
    few hundred tokens the GEMMs are bound by reading the weights and the time is nearly flat (the
    piecewise fit's b0 marks where that ends). ``max_tokens=None`` uses every row from ``min_tokens``
    up. For Meta-Llama-3-8B on A100 the slope is 6.61e-5 to 6.65e-5 s/token for ranges from 256 to
    8192 tokens or more (6.85e-5 if cut at 2048)."""
    if not isinstance(profile, VidurProfile):
        profile = read_vidur_mlp_csv(profile)
    n_tok, total = layer_stack_time_s(profile, num_layers, tensor_parallel=tensor_parallel, stat=stat)
    hi = np.inf if max_tokens is None else max_tokens
    in_range = (n_tok >= min_tokens) & (n_tok <= hi)
    if len(np.unique(n_tok[in_range])) < 2:
        raise ValueError(
            f"min_tokens, max_tokens: the range [{min_tokens}, {max_tokens}] holds fewer than 2 distinct "
            f"num_tokens of {profile.path} (it has {n_tok.min()} to {n_tok.max()})"
        )
    linear = fit_mixed_law(n_tok[in_range], total[in_range])
    pw = None
    if piecewise:
        upto = n_tok <= hi
        pw = fit_piecewise_law(n_tok[upto], total[upto])
    return VidurFit(
        source=profile.path, model=dict(profile.model), num_layers=int(num_layers),
        tensor_parallel=int(tensor_parallel), stat=stat, ops=profile.ops(stat), linear=linear, piecewise=pw,
        num_tokens=n_tok, total_s=_readonly(total),
    )
