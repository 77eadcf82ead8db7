"""Configs, the batched runner and the CLI: validation, trace counts, vmap equivalence, outputs."""

import json
import re
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from jaxq.bandits import experiment as X
from jaxq.cli import main as jaxq_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bandits"


def _raw(name="e1"):
    with (CONFIGS / f"{name}.toml").open("rb") as fh:
        return tomllib.load(fh)


@pytest.mark.parametrize("name", ["e1", "e2", "e3", "e4", "e5", "e6"])
def test_shipped_configs_load(name):
    cfg = X.load_config(CONFIGS / f"{name}.toml")
    assert cfg.experiment == name.upper()
    assert cfg.sizes["full"].T == 5000 and cfg.sizes["full"].seeds == 50
    assert cfg.sizes["full"].checkpoints == (100, 250, 500, 1000, 2000, 5000)
    assert cfg.baseline == "OFUL"
    # The protocol fixes the radius scale for every method (BANDITS.md §5.2).
    assert {a.c_beta for a in cfg.algorithms} == {0.3}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
    cfg = X.load_config(path)
    assert cfg.baseline in [a.name for a in cfg.algorithms]
    assert len({a.c_beta for a in cfg.algorithms}) == 1  # one radius scale per experiment


def _mutate(path, value, name="e1"):
    data = _raw(name)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize("path, value, field", [
    (("problem", "shift"), "sideways", "problem.shift"),
    (("problem", "sigma"), -1.0, "problem.sigma"),
    (("problem", "covered"), 10, "problem.covered"),
    (("problem", "colour"), 1, "problem.colour"),
    (("problem", "K"), _DELETE, "problem.K"),
    (("run", "dtype"), "float16", "run.dtype"),
    (("run", "full", "T"), 5025, "run.full.T"),
    (("run", "full", "seeds"), 1, "run.full.seeds"),
    (("run", "quick", "checkpoints"), [100, 2500], "run.quick.checkpoints"),
    (("run", "quick", "checkpoints"), [500, 250], "run.quick.checkpoints"),
    (("algorithms", 0, "kind"), "thompson", "algorithms[0].kind"),
    (("algorithms", 1, "rho_scale"), -1.0, "algorithms[1].rho_scale"),
    (("algorithms", 1, "c_beta"), 0.0, "algorithms[1].c_beta"),
    (("algorithms", 1, "delta"), 1.5, "algorithms[1].delta"),
    (("algorithm_defaults", "lam"), "one", "algorithm_defaults.lam"),
    (("baseline",), "UCB1", "baseline"),
    (("version",), 0, "version"),
])
def test_invalid_config_names_the_field(path, value, field):
    data = _mutate(path, value)
    with pytest.raises(ValueError, match="'" + re.escape(field) + "'"):
        X.config_from_dict(data)


def test_invalid_case_and_penalty_name_the_field():
    data = _raw("e4")
    data["cases"][1]["d"] = 12  # shapes may not vary across cases
    with pytest.raises(ValueError, match=r"'cases\[1\]\.d'"):
        X.config_from_dict(data)
    data = _raw("e4")
    data["cases"][1]["n0"] = -5
    with pytest.raises(ValueError, match=r"'cases\[1\]\.n0'"):
        X.config_from_dict(data)
    data = _raw("e5")
    data["algorithms"][3]["penalty"] = "ball"
    with pytest.raises(ValueError, match=r"'algorithms\[3\]\.penalty'.*ellipsoid, box"):
        X.config_from_dict(data)


def _small(name="e4", seeds=3, T=100):
    cfg = X.load_config(CONFIGS / f"{name}.toml")
    spec, run, keys, env, algos = X.prepare(cfg, "quick", seeds=seeds, T=T)
    return cfg, spec, run, keys, env, algos


def test_run_batch_traces_once_for_new_values():
    """New parameter values of the same shapes (noise, shift, n0, radius scale, keys) do not retrace."""
    cfg, spec, run, keys, env, algos = _small()
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(X._run_batch, max_traces=1))
    first = counted(keys, spec, run, env, algos)
    env2 = eqx.tree_at(lambda e: (e.sigma, e.shift_norm, e.n0), env,
                       (env.sigma * 0.5, env.shift_norm * 0.8, env.n0 // 2))
    algos2 = eqx.tree_at(lambda a: a.c_beta, algos, algos.c_beta * 2)
    second = counted(X.seed_keys(7, keys.shape[0]), spec, run, env2, algos2)
    assert not np.allclose(np.asarray(first.regret), np.asarray(second.regret))


def test_batched_seeds_equal_single_seed_runs():
    """vmap equivalence: the batched records are those of one-seed runs, seed by seed."""
    cfg, spec, run, keys, env, algos = _small(seeds=3)
    batched = X.run_batch(keys, spec, run, env, algos)
    for i in range(keys.shape[0]):
        single = X.run_batch(keys[i:i + 1], spec, run, env, algos)
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(a)[:, i], np.asarray(b)[:, 0], rtol=1e-10, atol=1e-10)


def test_cases_share_the_online_stream():
    """Cases reuse the seeds: OFUL never reads offline data, so its regret is identical across cases."""
    cfg, spec, run, keys, env, algos = _small("e4")
    rec = X.run_batch(keys, spec, run, env, algos)
    oful = [a.name for a in cfg.algorithms].index("OFUL")
    np.testing.assert_array_equal(np.asarray(rec.regret[0, ..., oful]), np.asarray(rec.regret[1, ..., oful]))
    naive = [a.name for a in cfg.algorithms].index("Naive warm start")
    assert not np.array_equal(np.asarray(rec.regret[0, ..., naive]), np.asarray(rec.regret[1, ..., naive]))


def test_cli_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    rc = jaxq_main(["bandit", str(CONFIGS / "e4.toml"), "--size", "quick", "--seeds", "3", "--T", "100",
                    "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "e4-naive-warm-start.json").read_text())
    assert summary["seeds"] == 3 and summary["T"] == 100 and summary["checkpoints"] == [100]
    for case in ("aligned", "misaligned"):
        algos = summary["cases"][case]["algorithms"]
        assert algos["OFUL"]["ratio"] == [1.0]
        assert algos["Naive warm start"]["pooled_fraction"] == [1.0]
        assert algos["OFUL"]["pooled_fraction"] == [0.0]
        assert all(se > 0 for a in algos.values() for se in a["regret_se"])
    png = out / "e4-naive-warm-start.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    assert "Naive warm start" in capsys.readouterr().out


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    text = (CONFIGS / "e1.toml").read_text().replace('kind = "scalar"', 'kind = "scalr"')
    bad.write_text(text)
    assert jaxq_main(["bandit", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "algorithms[1].kind" in err and "oful, naive" in err
