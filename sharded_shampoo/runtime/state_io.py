"""``state_dict`` / ``load_state_dict`` over the rank runtime, validated before anything is written.

Layout follows ``torch.optim.Optimizer``: ``state`` keyed by the parameter's global index,
``param_groups`` with ``params`` as indices. Per parameter, the state holds one dict per
*owned* block (key ``block_{i}``, never a rank) and the ``momentum`` or GPA / Schedule-Free ``z``
shard if any. Config objects and enums are stored as plain dicts / strings (``config_to_dict``)
so the result loads with ``torch.load(weights_only=True)``. The train/eval mode and the
Schedule-Free ``lr_sum`` are param-group entries (``train_mode``, ``lr_sum``) and load with them.

Multi-process: each rank's ``state`` holds only the blocks it owns, and ``momentum`` / ``z`` of a
DTensor parameter are returned as DTensors with the parameter's mesh and placements, so the dict
works with ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``, flattened or
not): every block key exists on exactly one rank and DCP reshards those like the parameter.

Loading checks everything first (parameter count, names, structural settings, every
hyperparameter value, block keys, tensor shapes) and raises a ValueError naming the first
difference; only then are the tensors copied in place into the live (stacked) state and the
hyperparameters set, so a failed load changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..compute.packing import convertible, to_layout
from ..config import (CONFIG_OBJECT_SETTINGS, STRUCTURAL_SETTINGS, config_from_dict, config_to_dict,
                      storage_neutral, structural_signature)
from ..param_groups import BOOKKEEPING_KEYS, validate_group
from ..update_options import legacy_group_values
from .placements import is_dtensor
from .records import ParamRecord, RankRuntime

#: Per-parameter state laid out like the parameter's local shard (a DTensor in the state dict).
SHARD_STATE_KEYS = ("momentum", "z")


def _shard_state_out(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's momentum / z as a DTensor over the same storage (so DCP reshards it)."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _shard_state_in(p: torch.Tensor, src: Any) -> Any:
    """The local shard of a loaded DTensor momentum / z, laid out like the parameter ``p``."""
    if not is_dtensor(src):
        return src
    if is_dtensor(p) and (src.device_mesh != p.device_mesh or tuple(src.placements) != tuple(p.placements)):
        src = src.redistribute(p.device_mesh, p.placements)
    return src.to_local() if is_dtensor(p) else src.full_tensor()


def _flat_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class StateIO:
    """Reads and writes the optimizer state of one rank's runtime."""

    def __init__(self, runtime: RankRuntime) -> None:
        self.rt = runtime
        self.index = {id(rec.param): rec.index for rec in runtime.params}
        #: per parameter index: the flat state keys of symmetric matrices (loadable packed or full)
        self.symmetric: dict[int, set[str]] = {}
        for rec in runtime.blocks.values():
            fields = runtime.buckets[rec.bucket].fields
            self.symmetric.setdefault(rec.param.index, set()).update(
                f"{rec.state_key}.{name}" for name, f in fields.items() if f.symmetric)

    # ------------------------------------------------------------------ save

    def state_dict(self, param_groups: list[dict[str, Any]], state: Mapping[torch.Tensor, Any]) -> dict[str, Any]:
        out_state = {}
        for p, s in state.items():
            entry = dict(s)
            for key in SHARD_STATE_KEYS:
                if key in entry:
                    entry[key] = _shard_state_out(p, entry[key])
            out_state[self.index[id(p)]] = entry
        groups = []
        for group in param_groups:
            g = {k: (config_to_dict(v) if k in CONFIG_OBJECT_SETTINGS else v) for k, v in group.items()
                 if k != "params"}
            g["params"] = [self.index[id(p)] for p in group["params"]]
            g["param_names"] = [self.rt.params[i].name for i in g["params"]]
            groups.append(g)
        return {"state": out_state, "param_groups": groups}

    # ------------------------------------------------------------------ load

    def prepare(self, param_groups: list[dict[str, Any]], state: Mapping[torch.Tensor, Any],
                state_dict: Mapping[str, Any]) -> "StagedLoad":
        """Validate ``state_dict`` against the live optimizer; nothing is changed until ``apply``."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("ShardedShampoo.load_state_dict expects a dict with 'state' and 'param_groups' "
                             "(as produced by ShardedShampoo.state_dict()).")
        saved_groups = list(state_dict["param_groups"])
        values = self._check_groups(saved_groups, param_groups)
        modes = {v["train_mode"] for v in values if "train_mode" in v}
        if len(modes) > 1:
            raise ValueError("the state dict's param groups with iterate_averaging are in different modes "
                             "(train_mode True in some, False in others); opt.train() / opt.eval() switch all "
                             "groups together, so a state dict written by ShardedShampoo never has that.")
        copies = self._check_state(saved_groups, param_groups, state, state_dict["state"])
        return StagedLoad(copies, values)

    def _check_groups(self, saved_groups: list[Any], live_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Validate names, structure and every hyperparameter; return the values to set per group."""
        if len(saved_groups) != len(live_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups but the optimizer has "
                             f"{len(live_groups)}; build the optimizer with the same groups.")
        out = []
        for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"param group {gi} of the state dict is not a dict with 'params'.")
            live_names = [self.rt.params[self.index[id(p)]].name for p in live["params"]]
            if len(saved["params"]) != len(live_names):
                raise ValueError(f"param group {gi}: state dict has {len(saved['params'])} parameters, the optimizer "
                                 f"{len(live_names)}.")
            saved_names = saved.get("param_names")
            if saved_names is not None and list(saved_names) != live_names:
                diff = next((a, b) for a, b in zip(saved_names, live_names) if a != b)
                raise ValueError(f"param group {gi}: parameter names differ (saved {diff[0]!r}, live {diff[1]!r}).")
            for key in STRUCTURAL_SETTINGS:
                if key not in saved:
                    raise ValueError(f"param group {gi} of the state dict has no {key!r}; it decides the block plan, "
                                     "so the state dict must carry it (was it written by ShardedShampoo.state_dict?).")
                value = config_from_dict(saved[key]) if key in CONFIG_OBJECT_SETTINGS else saved[key]
                if storage_neutral(value) != storage_neutral(live[key]):
                    raise ValueError(f"param group {gi}: {key} differs (checkpoint {value!r}, optimizer "
                                     f"{live[key]!r}); it decides the block plan and state layout, so it must match.")
            values = {k: (tuple(v) if k == "betas" else config_from_dict(v) if k in CONFIG_OBJECT_SETTINGS else v)
                      for k, v in saved.items() if k not in BOOKKEEPING_KEYS and k not in STRUCTURAL_SETTINGS}
            try:
                values = legacy_group_values(values)
            except ValueError as err:
                raise ValueError(f"param group {gi} of the state dict: {err}") from None
            saved_avg, live_avg = values.get("iterate_averaging"), live.get("iterate_averaging")
            if saved_avg != live_avg:
                raise ValueError(f"param group {gi}: iterate_averaging differs (checkpoint {saved_avg!r}, optimizer "
                                 f"{live_avg!r}); it decides the z state and what the parameters hold, so it must "
                                 "match.")
            candidate = dict(live) | values
            try:
                validate_group(candidate)
            except ValueError as err:
                raise ValueError(f"param group {gi} of the state dict: {err}") from None
            loaded, built = structural_signature(candidate), structural_signature(live)
            for key, kind, has in (("betas", "filtered_grad", "has_beta1"), ("momentum", "momentum", "has_momentum")):
                if loaded[has] != built[has]:
                    raise ValueError(f"param group {gi}: the state dict's {key} {candidate[key]!r} changes whether the "
                                     f"{kind} state exists (optimizer: {live[key]!r}); keep it > 0 or == 0 as built.")
            out.append(values)
        return out

    def _check_state(self, saved_groups: list[Any], live_groups: list[dict[str, Any]],
                     state: Mapping[torch.Tensor, Any], saved_state: Mapping[Any, Any]
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every (live tensor, saved tensor) pair to copy, after checking keys and shapes."""
        mapping: dict[Any, int] = {}
        for saved, live in zip(saved_groups, live_groups):
            mapping.update(zip(saved["params"], (self.index[id(p)] for p in live["params"])))
        unknown = sorted(set(saved_state) - set(mapping), key=str)
        if unknown:
            raise ValueError(f"state dict has state for parameter indices {unknown} that belong to no param group.")
        inverse = {v: k for k, v in mapping.items()}
        live_keys = {self.index[id(p)]: _flat_items(s) for p, s in state.items()}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in sorted(set(live_keys) | {mapping[k] for k in saved_state}):
            rec = self.rt.params[i]
            saved_flat = _flat_items(saved_state.get(inverse[i], {}))
            for key in SHARD_STATE_KEYS:
                if key in saved_flat:
                    saved_flat[key] = _shard_state_in(rec.param, saved_flat[key])
            copies.extend(_pairs(rec, saved_flat, live_keys.get(i, {}), self.symmetric.get(i, set())))
        return copies


@dataclass
class StagedLoad:
    """A validated load: the tensor copies and the hyperparameter values to set."""

    copies: list[tuple[torch.Tensor, torch.Tensor]]
    values: list[dict[str, Any]]

    def apply(self, param_groups: list[dict[str, Any]]) -> None:
        with torch.no_grad():
            for dst, src in self.copies:
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        for live, values in zip(param_groups, self.values):
            live.update(values)


def _pairs(rec: ParamRecord, saved: dict[str, Any], live: dict[str, Any],
           symmetric: set[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live, saved) tensor pairs; symmetric matrices saved in the other layout (full ``(d, d)`` vs packed
    ``(d(d+1)/2,)``: ``symmetric_packing`` changed, or a checkpoint from before packing) are converted."""
    if set(saved) != set(live):
        missing = sorted(set(live) - set(saved))
        extra = sorted(set(saved) - set(live))
        raise ValueError(f"state of parameter {rec.name!r} does not match: missing {missing}, unexpected {extra}. "
                         "Was the checkpoint written with other shapes or settings?")
    out = []
    for k, dst in live.items():
        src = saved[k]
        if k in symmetric and isinstance(src, torch.Tensor) and convertible(tuple(src.shape), tuple(dst.shape)):
            src = to_layout(src, tuple(dst.shape))
        if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape):
            got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
            raise ValueError(f"state {rec.name!r}.{k} has shape {got} in the state dict but {tuple(dst.shape)} in "
                             "the optimizer.")
        out.append((dst, src))
    return out
