"""Policy names -> classes. Adding a policy is one file plus one line in ``_POLICIES``; every
evicting policy also gets a ``pyramid_<name>`` variant (``pyramid`` itself wraps snapkv)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from batchmax.policies.base import EvictionPolicy
from batchmax.policies.full import FullPolicy
from batchmax.policies.h2o import H2OPolicy
from batchmax.policies.knorm import KNormPolicy
from batchmax.policies.pyramid import PyramidPolicy
from batchmax.policies.snapkv import SnapKVPolicy
from batchmax.policies.streaming import StreamingPolicy
from batchmax.policies.tova import TOVAPolicy

_POLICIES: dict[str, type[EvictionPolicy]] = {
    "full": FullPolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "tova": TOVAPolicy,
    "snapkv": SnapKVPolicy,
    "knorm": KNormPolicy,
}

# "pyramid" wraps snapkv (the paper's scorer); "pyramid_<name>" wraps every other evicting policy.
_PYRAMIDS: dict[str, str] = {"pyramid": "snapkv"} | {
    f"pyramid_{name}": name for name, cls in _POLICIES.items() if cls.evicts and name != "snapkv"
}


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


_FACTORIES: dict[str, Callable[..., EvictionPolicy]] = dict(_POLICIES)
_FIELDS: dict[str, set[str]] = {name: _init_fields(cls) for name, cls in _POLICIES.items()}
for _name, _scorer in _PYRAMIDS.items():
    _FACTORIES[_name] = functools.partial(PyramidPolicy.from_scorer, _POLICIES[_scorer])
    _FIELDS[_name] = _init_fields(_POLICIES[_scorer]) | {"beta"}


def available_policies() -> list[str]:
    """Every registered policy name, plain policies first, then the pyramid variants."""
    return list(_FACTORIES)


def get_policy(name: str, **overrides: Any) -> EvictionPolicy:
    """A new policy instance; ``overrides`` set its fields (``sink``, ``window``, ``obs_window``,
    ``kernel``, ``beta``...). Unknown names or fields raise ValueError naming what exists."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _FACTORIES:
        raise ValueError(f"unknown kv policy {name!r}; available: {', '.join(available_policies())}")
    unknown = sorted(set(overrides) - _FIELDS[key])
    if unknown:
        raise ValueError(
            f"kv policy {key!r} has no field(s) {', '.join(unknown)}; "
            f"its fields: {', '.join(sorted(_FIELDS[key]))}"
        )
    return _FACTORIES[key](**overrides)
