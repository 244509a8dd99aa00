"""Pure functions that turn a trainer's param groups into ShardedShampoo param groups.

They import nothing from a training framework, so they are testable without one and reusable
by any integration (torchtitan today). Two jobs:

* ``shampoo_group_kwargs`` checks the per-group keys a trainer passes. torchtitan injects
  ``fused`` and ``foreach`` (switches of torch's Adam kernels) into every group; they have no
  meaning for ShardedShampoo, so they are dropped. Any other key that is not a ShardedShampoo
  per-group hyperparameter is rejected with the key named, because a silently ignored
  ``eps`` or ``mesh`` would train with a setting the user did not ask for.
* ``split_expert_groups`` moves 3-D MoE expert weights ``[E, d_in, d_out]`` into a group of
  their own whose ``blocking`` marks the leading dim as indexing E independent matrices, so
  each expert gets its own blocks and factors instead of one preconditioner mixing experts.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

from ..config import BlockingConfig
from ..optimizer import ShardedShampoo
from ..planning.experts import DEFAULT_EXPERT_MODULE_PATTERN, expert_pattern, is_expert_weight
from ..param_groups import BOOKKEEPING_KEYS, OPTIMIZER_WIDE_KEYS

#: torchtitan's ``OptimizersContainer`` adds these to every param group (torch Adam kernel
#: switches); ShardedShampoo has one implementation, so they are dropped.
IGNORED_GROUP_KEYS = ("fused", "foreach")

#: ShardedShampoo arguments that describe the whole optimizer, not one param group.
CONSTRUCTOR_ONLY_KEYS = OPTIMIZER_WIDE_KEYS

_KEY_HINTS = {
    "eps": "ShardedShampoo calls it 'epsilon' (added to the factors; the grafting epsilon is set in "
           "the grafting config, e.g. AdamGrafting(epsilon=1e-8))",
    "nesterov": "ShardedShampoo calls it 'use_nesterov'",
    "amsgrad": "ShardedShampoo has no AMSGrad variant",
}


def shampoo_group_keys() -> frozenset[str]:
    """The per-group hyperparameters ShardedShampoo accepts, read from its signature."""
    params = inspect.signature(ShardedShampoo.__init__).parameters.values()
    named = (p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return frozenset(k for k in named if k not in ("self", "params", *CONSTRUCTOR_ONLY_KEYS))


def shampoo_group_kwargs(group: dict[str, Any], pattern: str = "?") -> dict[str, Any]:
    """``group`` without the ignored keys; ValueError naming any key ShardedShampoo lacks.

    ``params`` and ``param_names`` pass through. ``pattern`` names the trainer's param-group
    pattern in the message so the user finds the config entry to fix.
    """
    accepted = shampoo_group_keys() | set(BOOKKEEPING_KEYS)
    out = {k: v for k, v in group.items() if k not in IGNORED_GROUP_KEYS}
    unknown = sorted(k for k in out if k not in accepted)
    if unknown:
        key = unknown[0]
        if key in CONSTRUCTOR_ONLY_KEYS:
            hint = ("it applies to the whole optimizer: pass it in "
                    "optimizer_factory_kwargs_by_name['ShardedShampoo']")
        else:
            hint = _KEY_HINTS.get(key, f"accepted keys: {sorted(accepted - set(BOOKKEEPING_KEYS))}")
        raise ValueError(f"param group with pattern {pattern!r}: ShardedShampoo has no per-group option "
                         f"{key!r} (unknown keys: {unknown}); {hint}.")
    return out


def expert_blocking(base: Optional[BlockingConfig]) -> BlockingConfig:
    """``base`` with the leading (expert) dim indexing independent matrices (``batch_dims=1``)."""
    return dataclasses.replace(base if base is not None else BlockingConfig(), batch_dims=1)


def split_expert_groups(groups: list[dict[str, Any]],
                        module_pattern: Optional[str] = DEFAULT_EXPERT_MODULE_PATTERN) -> list[dict[str, Any]]:
    """Each group -> its dense part, then its expert part with per-expert ``blocking``.

    Groups must carry ``params`` and ``param_names`` (aligned). Order is kept within each part,
    empty parts are dropped, hyperparameters are copied unchanged. ``module_pattern=None``
    returns the groups as they are (no expert group).
    """
    rx = expert_pattern(module_pattern)
    if rx is None:
        return [dict(g) for g in groups]
    out: list[dict[str, Any]] = []
    for group in groups:
        names, params = list(group["param_names"]), list(group["params"])
        if len(names) != len(params):
            raise ValueError(f"param group has {len(params)} params but {len(names)} param_names; they must align.")
        is_expert = [is_expert_weight(n, p.ndim, rx) for n, p in zip(names, params)]
        rest = {k: v for k, v in group.items() if k not in BOOKKEEPING_KEYS}
        dense = [(n, p) for (n, p), e in zip(zip(names, params), is_expert) if not e]
        experts = [(n, p) for (n, p), e in zip(zip(names, params), is_expert) if e]
        if dense:
            out.append({**rest, "params": [p for _, p in dense], "param_names": [n for n, _ in dense]})
        if experts:
            out.append({**rest, "params": [p for _, p in experts], "param_names": [n for n, _ in experts],
                        "blocking": expert_blocking(rest.get("blocking"))})
    return out
