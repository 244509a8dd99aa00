"""``state_dict`` / ``load_state_dict`` for ShardedShampoo, validated before anything is written.

Layout follows ``torch.optim.Optimizer``: ``state`` keyed by the parameter's global index,
``param_groups`` with ``params`` as indices. Per parameter, the state holds one dict per
*owned* block (key ``block_{i}``, never a rank) and the ``momentum`` shard if any. Config
objects are stored as plain dicts (``config_to_dict``) so the result loads with
``torch.load(weights_only=True)``.

Multi-process: each rank's ``state`` holds only the blocks it owns, and ``momentum`` of a DTensor
parameter is returned as a DTensor with the parameter's mesh and placements, so the dict works
with ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``, flattened or not):
every block key exists on exactly one rank and DCP reshards momentum like the parameter.

Loading checks everything first (parameter count, names, block keys, tensor shapes and the
structural settings) and raises a ValueError naming the first difference; only then are the
tensors copied in place into the live (stacked) state, so a failed load changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import STRUCTURAL_SETTINGS as _STRUCTURAL, config_from_dict, config_to_dict

if TYPE_CHECKING:
    from ..optimizer import ShardedShampoo

_CONFIG_KEYS = ("grafting", "preconditioner", "blocking")


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def _momentum_out(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's momentum as a DTensor over the same storage (so DCP reshards it)."""
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _momentum_in(p: torch.Tensor, src: Any) -> Any:
    """The local shard of a loaded DTensor momentum, laid out like the parameter ``p``."""
    if not _is_dtensor(src):
        return src
    if _is_dtensor(p) and (src.device_mesh != p.device_mesh or tuple(src.placements) != tuple(p.placements)):
        src = src.redistribute(p.device_mesh, p.placements)
    return src.to_local() if _is_dtensor(p) else src.full_tensor()


def optimizer_state_dict(opt: "ShardedShampoo") -> dict[str, Any]:
    index = {id(p): i for i, p in enumerate(opt._params)}
    state = {}
    for p, s in opt.state.items():
        entry = dict(s)
        if "momentum" in entry:
            entry["momentum"] = _momentum_out(p, entry["momentum"])
        state[index[id(p)]] = entry
    groups = []
    for group in opt.param_groups:
        g = {k: (config_to_dict(v) if k in _CONFIG_KEYS else v) for k, v in group.items() if k != "params"}
        g["params"] = [index[id(p)] for p in group["params"]]
        g["param_names"] = [opt._names[i] for i in g["params"]]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_optimizer_state(opt: "ShardedShampoo", state_dict: dict[str, Any]) -> None:
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("ShardedShampoo.load_state_dict expects a dict with 'state' and 'param_groups' "
                         "(as produced by ShardedShampoo.state_dict()).")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(groups)} param groups but the optimizer has "
                         f"{len(opt.param_groups)}; build the optimizer with the same groups.")
    index = {id(p): i for i, p in enumerate(opt._params)}
    for gi, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        live_idx = [index[id(p)] for p in live["params"]]
        if len(saved["params"]) != len(live_idx):
            raise ValueError(f"param group {gi}: state dict has {len(saved['params'])} parameters, the optimizer "
                             f"{len(live_idx)}.")
        saved_names = saved.get("param_names")
        live_names = [opt._names[i] for i in live_idx]
        if saved_names is not None and list(saved_names) != live_names:
            diff = next((a, b) for a, b in zip(saved_names, live_names) if a != b)
            raise ValueError(f"param group {gi}: parameter names differ (saved {diff[0]!r}, live {diff[1]!r}).")
        for key in _STRUCTURAL:
            value = config_from_dict(saved[key]) if key in _CONFIG_KEYS else saved.get(key)
            if value != live[key]:
                raise ValueError(f"param group {gi}: {key} differs (checkpoint {value!r}, optimizer "
                                 f"{live[key]!r}); it decides the block plan and state layout, so it must match.")
    # map saved param indices to live ones group by group
    mapping: dict[int, int] = {}
    for saved, live in zip(groups, opt.param_groups):
        mapping.update(zip(saved["params"], (index[id(p)] for p in live["params"])))
    saved_state = state_dict["state"]
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    live_keys = {index[id(p)]: _flat_items(s) for p, s in opt.state.items()}
    inverse = {v: k for k, v in mapping.items()}
    for i in sorted(set(live_keys) | {mapping.get(k, -1) for k in saved_state}):
        if i == -1:
            raise ValueError(f"state dict has state for parameter indices {sorted(set(saved_state) - set(mapping))} "
                             "that belong to no param group.")
        saved_flat = _flat_items(saved_state.get(inverse[i], {}))
        if "momentum" in saved_flat:
            saved_flat["momentum"] = _momentum_in(opt._params[i], saved_flat["momentum"])
        live_flat = live_keys.get(i, {})
        if set(saved_flat) != set(live_flat):
            missing = sorted(set(live_flat) - set(saved_flat))
            extra = sorted(set(saved_flat) - set(live_flat))
            raise ValueError(f"state of parameter {opt._names[i]!r} does not match: missing {missing}, "
                             f"unexpected {extra}. Was the checkpoint written with other shapes or settings?")
        for k, dst in live_flat.items():
            src = saved_flat[k]
            if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape):
                got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ValueError(f"state {opt._names[i]!r}.{k} has shape {got} in the state dict but "
                                 f"{tuple(dst.shape)} in the optimizer.")
            copies.append((dst, src))
    # everything validated: now apply
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))

    for saved, live in zip(groups, opt.param_groups):
        for k, v in saved.items():
            if k in ("params", "param_names") or k in _STRUCTURAL:
                continue
            live[k] = tuple(v) if k == "betas" else v
