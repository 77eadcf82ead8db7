"""Sweep grid files: parse strictly, expand to points, validate every point before anything runs.

A grid file (TOML) names a base scenario and the values to vary::

    scenario = "canonical"          # a bundled scenario name or a .toml path (relative to the grid file)
    seed = 0                        # the sweep seed
    [base]                          # settings shared by every point
    n = 20
    replicas = 8
    horizon = 200.0
    [grid]                          # axes: the points are their Cartesian product
    "classes.lam" = [0.3, 0.4, [0.5, 0.3]]
    policy = ["gg-sp", "fi-wsp"]
    [[points]]                      # optional explicit points, crossed with the grid's product
    "classes.theta" = [0.1, 0.1]

An axis is either a run setting (:data:`RUN_FIELDS`) or a scenario field by its dotted name
(:data:`MODEL_FIELDS`, the names ``Scenario.replace`` takes). A per-class field takes a list with one
entry per class, or a number meaning "this value for every class". Unquoted dotted keys
(``classes.lam = ...``) are TOML sub-tables and are read as the same dotted name.

Every point gets a resolved configuration (the whole scenario plus every run setting, defaults filled
in); its hash identifies the point in the outputs, so a resumed sweep knows what it already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from ..model.config import load_scenario
from ..model.scenario import Cluster, IterationTime, JobClasses, Pricing, Scenario
from ..policies import POLICIES, get_policy
from ..sim.batch import default_room

ENGINES = ("exact", "stepped", "population")

# Run settings with their defaults. None for room means: the smallest waiting room that holds every point
# of the point's shape group (see _default_rooms); for warmup, 20% of the horizon; for dt, the stepped
# engine's default step (the exact engine takes none).
RUN_DEFAULTS: dict[str, Any] = {
    "n": None,  # None: the base scenario's cluster.n
    "policy": "gg-sp",
    "engine": "exact",
    "dt": None,
    "replicas": 16,
    "horizon": 1000.0,
    "warmup": None,
    "seed": 0,
    "room": None,
    "convention": "B",
    "dtype": "float64",
    "max_steps": 2**31 - 1,
}
RUN_FIELDS = tuple(RUN_DEFAULTS)

_SUBS = {"classes": JobClasses, "cluster": Cluster, "timing": IterationTime, "prices": Pricing}
# cluster.n is the run setting `n`; class names label columns and are not a model number.
MODEL_FIELDS = tuple(f"{head}.{f.name}" for head, cls in _SUBS.items() for f in dataclasses.fields(cls)
                     if f"{head}.{f.name}" not in ("cluster.n", "classes.names"))
PER_CLASS = ("classes.P", "classes.D", "classes.lam", "classes.theta")

_TOP_KEYS = {"scenario", "name", "description", "seed", "base", "grid", "points"}


def _fail(where: str, field: str, allowed: str, got) -> ValueError:
    return ValueError(f"{where}: invalid field '{field}': must be {allowed}, got {got!r}")


def _flatten(table: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """{"classes": {"lam": v}} (an unquoted dotted TOML key) -> {"classes.lam": v}; unknown keys raise."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, where, f"{name}."))
            continue
        if name == "cluster.n":
            raise ValueError(f"{where}: unknown sweep field 'cluster.n': the number of GPUs is the axis 'n'")
        if name not in RUN_FIELDS and name not in MODEL_FIELDS:
            raise ValueError(f"{where}: unknown sweep field '{name}': allowed are the run settings "
                             f"{', '.join(RUN_FIELDS)} and the scenario fields {', '.join(MODEL_FIELDS)}")
        out[name] = value
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_run(where: str, s: dict) -> dict:
    """Validate the run settings of one point and fill in what depends on others (warmup, dt)."""
    if not (_is_int(s["n"]) and s["n"] >= 1):
        raise _fail(where, "n", "an integer >= 1", s["n"])
    if not isinstance(s["policy"], str) or s["policy"].lower() not in POLICIES:
        raise _fail(where, "policy", "one of " + ", ".join(POLICIES), s["policy"])
    s["policy"] = s["policy"].lower()
    if s["engine"] not in ENGINES:
        raise _fail(where, "engine", "one of " + ", ".join(ENGINES), s["engine"])
    if s["engine"] in ("exact", "population"):
        if s["dt"] is not None:
            raise _fail(where, "dt", f"absent for the {s['engine']} engine (only 'stepped' takes a step)", s["dt"])
    else:
        if s["dt"] is None:
            try:
                from ..sim import stepped
            except ImportError as err:
                raise _fail(where, "engine", "an engine this installation has", f"stepped ({err})") from None
            s["dt"] = float(stepped.DEFAULT_DT)
        if not (_is_real(s["dt"]) and math.isfinite(s["dt"]) and s["dt"] > 0):
            raise _fail(where, "dt", "a number > 0", s["dt"])
        s["dt"] = float(s["dt"])
    for name in ("replicas", "max_steps"):
        if not (_is_int(s[name]) and 1 <= s[name] <= 2**31 - 1):
            raise _fail(where, name, "an integer in [1, 2**31 - 1]", s[name])
    if not (_is_real(s["horizon"]) and math.isfinite(s["horizon"]) and s["horizon"] > 0):
        raise _fail(where, "horizon", "a number > 0", s["horizon"])
    s["horizon"] = float(s["horizon"])
    if s["warmup"] is None:
        s["warmup"] = 0.2 * s["horizon"]
    if not (_is_real(s["warmup"]) and 0 <= s["warmup"] < s["horizon"]):
        raise _fail(where, "warmup", f"a number in [0, horizon = {s['horizon']:g})", s["warmup"])
    s["warmup"] = float(s["warmup"])
    if not (_is_int(s["seed"]) and 0 <= s["seed"] < 2**31):
        raise _fail(where, "seed", "an integer in [0, 2**31)", s["seed"])
    if s["room"] is not None and not (_is_int(s["room"]) and s["room"] >= 1):
        raise _fail(where, "room", "an integer >= 1 (or absent: sized from the rates)", s["room"])
    if s["convention"] not in ("A", "B"):
        raise _fail(where, "convention", "'A' or 'B'", s["convention"])
    if s["dtype"] not in ("float64", "float32"):
        raise _fail(where, "dtype", "'float64' or 'float32'", s["dtype"])
    return s


def _model_changes(where: str, base: Scenario, model: dict) -> dict:
    """Turn the file's values into Scenario.replace arguments: a number for a per-class field means
    that value for every class."""
    out = {}
    for name, value in model.items():
        if name in PER_CLASS and _is_real(value):
            value = [value] * base.num_classes
        if isinstance(value, list) and name not in PER_CLASS:
            raise _fail(where, name, "a single value (it is not per class)", value)
        out[name] = value
    P = out.get("classes.P")
    if isinstance(P, list) and len(P) != base.num_classes:
        # another number of classes: the base's class names no longer fit, so name them by index
        out["classes.names"] = [f"class{i}" for i in range(len(P))]
    return out


def _check_step(scenario: Scenario, dt: float) -> None:
    """The stepped engine's own check of dt against this point's rates, where it has one."""
    from ..sim import stepped

    check = getattr(stepped, "check_dt", None)
    if check is not None:
        check(scenario.params(), dt)


def scenario_dict(s: Scenario) -> dict:
    """Every number of a scenario, JSON-ready (floats keep their exact repr)."""
    c = s.classes
    out = {
        "name": s.name, "version": s.version,
        "classes": {"names": list(c.names), "P": c.P.tolist(), "D": c.D.tolist(), "lam": c.lam.tolist(),
                    "theta": c.theta.tolist()},
        "cluster": {"n": s.cluster.n, "B": s.cluster.B, "C": s.cluster.C},
        "timing": {"alpha": s.timing.alpha, "beta": s.timing.beta, "gamma": s.timing.gamma},
        "prices": {"c_p": s.pricing.c_p, "c_d": s.pricing.c_d, "scheme": s.pricing.scheme},
    }
    arrivals = getattr(s, "arrivals", None)
    if arrivals is not None:  # only when present: the points of constant-rate grids keep their hashes
        out["arrivals"] = {"breakpoints": np.asarray(arrivals.breakpoints, float).tolist(),
                           "factors": np.asarray(arrivals.factors, float).tolist()}
    return out


def _digest(obj, chars: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:chars]


@dataclasses.dataclass(frozen=True, eq=False)
class Point:
    """One resolved sweep point.

    index: position in the grid's expansion order (the grid's product, then explicit points).
    values: the axis values the file set for this point, as written (for labels and CSV columns).
    scenario: the validated scenario, with ``cluster.n`` = ``settings["n"]``.
    settings: every run setting, defaults filled in (see :data:`RUN_DEFAULTS`).
    sweep_seed: the grid's seed.
    own: the names the [grid] or [[points]] set for this point (not [base]): what tells it apart.
    """

    index: int
    values: dict
    scenario: Scenario
    settings: dict
    sweep_seed: int = 0
    own: tuple[str, ...] = ()

    def __getattr__(self, name):  # point.n, point.policy, ... read the settings
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(name)

    def config(self) -> dict:
        """The full resolved configuration: what the point's results depend on."""
        return {"scenario": scenario_dict(self.scenario), "settings": dict(self.settings),
                "sweep_seed": self.sweep_seed}

    @property
    def hash(self) -> str:
        return _digest(self.config())

    @property
    def stream(self) -> int:
        """Random-stream identity: the scenario's numbers only. Points that differ only in policy, engine,
        dt, horizon, warm-up, room, convention, dtype or replica count share replica keys (common random
        numbers); replica r's key never depends on how many replicas there are."""
        return int(_digest(scenario_dict(self.scenario), 8), 16) & 0x7FFFFFFF

    def static_key(self) -> tuple:
        """Everything that fixes shapes or the compiled program: points agreeing on it share one compile.
        The event engines' horizon is a loop bound in params; the stepped engine may unroll it statically.
        The population engine's configurations are shaped by B."""
        s = self.settings
        event = s["engine"] in ("exact", "population")
        return (s["engine"], s["dt"], s["policy"], self.scenario.num_classes, s["n"], s["room"], s["convention"],
                s["dtype"], s["replicas"], None if event else s["horizon"],
                int(self.scenario.cluster.B) if s["engine"] == "population" else None)

    def label(self, axes=None) -> str:
        axes = {k: self.values.get(k) for k in (self.own if axes is None else axes)}
        return ", ".join(f"{k}={_short(v)}" for k, v in axes.items())


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A parsed grid file: its text, base scenario, seed, and the expanded, validated points."""

    text: str
    path: str | None
    name: str
    description: str
    base: Scenario
    seed: int
    axes: tuple[str, ...]  # names the file set anywhere (base, grid or points), in file order
    varied: tuple[str, ...]  # names that take more than one value
    points: tuple[Point, ...]

    @property
    def hash(self) -> str:
        """Identity of the whole sweep (its points' hashes in order)."""
        return _digest([p.hash for p in self.points])


def _default_rooms(points: list[Point]) -> None:
    """Size the waiting room as :func:`jaxq.sim.batch.default_room` does, but
    take the largest over each shape group so that a sweep over rates compiles once. It depends only on the
    grid, not on chunking or resumption, and is part of every point's hash."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        if p.settings["room"] is None:
            groups.setdefault(p.static_key(), []).append(p)
    for members in groups.values():
        need = max(default_room(p.scenario, p.n) for p in members)
        for p in members:
            p.settings["room"] = need


def parse_grid(data: dict, *, text: str = "", path: str | None = None) -> Grid:
    """Build a :class:`Grid` from a parsed TOML dictionary; raises ValueError naming the key or point."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"sweep file: unknown key '{unknown[0]}': allowed top-level keys are "
                         + ", ".join(sorted(_TOP_KEYS)))
    if "scenario" not in data or not isinstance(data["scenario"], str) or not data["scenario"]:
        raise ValueError("sweep file: missing key 'scenario' (a scenario name such as \"canonical\" or a .toml path)")
    ref = data["scenario"]
    if path is not None and ref.endswith(".toml") and not Path(ref).is_absolute():
        candidate = Path(path).parent / ref
        ref = str(candidate) if candidate.is_file() else ref
    base = load_scenario(ref)
    seed = data.get("seed", 0)
    if not (_is_int(seed) and 0 <= seed < 2**31):
        raise ValueError(f"sweep file: invalid key 'seed': must be an integer in [0, 2**31), got {seed!r}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"sweep file: invalid key '{key}': must be a string, got {data[key]!r}")
    for key in ("base", "grid"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"sweep file: invalid key '{key}': must be a table ([{key}]), got {data[key]!r}")
    fixed = _flatten(data.get("base", {}), "sweep file [base]")
    axes = _flatten(data.get("grid", {}), "sweep file [grid]")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep file [grid]: invalid axis '{name}': must be a non-empty list of values, "
                             f"got {values!r}")
    explicit = data.get("points", [{}])
    if not isinstance(explicit, list) or not explicit or not all(isinstance(e, dict) for e in explicit):
        raise ValueError("sweep file: invalid key 'points': must be a non-empty array of tables ([[points]])")
    explicit = [_flatten(e, f"sweep file [[points]] #{k}") for k, e in enumerate(explicit)]
    for k, e in enumerate(explicit):
        clash = sorted(set(e) & set(axes))
        if clash:
            raise ValueError(f"sweep file [[points]] #{k}: field '{clash[0]}' is also a [grid] axis; set it in one "
                             "place (the points are crossed with the grid)")

    names = list(dict.fromkeys([*fixed, *axes, *(k for e in explicit for k in e)]))
    points: list[Point] = []
    combos = list(itertools.product(*axes.values())) if axes else [()]
    for combo, extra in itertools.product(combos, explicit):
        index = len(points)
        values = {**fixed, **dict(zip(axes, combo)), **extra}
        own = tuple(k for k in values if k in axes or k in extra)
        where = f"sweep point {index}" + (f" ({', '.join(f'{k}={_short(values[k])}' for k in own)})" if own else "")
        settings = {k: values.get(k, d) for k, d in RUN_DEFAULTS.items()}
        if settings["n"] is None:
            settings["n"] = base.cluster.n
        settings = _check_run(where, settings)
        model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
        try:
            scenario = base.replace(**_model_changes(where, base, model), **{"cluster.n": settings["n"]})
            if settings["engine"] == "stepped":
                _check_step(scenario, settings["dt"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        get_policy(settings["policy"])
        points.append(Point(index=index, values=values, scenario=scenario, settings=settings, sweep_seed=seed,
                            own=own))
    _default_rooms(points)
    hashes = [p.hash for p in points]
    if len(set(hashes)) != len(hashes):
        dup = next(h for h in hashes if hashes.count(h) > 1)
        a, b = [p.index for p in points if p.hash == dup][:2]
        raise ValueError(f"sweep file: points {a} and {b} have the same configuration (give them different seeds)")
    varied = tuple(n for n in names if len({json.dumps(p.values.get(n)) for p in points}) > 1)
    return Grid(text=text, path=path, name=data.get("name", Path(path).stem if path else "sweep"),
                description=data.get("description", ""), base=base, seed=seed, axes=tuple(names), varied=varied,
                points=tuple(points))


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file. Every point is built (scenario validated) before anything runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"sweep file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"sweep file {path} is not valid TOML: {err}") from None
    return parse_grid(data, text=text, path=str(path))


def loads_grid(text: str) -> Grid:
    """:func:`load_grid` from a string (tests, notebooks)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"sweep file is not valid TOML: {err}") from None
    return parse_grid(data, text=text)
