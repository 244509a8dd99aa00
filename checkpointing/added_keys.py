"""Checkpoints written before a param-group setting existed: load them with the live value (or its alias).

DCP loads exactly the keys of the request state dict, which is built from the live optimizer, so
a param-group setting added to ShardedShampoo after a checkpoint was written would fail the load
with "Missing key ... param_groups.<fqn>.<setting>". :func:`request_without_added_keys` drops such
entries from the request when the checkpoint lacks them -- requesting the deprecated setting they
replace instead where there is one (``use_decoupled_weight_decay`` for ``weight_decay_type``) --
and returns the function that puts the values back after the load: the converted alias, else the
live value. Works on torch's flattened (``param_groups.<fqn>.<key>``) and nested
(``param_groups.<i>.<key>``) optimizer layouts. Used by :func:`.loading.load_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from sharded_shampoo.config import WeightDecayType

#: param-group settings added after checkpoints were first written -> the deprecated key they replace
ADDED_GROUP_KEYS: dict[str, str | None] = {"weight_decay_type": "use_decoupled_weight_decay", "peak_lr": None,
                                           "iterate_averaging": None}


def _converted(key: str, legacy_value: Any) -> Any:
    if key == "weight_decay_type":
        return WeightDecayType.DECOUPLED.value if legacy_value else WeightDecayType.L2.value
    raise AssertionError(f"no conversion for {key!r}")


def _entries(optim: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """``(container, key in it, stored DCP key below 'optim.')`` of every param-group setting."""
    out: list[tuple[dict[str, Any], str, str]] = []
    groups = optim.get("param_groups")
    if isinstance(groups, list):                          # nested layout
        for i, group in enumerate(groups):
            out.extend((group, k, f"param_groups.{i}.{k}") for k in list(group))
    else:                                                 # flattened layout
        out.extend((optim, k, k) for k in list(optim) if k.startswith("param_groups."))
    return out


def request_without_added_keys(app: dict[str, Any], stored: Collection[str], prefix: str) -> Callable[[], None]:
    """Adapt ``app['optim']`` (the load request) to a checkpoint whose keys are ``stored`` (full DCP
    keys, ``prefix`` before ``optim.``); the returned function restores the dropped entries after the load."""
    optim = app.get("optim")
    if not isinstance(optim, dict):
        return lambda: None
    restores: list[Callable[[], None]] = []
    for container, key, dcp_key in _entries(optim):
        setting = key.rsplit(".", 1)[-1]
        if setting not in ADDED_GROUP_KEYS or f"{prefix}optim.{dcp_key}" in stored:
            continue
        live = container.pop(key)
        legacy = ADDED_GROUP_KEYS[setting]
        legacy_key = key[: len(key) - len(setting)] + legacy if legacy else None
        if legacy_key is not None and f"{prefix}optim.{dcp_key[: len(dcp_key) - len(setting)]}{legacy}" in stored:
            container[legacy_key] = False          # a placeholder DCP replaces with the stored value
        else:
            legacy_key = None

        def restore(container: dict[str, Any] = container, key: str = key, live: Any = live,
                    legacy_key: str | None = legacy_key, setting: str = setting) -> None:
            container[key] = live if legacy_key is None else _converted(setting, container.pop(legacy_key))
        restores.append(restore)

    def restore_all() -> None:
        for restore in restores:
            restore()
    return restore_all


__all__ = ["ADDED_GROUP_KEYS", "request_without_added_keys"]
