"""Load scenarios from versioned TOML files (stdlib ``tomllib``) with strict key checking.

A scenario file has the top-level keys ``name``, ``version`` (int >= 1), optional ``description``
and ``source``, and the tables ``[cluster]`` (n, B, C), ``[timing]`` (either alpha, beta, gamma, or
the piecewise law c, a, b0 with optional gamma), ``[prices]`` (c_p, c_d, scheme) and ``[classes]``
(P, D, lam, theta, optional names), and optionally ``[arrivals]`` (breakpoints, factors: a piecewise-
constant rate multiplier, :class:`jaxq.model.scenario.ArrivalSchedule`). Unknown and missing keys raise
``ValueError`` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .scenario import ArrivalSchedule, Cluster, IterationTime, JobClasses, Pricing, Scenario

_TOP_REQUIRED = {"name", "version", "cluster", "timing", "prices", "classes"}
_TOP_OPTIONAL = {"description", "source", "arrivals"}
_TABLES = {
    "cluster": ({"n", "B", "C"}, set()),
    "prices": ({"c_p", "c_d", "scheme"}, set()),
    "classes": ({"P", "D", "lam", "theta"}, {"names"}),
}
_TIMING_AFFINE = {"alpha", "beta", "gamma"}
_TIMING_PIECEWISE = ({"c", "a", "b0"}, {"gamma"})


def _check_keys(where: str, table: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"invalid scenario field '{where}': must be a table, got {table!r}")
    prefix = f"{where}." if where else ""
    unknown = sorted(set(table) - required - optional)
    if unknown:
        raise ValueError(
            f"unknown scenario field '{prefix}{unknown[0]}': allowed keys here are "
            + ", ".join(sorted(required | optional))
        )
    missing = sorted(required - set(table))
    if missing:
        raise ValueError(f"missing scenario field '{prefix}{missing[0]}' (required: {', '.join(sorted(required))})")


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """Build and validate a :class:`Scenario` from a parsed TOML dictionary."""
    _check_keys("", data, _TOP_REQUIRED, _TOP_OPTIONAL)
    for table, (req, opt) in _TABLES.items():
        _check_keys(table, data[table], req, opt)
    timing = data["timing"]
    if not isinstance(timing, dict):
        raise ValueError(f"invalid scenario field 'timing': must be a table, got {timing!r}")
    if "alpha" in timing or "beta" in timing:
        _check_keys("timing", timing, _TIMING_AFFINE, set())
        law = IterationTime(alpha=timing["alpha"], beta=timing["beta"], gamma=timing["gamma"])
    else:
        _check_keys("timing", timing, *_TIMING_PIECEWISE)
        law = IterationTime.from_piecewise(timing["c"], timing["a"], timing["b0"], timing.get("gamma"))
        if data["cluster"]["C"] < timing["b0"]:
            raise ValueError(
                f"invalid scenario field 'cluster.C': must be >= timing.b0 = {timing['b0']} for the mixed "
                f"law tau = alpha + beta*C to hold, got {data['cluster']['C']!r}"
            )
    name, version = data["name"], data["version"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid scenario field 'name': must be a non-empty string, got {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid scenario field 'version': must be an integer >= 1, got {version!r}")
    c = data["classes"]
    arrivals = None
    if "arrivals" in data:
        _check_keys("arrivals", data["arrivals"], {"breakpoints", "factors"}, set())
        arrivals = ArrivalSchedule(breakpoints=data["arrivals"]["breakpoints"], factors=data["arrivals"]["factors"])
    return Scenario(
        classes=JobClasses(P=c["P"], D=c["D"], lam=c["lam"], theta=c["theta"], names=tuple(c.get("names", ()))),
        cluster=Cluster(**data["cluster"]),
        timing=law,
        pricing=Pricing(**data["prices"]),
        name=name,
        version=version,
        description=str(data.get("description", "")),
        arrivals=arrivals,
    )


BUNDLED = Path(__file__).resolve().parents[1] / "scenarios"  # package data: ships in the wheel


def config_dirs() -> list[Path]:
    """Where scenario names are looked up, first match wins: $JAXQ_CONFIG_PATH (os.pathsep-separated),
    ./configs (a user's own scenarios), and the scenarios shipped in the package (jaxq/scenarios)."""
    dirs = [Path(p) for p in os.environ.get("JAXQ_CONFIG_PATH", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "configs", BUNDLED]
    return [d for d in dirs if d.is_dir()]


def resolve_scenario_path(name_or_path: str | os.PathLike) -> Path:
    """A scenario file: ``name_or_path`` itself if it names a file (a ``.toml`` suffix or a directory
    part makes it a path, which must exist), else the newest ``<name>.toml`` / ``<name>-v*.toml`` in
    :func:`config_dirs`."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or len(path.parts) > 1:
        if path.is_file():
            return path
        if path.is_dir():
            raise ValueError(f"invalid scenario {str(name_or_path)!r}: a directory, not a .toml file")
        raise ValueError(f"invalid scenario {str(name_or_path)!r}: no such file")
    for d in config_dirs():
        for candidate in (d / f"{path.name}.toml", *sorted(d.glob(f"{path.name}-v*.toml"), reverse=True)):
            if candidate.is_file():
                return candidate
    known = ", ".join(list_scenarios()) or "(none found: no scenario directory)"
    raise ValueError(f"unknown scenario {str(name_or_path)!r}: not a .toml file and not one of {known}")


def list_scenarios() -> list[str]:
    names: set[str] = set()
    for d in config_dirs():
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_scenario(name_or_path: str | os.PathLike) -> Scenario:
    """Load a scenario by path or by name (``"canonical"`` finds the bundled ``jaxq/scenarios/canonical-v1.toml``)."""
    path = resolve_scenario_path(name_or_path)
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"scenario file {path} is not valid TOML: {err}") from err
    return scenario_from_dict(data)
