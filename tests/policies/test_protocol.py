"""The policy protocol (jaxq.policies.protocol): policies built from parts, validated when built,
loaded by name or from a file; the per-job bulk forms agree in distribution with the built-ins' fast
ones on the time-stepped engine; the population engine refuses a policy that tells GPUs of one
configuration apart, before tracing; and the package keeps equinox's abstract/final rule."""

import importlib
import inspect
import pkgutil
import textwrap
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.policies import (
    DECODE_FIRST,
    AbstractPerJobRouter,
    GreedyRouter,
    OccupancyGate,
    Policy,
    SharedGpus,
    StaticPartition,
    get_policy,
    lexicographic_argmin,
    load_policy,
    per_job,
)
from jaxq.api import run
from jaxq.testing.scenarios import canonical

CANONICAL = canonical()


# the greedy and the split router by default; the coupled and any-slot routers with --run-slow
@pytest.mark.parametrize("name", ["gg-sp", "sli"] + [pytest.param(p, marks=pytest.mark.slow) for p in ("fi-wsp", "gf-wsp")])
def test_per_job_bulk_forms_agree_with_the_fast_ones(name):
    """Every built-in router (greedy, split, coupled, any free slot) and the uniform prefill placement:
    the stepped engine with the fast bulk forms and with the per-job ones they replace (one route or
    prefill_gpu call per job) agree on revenue, occupancy and the decode buffer within 4 SE."""
    kw = dict(n=10, replicas=24, horizon=300.0, warmup=60.0, engine="stepped")
    fast = run(CANONICAL, name, seed=0, **kw)
    slow = run(CANONICAL, per_job(get_policy(name)), seed=1, **kw)
    assert not fast.status and not slow.status
    for key in ("revenue_bundled", "x", "y_s", "q_d", "throughput"):
        a, b = fast.summary[key], slow.summary[key]
        se = np.hypot(np.atleast_1d(a.se), np.atleast_1d(b.se))
        z = np.abs(np.atleast_1d(b.mean - a.mean)) / np.where(se > 0, se, 1.0)
        assert np.all(z <= 4), (key, a.mean, b.mean, z)


class _LowestIndexJSQ(AbstractPerJobRouter):
    """Join the least-loaded GPU, ties to the lowest index: tells GPUs of one configuration apart."""

    num_buffers: ClassVar[int] = 1
    exchangeable: ClassVar[bool] = False

    def route(self, key, view, targets, cls, buffer, gpu):
        load = jnp.sum(view.decodes, axis=1)
        return lexicographic_argmin(view.free_decode > 0, load, jnp.zeros_like(load)), jnp.int32(0)


def test_population_engine_refuses_a_policy_that_tells_gpus_apart():
    policy = Policy("jsq-lowest", OccupancyGate(), _LowestIndexJSQ(), StaticPartition())
    with pytest.raises(ValueError, match="population.*_LowestIndexJSQ.*exact"):
        run(CANONICAL, policy, engine="population", n=4, replicas=1, horizon=1.0)
    res = run(CANONICAL, policy, n=4, replicas=2, horizon=20.0)  # the exact engine runs it
    assert not res.status


def test_policies_are_validated_when_built():
    parts = (OccupancyGate(), GreedyRouter(), StaticPartition())
    with pytest.raises(ValueError, match="'order'"):
        Policy("p", *parts, order=("route", "admit"))
    with pytest.raises(ValueError, match="'planning'"):
        Policy("p", *parts, planning="fair")
    with pytest.raises(ValueError, match="'router'"):
        Policy("p", OccupancyGate(), StaticPartition(), StaticPartition())
    with pytest.raises(ValueError, match="'name'"):
        Policy("", *parts)
    p = Policy("p", *parts)
    assert p.order == DECODE_FIRST and p.num_buffers == 1 and p.exchangeable
    assert hash(p) == hash(Policy("p", *parts)) and p == Policy("p", *parts)  # static: a cache key
    assert Policy("q", OccupancyGate(), GreedyRouter(), SharedGpus()) != p


def test_load_policy_by_name_file_and_module(tmp_path, monkeypatch):
    assert load_policy("GG-SP") is get_policy("gg-sp")
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent("""
        from jaxq.policies import GreedyRouter, OccupancyGate, Policy, StaticPartition

        mine = Policy("mine", OccupancyGate(), GreedyRouter(), StaticPartition())

        def factory():
            return mine

        not_a_policy = 3
    """))
    assert load_policy(f"{f}:mine").name == "mine"
    assert load_policy(f"{f}:factory").name == "mine"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_policy("mine:mine").name == "mine"
    for bad, match in ((f"{tmp_path}/absent.py:mine", "no such file"), (f"{f}:absent", "has no 'absent'"),
                       (f"{f}:not_a_policy", "not a jaxq.policies.Policy"), ("nope", "one of gg-sp"),
                       ("no_such_module:x", "cannot import"), (3, "one of gg-sp")):
        with pytest.raises(ValueError, match=match):
            load_policy(bad)


def _jaxq_classes():
    for info in pkgutil.walk_packages(jaxq.__path__, "jaxq."):
        if info.name.split(".")[1] in ("policies", "sim"):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, eqx.Module):
                    yield obj


def test_abstract_or_final():
    """equinox's rule (../shared/STYLE.md): a Module of the engines or policies is abstract or final; no
    class subclasses a concrete one, and none overrides a concrete method of a base."""
    for cls in _jaxq_classes():
        for base in cls.__mro__[1:]:
            if not base.__module__.startswith("jaxq.") or not issubclass(base, eqx.Module):
                continue
            assert inspect.isabstract(base) or base.__abstractvars__ or base.__abstractclassvars__, (
                f"{cls.__name__} subclasses the concrete {base.__name__}")
            for name, member in vars(cls).items():
                if name.startswith("__") or not callable(getattr(member, "__get__", None)):
                    continue
                if name in vars(base) and name not in base.__abstractmethods__:
                    pytest.fail(f"{cls.__name__}.{name} overrides the concrete {base.__name__}.{name}")
