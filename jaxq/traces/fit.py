"""Fit the model's job classes (MODEL.md §1.3: P_i, D_i, lam_i per GPU) to a request trace
(``jaxq trace fit``; docs/traces.md).

**Classes.** Requests are grouped by k-means on z = (log prompt, log output length), both in log tokens
so that a distance is a ratio of lengths and neither axis needs a scale chosen for it. Lloyd's
iterations run to convergence from k-means++ seeding (``restarts`` seedings drawn from
``numpy.random.default_rng(seed)``; the lowest within-class sum of squares wins), on the distinct
(prompt, output) pairs weighted by their counts (the same partition as on every row, faster on traces
with repeated lengths). A class that empties is re-seeded at the point farthest from its centre. On a
trace with more than ``SUBSAMPLE`` distinct pairs the seedings and restarts run on a fixed-seed sample
of that many requests, and Lloyd's iterations from the best of them then run on every request. The
classes are then sorted by mean prompt length (ties: mean output length), so the output is deterministic.
A trace with a ``class`` column can use its labels instead (``classes="labels"``).

**Choosing K** (``classes="auto"``): the K in 1..6 of lowest BIC, where each class is a Gaussian with a
diagonal covariance on z, fitted at the k-means partition (the classification likelihood; 5K - 1
parameters: K - 1 shares, K means and K variances in 2 dimensions). BIC needs no threshold of ours, so
nothing is tuned to a particular trace; it trades fit against parameters with the trace's own size.
Token counts are integers: each class variance gets the variance of rounding, the class mean of
1/(12 x^2) in log units, so a class of one repeated length does not have zero variance.

**Estimates per class** i with count_i requests over the trace's duration T (first to last arrival) on
n GPUs: lam_i = count_i / T / n with the Poisson standard error sqrt(count_i) / T / n; P_i and D_i are the
means of the raw lengths with standard errors sd / sqrt(count_i). Within-class spread: the coefficient
of variation of each length (1 for the exponential lengths the model assumes) and the fraction of the
total variance of z that the partition explains, 1 - within / total sum of squares.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from .reader import Trace

AUTO_MAX_CLASSES = 6
SEED = 0
RESTARTS = 8
MAX_ITER = 500
TOL = 1e-9
SUBSAMPLE = 50_000
METHOD = "k-means on (log prompt, log output), k-means++ seeding"


# ----------------------------------------------------------------------------------------------------
# k-means on the log lengths
# ----------------------------------------------------------------------------------------------------


def _distinct_points(prompt: np.ndarray, output: np.ndarray):
    """Distinct (prompt, output) pairs, their counts, and each row's pair index."""
    pairs, inverse, counts = np.unique(np.column_stack([prompt, output]), axis=0, return_inverse=True,
                                       return_counts=True)
    return pairs, counts.astype(np.float64), inverse.ravel()


def _assign(z: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = (z[:, 0, None] - centers[None, :, 0]) ** 2
    d += (z[:, 1, None] - centers[None, :, 1]) ** 2
    lab = np.argmin(d, axis=1)
    return lab, np.take_along_axis(d, lab[:, None], axis=1)[:, 0]


def _seed(z: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ (Arthur and Vassilvitskii 2007) with point weights."""
    centers = [z[rng.choice(len(z), p=w / w.sum())]]
    d2 = ((z - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = w * d2
        centers.append(z[rng.choice(len(z), p=p / p.sum())])
        d2 = np.minimum(d2, ((z - centers[-1]) ** 2).sum(1))
    return np.array(centers)


def _lloyd(z: np.ndarray, w: np.ndarray, centers: np.ndarray, max_iter: int):
    """Lloyd's iterations until no point changes class, or the within-class sum of squares falls by
    less than a relative ``TOL`` in one iteration (or ``max_iter``)."""
    k = len(centers)
    lab, inertia = None, np.inf
    for _ in range(max_iter):
        new, d2 = _assign(z, centers)
        now = float((w * d2).sum())
        if lab is not None and (np.array_equal(new, lab) or inertia - now <= TOL * inertia):
            break
        lab, inertia = _fill_empty(new, d2, k), now
        mass = np.bincount(lab, weights=w, minlength=k)
        centers = np.column_stack([np.bincount(lab, weights=w * z[:, d], minlength=k) for d in range(2)]) / mass[:, None]
    lab, d2 = _assign(z, centers)
    lab = _fill_empty(lab, d2, k)
    return lab, centers, float((w * ((z - centers[lab]) ** 2).sum(1)).sum())


def _fill_empty(lab: np.ndarray, d2: np.ndarray, k: int) -> np.ndarray:
    """Give each empty class the point farthest from its centre (deterministic), so none is empty."""
    lab, d2 = lab.copy(), d2.copy()
    for j in np.flatnonzero(np.bincount(lab, minlength=k) == 0):
        far = int(np.argmax(d2))
        lab[far], d2[far] = j, -1.0
    return lab


def kmeans_log_lengths(prompt, output, k: int, *, seed: int = SEED, restarts: int = RESTARTS,
                       max_iter: int = MAX_ITER) -> np.ndarray:
    """Class index (0..k-1) of every request: k-means on (log prompt, log output) (module docstring),
    classes numbered by increasing mean prompt length (then mean output length)."""
    prompt, output = np.asarray(prompt), np.asarray(output)
    pairs, w, inverse = _distinct_points(prompt, output)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"classes: must be an integer >= 1, got {k!r}")
    if k > len(pairs):
        raise ValueError(f"classes: must be <= {len(pairs)}, the number of distinct (prompt, output) pairs in "
                         f"the trace, got {k}")
    z = np.log(pairs.astype(np.float64))
    rng = np.random.default_rng(seed)
    zs, ws = z, w
    if len(z) > SUBSAMPLE:  # seed and restart on a sample of the requests, refine on all of them
        pick, ws = np.unique(rng.choice(len(z), size=SUBSAMPLE, p=w / w.sum()), return_counts=True)
        zs, ws = z[pick], ws.astype(np.float64)
    best = None
    for _ in range(restarts if k > 1 else 1):
        lab, centers, inertia = _lloyd(zs, ws, _seed(zs, ws, k, rng), max_iter)
        if best is None or inertia < best[2]:
            best = (lab, centers, inertia)
    if zs is not z:
        best = _lloyd(z, w, best[1], max_iter)
    labels = best[0][inverse]
    return _sort_classes(labels, prompt, output, k)


def _rank_classes(labels: np.ndarray, prompt: np.ndarray, output: np.ndarray, k: int) -> np.ndarray:
    """rank[j]: the position of class j when the classes are sorted by mean prompt, then mean output."""
    count = np.bincount(labels, minlength=k)
    mean_p = np.bincount(labels, weights=prompt, minlength=k) / count
    mean_d = np.bincount(labels, weights=output, minlength=k) / count
    rank = np.empty(k, dtype=np.int64)
    rank[np.lexsort((mean_d, mean_p))] = np.arange(k)
    return rank


def _sort_classes(labels: np.ndarray, prompt: np.ndarray, output: np.ndarray, k: int) -> np.ndarray:
    return _rank_classes(labels, prompt, output, k)[labels]


def explained_fraction(prompt, output, labels: np.ndarray) -> float:
    """1 - (within-class sum of squares) / (total sum of squares) of z = (log prompt, log output)."""
    z = np.log(np.column_stack([prompt, output]).astype(np.float64))
    total = ((z - z.mean(0)) ** 2).sum()
    if total == 0:
        return float("nan")
    k = int(labels.max()) + 1
    count = np.bincount(labels, minlength=k)[:, None]
    means = np.column_stack([np.bincount(labels, weights=z[:, d], minlength=k) for d in range(2)]) / count
    return float(1.0 - ((z - means[labels]) ** 2).sum() / total)


def bic(prompt, output, labels: np.ndarray) -> float:
    """BIC of a mixture of diagonal Gaussians on z = (log prompt, log output) at the partition
    ``labels`` (classification likelihood), each variance plus the variance of rounding to integers."""
    x = np.column_stack([prompt, output]).astype(np.float64)
    z = np.log(x)
    n = len(z)
    k = int(labels.max()) + 1
    count = np.bincount(labels, minlength=k).astype(np.float64)
    loglik = float((count * np.log(count / n)).sum())
    for d in range(2):
        mean = np.bincount(labels, weights=z[:, d], minlength=k) / count
        var = np.bincount(labels, weights=(z[:, d] - mean[labels]) ** 2, minlength=k) / count
        rounding = np.bincount(labels, weights=1.0 / (12.0 * x[:, d] ** 2), minlength=k) / count
        v = var + rounding
        loglik -= float((0.5 * count * (np.log(2 * np.pi * v) + var / v)).sum())
    return -2.0 * loglik + (5 * k - 1) * math.log(n)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The K tried by ``classes="auto"``, with the fraction of log-variance explained and the BIC."""

    ks: tuple[int, ...]
    explained: tuple[float, ...]
    bics: tuple[float, ...]
    chosen: int

    def format(self) -> str:
        lines = [f"  {'K':>3}{'explained':>11}{'BIC':>14}"]
        for k, e, b in zip(self.ks, self.explained, self.bics):
            lines.append(f"  {k:>3}{100 * e if k > 1 else 0.0:>10.1f}%{b:>14.1f}" + ("  <- lowest BIC" if k == self.chosen else ""))
        if self.chosen == self.ks[-1] and len(self.ks) > 1:
            lines.append(f"  (lowest at the largest K tried, {self.chosen}: BIC may keep falling beyond it; "
                         "--classes K fits more)")
        return "\n".join(lines)


def choose_num_classes(prompt, output, *, max_classes: int = AUTO_MAX_CLASSES, seed: int = SEED):
    """K in 1..max_classes (at most the number of distinct pairs) of lowest BIC; returns
    (K, its labels, the :class:`Selection`)."""
    prompt, output = np.asarray(prompt), np.asarray(output)
    distinct = len(np.unique(np.column_stack([prompt, output]), axis=0))
    ks = tuple(range(1, min(max_classes, distinct) + 1))
    labels = [kmeans_log_lengths(prompt, output, k, seed=seed) for k in ks]
    bics = tuple(bic(prompt, output, lab) for lab in labels)
    best = int(np.argmin(bics))
    sel = Selection(ks=ks, explained=tuple(explained_fraction(prompt, output, lab) for lab in labels), bics=bics,
                    chosen=ks[best])
    return ks[best], labels[best], sel


# ----------------------------------------------------------------------------------------------------
# per-class estimates
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassFit:
    """One fitted class. ``rate`` is the whole trace's arrival rate of the class (requests/s); the
    model's lam per GPU is ``rate / n`` (:meth:`lam`)."""

    name: str
    count: int
    share: float
    rate: float
    rate_se: float
    P: float
    P_se: float
    D: float
    D_se: float
    cv_P: float
    cv_D: float

    def lam(self, n: int) -> float:
        return self.rate / n

    def lam_se(self, n: int) -> float:
        return self.rate_se / n


def _class_fit(name: str, prompt: np.ndarray, output: np.ndarray, total: int, duration: float) -> ClassFit:
    m = len(prompt)
    sd = (lambda x: float(np.std(x, ddof=1))) if m > 1 else (lambda x: float("nan"))
    sp, so = sd(prompt), sd(output)
    P, D = float(prompt.mean()), float(output.mean())
    return ClassFit(name=name, count=m, share=m / total, rate=m / duration, rate_se=math.sqrt(m) / duration,
                    P=P, P_se=sp / math.sqrt(m), D=D, D_se=so / math.sqrt(m), cv_P=sp / P, cv_D=so / D)


@dataclasses.dataclass(frozen=True)
class TraceFit:
    """Classes fitted to a trace (module docstring). ``labels[r]`` is request r's class index."""

    source: str
    requests: int
    duration_s: float
    origin: str
    method: str  # "kmeans" or "labels"
    k_given: bool  # K was given (not chosen by BIC)
    classes: tuple[ClassFit, ...]
    labels: np.ndarray = dataclasses.field(repr=False)
    explained: float = float("nan")
    selection: Selection | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe_method(self) -> str:
        if self.method == "labels":
            return "the trace's class labels"
        how = "given" if self.k_given else f"lowest BIC of K = 1..{max(self.selection.ks)}"
        return (f"{METHOD} ({RESTARTS} restarts, seed {SEED}), K = {self.num_classes} ({how}); "
                "sorted by mean prompt")

    def format_table(self, n: int) -> str:
        width = max(6, max(len(c.name) for c in self.classes) + 1)
        lines = [f"  {'class':<{width}}{'count':>8}{'share':>8}{'lam/GPU (1/s)':>24}{'P (tokens)':>20}"
                 f"{'D (tokens)':>18}{'CV P':>7}{'CV D':>7}"]
        for c in self.classes:
            lines.append(f"  {c.name:<{width}}{c.count:>8,}{100 * c.share:>7.1f}%"
                         f"{_pm(c.lam(n), c.lam_se(n), '.4g', '.2g'):>24}{_pm(c.P, c.P_se, '.1f', '.1f'):>20}"
                         f"{_pm(c.D, c.D_se, '.1f', '.1f'):>18}{c.cv_P:>7.2f}{c.cv_D:>7.2f}")
        lines.append(f"  (at n = {n} GPUs: lam = count / duration / n, SE sqrt(count) / duration / n; P, D: mean "
                     "lengths, SE sd / sqrt(count); CV: within the class, 1 for exponential lengths)")
        return "\n".join(lines)


def _pm(v: float, se: float, fv: str, fse: str) -> str:
    return f"{v:{fv}} ± {se:{fse}}" if math.isfinite(se) else f"{v:{fv}} ± n/a"


def fit_trace(trace: Trace, classes: int | str = "auto", *, seed: int = SEED) -> TraceFit:
    """Fit K classes (an int), K chosen by BIC (``"auto"``), or the trace's own labels (``"labels"``)."""
    if trace.num_requests < 2 or trace.duration_s <= 0:
        raise ValueError(f"{trace.source}: a fit needs at least two requests at different times, got "
                         f"{trace.num_requests} over {trace.duration_s:g} s")
    P, D = trace.prompt_tokens, trace.output_tokens
    selection, names = None, None
    if classes == "labels":
        if trace.labels is None:
            raise ValueError(f"classes: 'labels' needs a trace with a class column ({trace.source} has none); "
                             "give a number of classes or 'auto'")
        names, inverse = np.unique(trace.labels, return_inverse=True)
        rank = _rank_classes(inverse.ravel(), P, D, len(names))
        labels, names = rank[inverse.ravel()], names[np.argsort(rank)]
        method = "labels"
    elif classes == "auto":
        _, labels, selection = choose_num_classes(P, D, seed=seed)
        method = "kmeans"
    elif isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        labels = kmeans_log_lengths(P, D, int(classes), seed=seed)
        method = "kmeans"
    else:
        raise ValueError(f"classes: must be an integer >= 1, 'auto' or 'labels', got {classes!r}")
    k = int(labels.max()) + 1
    names = [str(s) for s in names] if names is not None else [f"c{j + 1}" for j in range(k)]
    fits = tuple(_class_fit(names[j], P[labels == j], D[labels == j], trace.num_requests, trace.duration_s)
                 for j in range(k))
    return TraceFit(source=trace.source, requests=trace.num_requests, duration_s=trace.duration_s,
                    origin=trace.origin, method=method, k_given=selection is None, classes=fits, labels=labels,
                    explained=explained_fraction(P, D, labels) if k > 1 else 0.0, selection=selection)


# ----------------------------------------------------------------------------------------------------
# the scenario
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScenarioChoices:
    """What the trace does not say, and the fit therefore assumes: the cluster (n, B, C), the timing law
    and where it came from, the patience rate of every class, the prices."""

    n: int
    B: int = 16
    C: int = 256
    alpha: float = 0.0174
    beta: float = 6.2e-5
    gamma: float = 45.45
    timing_source: str = "qwen-8b"
    patience: float = 0.1
    c_p: float = 0.1
    c_d: float = 0.2
    scheme: str = "bundled"
    n_source: str = "given"


def _rounded(x: float) -> float:
    """6 significant digits: what the TOML file holds, so the file and the in-memory scenario agree."""
    return float(f"{x:.6g}")


def _num(x: float) -> str:
    return repr(float(x))  # shortest round-trip form; always a TOML float ("1.0", "6.2e-05")


def fitted_scenario(fit: TraceFit, choices: ScenarioChoices, *, name: str | None = None):
    """The :class:`jaxq.model.Scenario` the TOML file of :func:`scenario_toml` loads to."""
    from ..model.scenario import Cluster, IterationTime, JobClasses, Pricing, Scenario

    c, n = fit.classes, choices.n
    return Scenario(
        classes=JobClasses(P=[_rounded(x.P) for x in c], D=[_rounded(x.D) for x in c],
                           lam=[_rounded(x.lam(n)) for x in c], theta=[choices.patience] * len(c),
                           names=tuple(x.name for x in c)),
        cluster=Cluster(n=n, B=choices.B, C=choices.C),
        timing=IterationTime(alpha=choices.alpha, beta=choices.beta, gamma=choices.gamma),
        pricing=Pricing(c_p=choices.c_p, c_d=choices.c_d, scheme=choices.scheme),
        name=name or default_name(fit), version=1, description=_description(fit),
    )


def default_name(fit: TraceFit) -> str:
    return f"trace-{Path(fit.source).stem}"


def _description(fit: TraceFit) -> str:
    return (f"{fit.num_classes} classes fitted to {Path(fit.source).name} ({fit.requests} requests over "
            f"{fit.duration_s:.1f} s) by {'its class labels' if fit.method == 'labels' else 'k-means on log lengths'}")


def serves_all(scenario, *, rtol: float = 1e-6) -> bool:
    """Whether the bundled LP of ``scenario`` is optimal and serves every class's whole arrival rate."""
    from ..lp import solve_bundled

    sol = solve_bundled(scenario)
    return bool(sol.ok and np.all(sol.throughput >= scenario.classes.lam * (1 - rtol)))


def smallest_n(fit: TraceFit, choices: ScenarioChoices, *, n_max: int = 10**7) -> int:
    """The smallest n for which the bundled LP serves all of the trace's load (lam = rate / n): the
    fluid capacity, with no headroom. Full service is monotone in n, so: a lower bound from the prefill
    work, doubling, then bisection."""
    tau = choices.alpha + choices.beta * choices.C
    prefill = sum(c.rate * c.P * tau / choices.C for c in fit.classes)  # GPUs busy with prefills

    def ok(n: int) -> bool:
        return serves_all(fitted_scenario(fit, dataclasses.replace(choices, n=n)))

    lo = max(1, math.ceil(prefill))
    if ok(lo):
        return lo
    hi = lo * 2
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > n_max:
            raise ValueError(f"n: no n <= {n_max} serves the trace's load in the bundled LP; check the timing "
                             "and the patience")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _vec(xs) -> str:
    return "[" + ", ".join(_num(x) for x in xs) + "]"


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a TOML basic string


def scenario_toml(fit: TraceFit, choices: ScenarioChoices, *, name: str | None = None) -> str:
    """The text of a versioned scenario file (the format of jaxq/scenarios/*.toml) for ``fit``."""
    sc = fitted_scenario(fit, choices, name=name)
    n = choices.n
    src = Path(fit.source)
    k = fit.num_classes
    head = [
        f"# Fitted by `jaxq trace fit` to {src.name}: {fit.requests:,} requests over {fit.duration_s:,.1f} s from "
        f"{fit.origin}.",
        f"# Classes: {fit.describe_method()}"
        + (f"; they explain {100 * fit.explained:.1f}% of the variance of (log prompt, log output)." if k > 1 else "."),
        "# Estimated from the trace: lam = count / duration / n, P and D = mean lengths (standard errors below).",
        "# Assumed, not in the trace: n, B, C, the timing law, the patience (the trace records no abandonment),",
        "# the prices, and exponential lengths within a class (the within-class CVs below say how far off that is).",
        f"name = {_toml_str(sc.name)}",
        "version = 1",
        f"description = {_toml_str(sc.description)}",
        f"source = {_toml_str(f'{src.name} ({src.resolve()}); fit: {fit.describe_method()}')}",
        "",
        "[cluster]",
        f"n = {n}    # GPUs ({choices.n_source})",
        f"B = {choices.B}    # concurrent slots per GPU",
        f"C = {choices.C}    # prefill chunk, tokens per iteration",
        "",
        f"[timing]   # from {choices.timing_source}; tau_mix(C) = alpha + beta*C = {sc.tau:.6g} s; gamma = solo "
        "decode tokens/s per stream",
        f"alpha = {_num(choices.alpha)}",
        f"beta = {_num(choices.beta)}",
        f"gamma = {_num(choices.gamma)}",
        "",
        "[prices]",
        f"c_p = {_num(choices.c_p)}",
        f"c_d = {_num(choices.c_d)}",
        f"scheme = {_toml_str(choices.scheme)}",
        "",
        "[classes]",
        f"# {'class':<8}{'count':>8}{'share':>8}{'lam/GPU':>12}{'SE':>10}{'P':>10}{'SE':>8}{'D':>10}{'SE':>8}"
        f"{'CV P':>7}{'CV D':>7}",
    ]
    for c in fit.classes:
        head.append(f"# {c.name:<8}{c.count:>8}{100 * c.share:>7.1f}%{c.lam(n):>12.6g}{c.lam_se(n):>10.2g}"
                    f"{c.P:>10.1f}{c.P_se:>8.2g}{c.D:>10.1f}{c.D_se:>8.2g}{c.cv_P:>7.2f}{c.cv_D:>7.2f}")
    cls = sc.classes
    head += [
        f"names = [{', '.join(_toml_str(s) for s in cls.names)}]",
        f"P = {_vec(cls.P)}",
        f"D = {_vec(cls.D)}",
        f"lam = {_vec(cls.lam)}   # per GPU, requests/s",
        f"theta = {_vec(cls.theta)}   # patience rates, 1/s: assumed (--patience); the trace records no abandonment",
    ]
    return "\n".join(head) + "\n"


def write_scenario(path: str | os.PathLike, fit: TraceFit, choices: ScenarioChoices, *, name: str | None = None):
    """Write :func:`scenario_toml` to ``path`` and load it back (``jaxq.load_scenario``): returns the
    loaded scenario, so a file that would not load is never reported as written."""
    from ..model.config import load_scenario

    path = Path(path)
    if path.suffix != ".toml":
        raise ValueError(f"out: must be a .toml file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scenario_toml(fit, choices, name=name), encoding="utf-8")
    return load_scenario(path)
