"""Experiments E1-E6 (BANDITS.md §5.2) as versioned TOML configs: loading, running, summarising.

A config names a problem (the [problem] table, shared by all cases), optional ``[[cases]]`` that override
problem fields (E4-E6 sweep the regime or n0; every case uses the same seeds, so comparisons across cases
are paired), a list of ``[[algorithms]]`` and two run sizes, ``[run.full]`` (the protocol) and
``[run.quick]`` (a smoke size). Unknown, missing or invalid fields raise ``ValueError`` naming the field.

One compiled program runs everything in a config: cases x seeds x algorithms, rounds scanned.
"""

from __future__ import annotations

import dataclasses
import math
import time
import tomllib
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import algorithms as alg
from . import suplinucb as sup
from .env import SHIFT_KINDS, BanditSpec, EnvParams, Problem, make_problem
from .rollout import MinUCBFamily, Record, RunSpec, SupFamily, rollout_families

ALGORITHM_KINDS = ("oful", "naive", "pooled_only", "scalar", "ellipsoidal", "learned", "suplinucb", "sup_minucb")
SUP_KINDS = ("suplinucb", "sup_minucb")  # the SupLinUCB family (§3.2): its own state, run next to the rest
SIZES = ("quick", "full")
DTYPES = {"float64": jnp.float64, "float32": jnp.float32}

_PROBLEM_FIELDS = {
    "d": int, "K": int, "covered": int, "n0": int, "sigma": float, "shift": str, "shift_norm": float,
    "shift_leak": float, "context_uncovered_scale": float, "offline_leakage": float, "mu_covered": float,
    "mu_uncovered": float,
}
_SHAPE_FIELDS = ("d", "K", "covered")  # fix array shapes: not allowed to vary across cases
_ALGO_COMMON = {"lam": float, "delta": float, "S": float, "c_beta": float, "S_off": float, "tau1": int,
                "lam0": float}
_ALGO_OWN = {"name": str, "kind": str, "rho_scale": float, "penalty": str}
_TOP_REQUIRED = {"name", "version", "problem", "run", "algorithms"}
_TOP_OPTIONAL = {"description", "experiment", "cases", "algorithm_defaults", "baseline"}
_RUN_FIELDS = ({"full", "quick"}, {"seed", "dtype", "record_every"})
_SIZE_FIELDS = ({"T", "seeds", "checkpoints"}, set())


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: str
    kind: str
    rho_scale: float = 1.0
    penalty: str = "ellipsoid"
    lam: float = 1.0
    delta: float = 0.05
    S: float = 1.0
    c_beta: float = 0.3
    S_off: float = 2.0
    tau1: int = 100
    lam0: float | None = None


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    T: int
    seeds: int
    checkpoints: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    version: int
    description: str
    experiment: str
    problem: dict[str, Any]
    cases: tuple[tuple[str, dict[str, Any]], ...]  # (case name, full problem dict)
    algorithms: tuple[AlgorithmConfig, ...]
    sizes: dict[str, SizeConfig]
    seed: int
    dtype: str
    record_every: int
    baseline: str


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def _check_keys(where, table, required, optional):
    if not isinstance(table, dict):
        raise ValueError(f"invalid bandit config field '{where}': must be a table, got {table!r}")
    prefix = f"{where}." if where else ""
    unknown = sorted(set(table) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"unknown bandit config field '{prefix}{unknown[0]}': allowed keys here are "
                         + ", ".join(sorted(set(required) | set(optional))))
    missing = sorted(set(required) - set(table))
    if missing:
        raise ValueError(f"missing bandit config field '{prefix}{missing[0]}' (required: "
                         f"{', '.join(sorted(required))})")


def _typed(where, value, kind):
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"invalid bandit config field '{where}': must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"invalid bandit config field '{where}': must be a number, got {value!r}")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ValueError(f"invalid bandit config field '{where}': must be a string, got {value!r}")
    return value


def _env_params(where: str, problem: dict[str, Any], dtype) -> EnvParams:
    fields = {k: v for k, v in problem.items() if k not in _SHAPE_FIELDS}
    fields["shift_kind"] = fields.pop("shift")
    try:
        return EnvParams.make(**fields, dtype=dtype)
    except ValueError as err:  # re-anchor the message at the config field
        msg = str(err).replace("invalid env field '", f"invalid bandit config field '{where}.")
        msg = msg.replace(f"'{where}.shift_kind'", f"'{where}.shift'")
        raise ValueError(msg) from None


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a parsed TOML dictionary."""
    _check_keys("", data, _TOP_REQUIRED, _TOP_OPTIONAL)
    name, version = data["name"], data["version"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid bandit config field 'name': must be a non-empty string, got {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid bandit config field 'version': must be an integer >= 1, got {version!r}")

    _check_keys("problem", data["problem"], _PROBLEM_FIELDS, set())
    problem = {k: _typed(f"problem.{k}", v, _PROBLEM_FIELDS[k]) for k, v in data["problem"].items()}
    try:
        BanditSpec(d=problem["d"], K=problem["K"], covered=problem["covered"], n0_max=max(problem["n0"], 0))
    except ValueError as err:
        raise ValueError(str(err).replace("invalid bandit spec field '", "invalid bandit config field 'problem."))

    cases = []
    raw_cases = data.get("cases", [])
    if not isinstance(raw_cases, list):
        raise ValueError("invalid bandit config field 'cases': must be an array of tables")
    overridable = set(_PROBLEM_FIELDS) - set(_SHAPE_FIELDS)
    for i, case in enumerate(raw_cases):
        where = f"cases[{i}]"
        _check_keys(where, case, {"name"}, overridable)
        merged = dict(problem)
        merged.update({k: _typed(f"{where}.{k}", v, _PROBLEM_FIELDS[k]) for k, v in case.items() if k != "name"})
        cases.append((_typed(f"{where}.name", case["name"], str), merged))
    if not cases:
        cases = [("main", dict(problem))]
    if len({c[0] for c in cases}) != len(cases):
        raise ValueError("invalid bandit config field 'cases': case names must be unique")
    for i, (_, merged) in enumerate(cases):
        _env_params("problem" if not raw_cases else f"cases[{i}]", merged, jnp.float64)

    _check_keys("run", data["run"], *_RUN_FIELDS)
    run = data["run"]
    seed = _typed("run.seed", run.get("seed", 0), int)
    dtype = _typed("run.dtype", run.get("dtype", "float64"), str)
    if dtype not in DTYPES:
        raise ValueError(f"invalid bandit config field 'run.dtype': allowed values are {', '.join(DTYPES)}, "
                         f"got {dtype!r}")
    record_every = _typed("run.record_every", run.get("record_every", 50), int)
    if record_every < 1:
        raise ValueError(f"invalid bandit config field 'run.record_every': must be >= 1, got {record_every}")
    sizes = {}
    for size in SIZES:
        where = f"run.{size}"
        _check_keys(where, run[size], *_SIZE_FIELDS)
        T = _typed(f"{where}.T", run[size]["T"], int)
        seeds = _typed(f"{where}.seeds", run[size]["seeds"], int)
        if T < 1 or T % record_every:
            raise ValueError(f"invalid bandit config field '{where}.T': must be a positive multiple of "
                             f"run.record_every = {record_every}, got {T}")
        if seeds < 2:
            raise ValueError(f"invalid bandit config field '{where}.seeds': must be >= 2 (standard errors), "
                             f"got {seeds}")
        cps = run[size]["checkpoints"]
        if not isinstance(cps, list) or not cps:
            raise ValueError(f"invalid bandit config field '{where}.checkpoints': must be a non-empty array")
        cps = tuple(_typed(f"{where}.checkpoints", c, int) for c in cps)
        for c in cps:
            if c < 1 or c > T or c % record_every:
                raise ValueError(f"invalid bandit config field '{where}.checkpoints': each must be a multiple "
                                 f"of run.record_every = {record_every} in [1, T = {T}], got {c}")
        if list(cps) != sorted(set(cps)):
            raise ValueError(f"invalid bandit config field '{where}.checkpoints': must be strictly increasing")
        sizes[size] = SizeConfig(T=T, seeds=seeds, checkpoints=cps)

    defaults = data.get("algorithm_defaults", {})
    _check_keys("algorithm_defaults", defaults, set(), _ALGO_COMMON)
    defaults = {k: _typed(f"algorithm_defaults.{k}", v, _ALGO_COMMON[k]) for k, v in defaults.items()}
    raw_algos = data["algorithms"]
    if not isinstance(raw_algos, list) or not raw_algos:
        raise ValueError("invalid bandit config field 'algorithms': must be a non-empty array of tables")
    algos = []
    for i, raw in enumerate(raw_algos):
        where = f"algorithms[{i}]"
        _check_keys(where, raw, {"name", "kind"}, (set(_ALGO_OWN) | set(_ALGO_COMMON)) - {"name", "kind"})
        fields = dict(defaults)
        kinds = {**_ALGO_COMMON, **_ALGO_OWN}
        fields.update({k: _typed(f"{where}.{k}", v, kinds[k]) for k, v in raw.items()})
        if fields["kind"] not in ALGORITHM_KINDS:
            raise ValueError(f"invalid bandit config field '{where}.kind': allowed values are "
                             f"{', '.join(ALGORITHM_KINDS)}, got {fields['kind']!r}")
        if fields.get("penalty", "ellipsoid") not in alg.PENALTY_FORMS:
            raise ValueError(f"invalid bandit config field '{where}.penalty': allowed values are "
                             f"{', '.join(alg.PENALTY_FORMS)}, got {fields['penalty']!r}")
        if "rho_scale" in fields and not fields["rho_scale"] >= 0:
            raise ValueError(f"invalid bandit config field '{where}.rho_scale': must be >= 0, "
                             f"got {fields['rho_scale']!r}")
        cfg = AlgorithmConfig(**fields)
        try:  # validate the numeric fields through the algorithm constructors
            if cfg.kind in SUP_KINDS:
                sup.sup_params(problem["d"], sizes["full"].T, problem["K"], lam=cfg.lam, delta=cfg.delta,
                               c_beta=cfg.c_beta)
            alg.minucb_params(problem["d"], learned=cfg.kind == "learned", T=sizes["full"].T, tau1=cfg.tau1,
                              lam=cfg.lam, delta=cfg.delta, S=cfg.S, c_beta=cfg.c_beta, S_off=cfg.S_off,
                              lam0=cfg.lam0, penalty=cfg.penalty)
        except ValueError as err:
            raise ValueError(str(err).replace("invalid algorithm field '", f"invalid bandit config field '{where}."))
        algos.append(cfg)
    names = [a.name for a in algos]
    if len(set(names)) != len(names):
        raise ValueError("invalid bandit config field 'algorithms': names must be unique")
    baseline = data.get("baseline", next((a.name for a in algos if a.kind == "oful"), None))
    if baseline not in names:
        raise ValueError(f"invalid bandit config field 'baseline': must name one of the algorithms "
                         f"({', '.join(names)}), got {baseline!r}")
    return ExperimentConfig(
        name=name, version=version, description=str(data.get("description", "")),
        experiment=str(data.get("experiment", name)), problem=problem, cases=tuple(cases),
        algorithms=tuple(algos), sizes=sizes, seed=seed, dtype=dtype, record_every=record_every,
        baseline=baseline)


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bandit config '{path}' not found")
    with path.open("rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"bandit config '{path}' is not valid TOML: {err}") from None
    return config_from_dict(data)


# ----------------------------------------------------------------------------------------------------
# From configs to arrays


class AlgoArrays(eqx.Module):
    """The per-algorithm fields of a config as arrays; combined with a drawn :class:`Problem` they give
    the :class:`MinUCBParams` (the oracle certificate depends on the replica's random basis)."""

    kind: jax.Array
    rho_scale: jax.Array
    box: jax.Array
    tau1: jax.Array
    delta_cert: jax.Array
    lam: jax.Array
    lam0: jax.Array
    delta: jax.Array
    S: jax.Array
    S_off: jax.Array
    c_beta: jax.Array
    # Which algorithms belong to which family (static: it fixes the program's structure).
    minucb_idx: tuple[int, ...] = eqx.field(static=True, default=())
    sup_idx: tuple[int, ...] = eqx.field(static=True, default=())


def algo_arrays(algos, T: int, dtype) -> AlgoArrays:
    f = lambda key: jnp.asarray([getattr(a, key) for a in algos], dtype)  # noqa: E731
    return AlgoArrays(
        kind=jnp.asarray([ALGORITHM_KINDS.index(a.kind) for a in algos], jnp.int32), rho_scale=f("rho_scale"),
        box=jnp.asarray([a.penalty == "box" for a in algos]), tau1=jnp.asarray([a.tau1 for a in algos], jnp.int32),
        delta_cert=jnp.asarray([a.delta / (2 * alg.num_refreshes(T, a.tau1)) for a in algos], dtype),
        lam=f("lam"), lam0=jnp.asarray([a.lam if a.lam0 is None else a.lam0 for a in algos], dtype),
        delta=f("delta"), S=f("S"), S_off=f("S_off"), c_beta=f("c_beta"),
        minucb_idx=tuple(i for i, a in enumerate(algos) if a.kind not in SUP_KINDS),
        sup_idx=tuple(i for i, a in enumerate(algos) if a.kind in SUP_KINDS))


def params_for_problem(a: AlgoArrays, problem: Problem) -> alg.MinUCBParams:
    """MinUCBParams of one algorithm (unbatched ``a``) on one drawn problem."""
    k = lambda name: a.kind == ALGORITHM_KINDS.index(name)  # noqa: E731
    eye = jnp.eye(problem.theta.shape[0], dtype=problem.theta.dtype)
    scalar = k("scalar") | k("naive")
    rho = jnp.select([k("naive"), k("scalar"), k("ellipsoidal") | k("pooled_only")],
                     [0.0, a.rho_scale * problem.shift_l2, a.rho_scale * problem.cert_rho], 0.0)
    return alg.MinUCBParams(
        lam=a.lam, delta=a.delta, sigma=problem.sigma, S=a.S, c_beta=a.c_beta,
        use_online=~(k("naive") | k("pooled_only")), use_pooled=~k("oful"), rho=rho.astype(a.lam.dtype),
        Minv=jnp.where(scalar, eye, problem.cert_Minv), learned=k("learned"), box=a.box, tau1=a.tau1,
        delta_cert=a.delta_cert, lam0=a.lam0, S_off=a.S_off)


def sup_params_for_problem(a: AlgoArrays, problem: Problem, T: int, K: int) -> sup.SupParams:
    """SupParams of one SupLinUCB-family algorithm (unbatched ``a``) on one drawn problem."""
    pooled = a.kind == ALGORITHM_KINDS.index("sup_minucb")
    return sup.SupParams(
        lam=a.lam, alpha=a.c_beta * jnp.sqrt(0.5 * jnp.log(2.0 * T * K / a.delta)),
        threshold=jnp.asarray(1.0 / math.sqrt(T), a.lam.dtype), use_pooled=pooled,
        rho=jnp.where(pooled, a.rho_scale * problem.cert_rho, 0.0).astype(a.lam.dtype), Minv=problem.cert_Minv)


def _take(algos: AlgoArrays, idx: tuple[int, ...]) -> AlgoArrays:
    return jax.tree.map(lambda x: x[np.asarray(idx)], algos)


def _run_batch(keys, spec: BanditSpec, run: RunSpec, env: EnvParams, algos: AlgoArrays) -> Record:
    """All cases (leading axis of ``env``) x seeds (``keys``) x algorithms. Returns records with leading
    axes (C, R, B, A). Each key is consumed: split into the problem draw and the round stream."""
    families = []
    if algos.minucb_idx:
        families.append((MinUCBFamily(), algos.minucb_idx,
                         lambda a, problem: jax.vmap(params_for_problem, in_axes=(0, None))(a, problem)))
    if algos.sup_idx:
        families.append((SupFamily(sup.num_stages(run.T)), algos.sup_idx,
                         lambda a, problem: jax.vmap(sup_params_for_problem, in_axes=(0, None, None, None))(
                             a, problem, run.T, spec.K)))
    # The families' records come out concatenated; this puts them back in config order.
    order = np.argsort(np.concatenate([np.asarray(idx, int) for _, idx, _ in families]))

    def replica(key, env_params):
        k_problem, k_stream = jax.random.split(key)
        problem = make_problem(k_problem, spec, env_params)
        params = tuple(build(_take(algos, idx), problem) for _, idx, build in families)
        records, _ = rollout_families(k_stream, spec, run, tuple(f for f, _, _ in families), params, problem)
        return jax.tree.map(lambda r: r[:, order], records)

    return jax.vmap(lambda e: jax.vmap(lambda k: replica(k, e))(keys))(env)


run_batch = eqx.filter_jit(_run_batch)


def seed_keys(seed: int, n: int):
    """Replica keys that do not depend on the number of replicas: replica i is ``fold_in(key, i)``."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def prepare(cfg: ExperimentConfig, size: str, seeds: int | None = None, T: int | None = None):
    if size not in SIZES:
        raise ValueError(f"invalid bandit size '{size}': allowed values are {', '.join(SIZES)}")
    sz = cfg.sizes[size]
    T = sz.T if T is None else T
    seeds = sz.seeds if seeds is None else seeds
    dtype = DTYPES[cfg.dtype]
    n0_max = max(p["n0"] for _, p in cfg.cases)
    spec = BanditSpec(d=cfg.problem["d"], K=cfg.problem["K"], covered=cfg.problem["covered"], n0_max=n0_max)
    run = RunSpec(T=T, record_every=cfg.record_every)
    envs = [_env_params(f"cases[{i}]", p, dtype) for i, (_, p) in enumerate(cfg.cases)]
    env = jax.tree.map(lambda *xs: jnp.stack(xs), *envs)
    algos = algo_arrays(cfg.algorithms, T, dtype)
    return spec, run, seed_keys(cfg.seed, seeds), env, algos


# ----------------------------------------------------------------------------------------------------
# Summaries


def _ratio(a, b):
    """Ratio of means mean(a)/mean(b) of paired samples and its delta-method standard error."""
    n = a.shape[0]
    r = a.mean() / b.mean()
    resid = a - r * b
    return float(r), float(resid.std(ddof=1) / math.sqrt(n) / abs(b.mean()))


def summarise(cfg: ExperimentConfig, size: str, records: Record, run: RunSpec, checkpoints=None) -> dict:
    """Mean and standard error (over seeds) of cumulative regret at the checkpoints, ratio to the
    baseline with its paired SE, pooled-branch usage, interval-violation frequencies, certificate
    validity. Plain Python floats, ready for JSON."""
    rec = jax.tree.map(np.asarray, records)
    checkpoints = cfg.sizes[size].checkpoints if checkpoints is None else checkpoints
    checkpoints = [c for c in checkpoints if c <= run.T]
    names = [a.name for a in cfg.algorithms]
    base = names.index(cfg.baseline)
    block_end = (np.arange(run.blocks) + 1) * run.record_every
    out = {"name": cfg.name, "experiment": cfg.experiment, "version": cfg.version, "size": size, "T": run.T,
           "seeds": int(rec.regret.shape[1]), "checkpoints": list(checkpoints), "baseline": cfg.baseline,
           "record_every": run.record_every, "cases": {}}
    for ci, (case, problem) in enumerate(cfg.cases):
        case_out = {"problem": problem, "algorithms": {}}
        for ai, name in enumerate(names):
            reg = rec.regret[ci, :, :, ai]  # (R, B)
            n = reg.shape[0]
            a_out = {"kind": cfg.algorithms[ai].kind, "regret_mean": [], "regret_se": [], "ratio": [],
                     "ratio_se": [], "pooled_fraction": []}
            for c in checkpoints:
                j = c // run.record_every - 1
                a_out["regret_mean"].append(float(reg[:, j].mean()))
                a_out["regret_se"].append(float(reg[:, j].std(ddof=1) / math.sqrt(n)))
                r, se = _ratio(reg[:, j], rec.regret[ci, :, j, base])
                a_out["ratio"].append(r)
                a_out["ratio_se"].append(se)
                a_out["pooled_fraction"].append(float(rec.pooled[ci, :, : j + 1, ai].sum() / (n * c)))
            a_out["curve_t"] = block_end.tolist()
            a_out["curve_mean"] = reg.mean(0).tolist()
            a_out["curve_se"] = (reg.std(0, ddof=1) / math.sqrt(n)).tolist()
            per_block = rec.pooled[ci, :, :, ai] / run.record_every  # (R, B)
            a_out["pooled_per_block"] = per_block.mean(0).tolist()
            a_out["pooled_per_block_se"] = (per_block.std(0, ddof=1) / math.sqrt(n)).tolist()
            ev_on, ev_pool = rec.eval_on[ci, ..., ai].sum(), rec.eval_pool[ci, ..., ai].sum()
            a_out["violation_online"] = float(rec.viol_on[ci, ..., ai].sum() / max(ev_on, 1))
            a_out["violation_pooled"] = float(rec.viol_pool[ci, ..., ai].sum() / max(ev_pool, 1))
            a_out["violation_any_seed_fraction"] = float(
                ((rec.viol_on[ci, ..., ai] + rec.viol_pool[ci, ..., ai]).sum(-1) > 0).mean())
            if cfg.algorithms[ai].kind == "learned":
                after = block_end >= cfg.algorithms[ai].tau1
                a_out["certificate_valid_fraction"] = float(rec.cert_ok[ci, :, after, ai].mean())
            case_out["algorithms"][name] = a_out
        out["cases"][case] = case_out
    return out


def run_config(cfg: ExperimentConfig, size: str = "full", seeds: int | None = None, T: int | None = None):
    """Compile and run one config. Returns (summary dict, raw records, seconds including compilation)."""
    spec, run, keys, env, algos = prepare(cfg, size, seeds, T)
    start = time.perf_counter()
    records = run_batch(keys, spec, run, env, algos)
    records = jax.block_until_ready(records)
    seconds = time.perf_counter() - start
    summary = summarise(cfg, size, records, run)
    summary["seconds"] = seconds
    return summary, records, seconds


__all__ = ["ALGORITHM_KINDS", "AlgorithmConfig", "ExperimentConfig", "SHIFT_KINDS", "config_from_dict",
           "load_config", "params_for_problem", "prepare", "run_batch", "run_config", "seed_keys", "summarise"]
