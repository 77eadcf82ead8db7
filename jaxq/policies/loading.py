"""Policies by name: a built-in (``gg-sp``), or a user's written once and run on every engine, given
as ``path/to/file.py:NAME`` or ``package.module:NAME``. ``NAME`` is a :class:`Policy` or a callable
(a class or a factory) that returns one when called with no arguments."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .protocol import Policy
from .rules import POLICIES


def load_policy(spec) -> Policy:
    """The policy named by ``spec``: a Policy (returned as is), a built-in's name, or ``FILE.py:NAME`` /
    ``MODULE:NAME``. Raises ValueError naming the field 'policy' and what is allowed."""
    if isinstance(spec, Policy):
        return spec
    allowed = f"one of {', '.join(POLICIES)}, or FILE.py:NAME or MODULE:NAME naming a Policy"
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"invalid field 'policy': must be {allowed}, got {spec!r}")
    if spec.lower() in POLICIES:
        return POLICIES[spec.lower()]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"invalid field 'policy': must be {allowed}, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"invalid field 'policy': no such file {where!r} (in {spec!r})")
        module_name = f"jaxq_user_policy_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # dataclasses (equinox modules) look their module up here
            try:
                loader_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"invalid field 'policy': cannot import module {where!r} (in {spec!r}): {err}") from None
    if not hasattr(module, name):
        raise ValueError(f"invalid field 'policy': {where!r} has no {name!r} (in {spec!r})")
    obj = getattr(module, name)
    if not isinstance(obj, Policy) and callable(obj):
        obj = obj()
    if not isinstance(obj, Policy):
        raise ValueError(f"invalid field 'policy': {spec!r} is not a jaxq.policies.Policy (got {type(obj).__name__})")
    return obj
