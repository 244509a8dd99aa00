"""What a checkpoint must agree on with the optimizer that loads it, and a readable diff.

The *description* (:func:`describe`) records, for a ``ShardedShampoo``, everything that decides
the block plan and the state layout -- trainable parameter names, global shapes and param-group
membership, and per group ``max_preconditioner_dim``, ``preconditioner``, ``grafting``,
``blocking``, whether ``betas[0] > 0``, whether ``momentum > 0`` and ``iterate_averaging`` (GPA /
Schedule-Free; left out while None, so earlier fingerprints stay valid) -- plus the block plan
itself (ids, shapes, exponents). Its *fingerprint* is a hash of exactly that. Owners, the world
size and the mesh are recorded for information only and are not part of the fingerprint: they
change when a run resumes on another number of ranks, and the loader re-plans them.

Settings outside the description (``lr``, ``betas`` values, ``epsilon``, ``weight_decay``,
``momentum``/``dampening`` values, ``use_nesterov``, ``precondition_frequency``,
``start_preconditioning_step``, ``use_bias_correction``, ``comm_dtype``, ``nonfinite_grads``,
parameter dtypes and placements) may change across a resume, and so may the storage-only fields of
the preconditioner config (``symmetric_packing``, ``config.STORAGE_ONLY_FIELDS``): the description
leaves them out, and :func:`adapt_to_saved_layout` lets DCP read a symmetric matrix saved in the other
layout (full ``(d, d)`` -- every checkpoint written before packing -- or packed ``(d(d+1)/2,)``), which
``load_state_dict`` then converts.

:func:`check_compatible` compares a saved description with the live one and raises
:class:`IncompatibleCheckpointError` naming the first things that differ. It is pure (no
tensors, no communication), so the loaders call it before any state is touched.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from sharded_shampoo.compute.packing import convertible
from sharded_shampoo.config import (ADDED_LATER_STRUCTURAL_KEYS, CONFIG_OBJECT_SETTINGS, STORAGE_ONLY_FIELDS,
                                    STRUCTURAL_KEYS, config_from_dict, config_to_dict, storage_neutral,
                                    structural_signature)

from .errors import IncompatibleCheckpointError

if TYPE_CHECKING:
    from sharded_shampoo import ShardedShampoo

FORMAT = "sharded-shampoo.checkpoint/1"


def _canonical(obj: Any) -> Any:
    """``config_to_dict`` output with mapping entries sorted, so equal configs hash equally."""
    if isinstance(obj, dict):
        if "__mapping__" in obj:
            items = [[_canonical(k), _canonical(v)] for k, v in obj["__mapping__"]]
            return {"__mapping__": sorted(items, key=lambda kv: json.dumps(kv, sort_keys=True))}
        return {k: _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def describe(opt: "ShardedShampoo") -> dict[str, Any]:
    """The JSON-safe description of ``opt`` that a checkpoint records (see the module doc)."""
    groups = []
    for g in opt.param_groups:
        sig = structural_signature(g)
        # storage-only choices (symmetric_packing) are left out: state loads across them
        groups.append({k: (_canonical(config_to_dict(storage_neutral(v))) if k in CONFIG_OBJECT_SETTINGS else v)
                       for k, v in sig.items() if not (k in ADDED_LATER_STRUCTURAL_KEYS and v is None)})
    params = [{"name": rec.name, "shape": list(rec.spec.shape), "group": rec.group}
              for rec in opt.runtime.trainable]
    blocks = [[b.block_id, list(b.shape), list(b.exponents)] for b in opt.plan.blocks]
    structure = {"params": params, "groups": groups, "blocks": blocks}
    digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format": FORMAT,
        "fingerprint": digest,
        "params": params,
        "groups": groups,
        "num_blocks": len(blocks),
        # informational only (not fingerprinted): the layout this checkpoint was written from
        "mesh_shape": list(opt.plan.mesh.shape),
        "world_size": opt.plan.mesh.world_size,
    }


def fingerprint(opt: "ShardedShampoo") -> str:
    return describe(opt)["fingerprint"]


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and ("__config__" in value or "__dtype__" in value or "__mapping__" in value):
        return repr(config_from_dict(value))
    return repr(value)


def differences(saved: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """Human-readable differences between two descriptions, most fundamental first."""
    out: list[str] = []
    s_params = {p["name"]: p for p in saved.get("params", [])}
    l_params = {p["name"]: p for p in live["params"]}
    missing = [n for n in l_params if n not in s_params]
    extra = [n for n in s_params if n not in l_params]
    if missing:
        out.append(f"trainable parameters {missing} have no state in the checkpoint (absent or frozen when it "
                   "was saved)")
    if extra:
        out.append(f"the checkpoint has state for parameters {extra} that this optimizer does not train")
    for name, lp in l_params.items():
        sp = s_params.get(name)
        if sp is None:
            continue
        if list(sp["shape"]) != list(lp["shape"]):
            out.append(f"parameter {name!r} has global shape {tuple(sp['shape'])} in the checkpoint but "
                       f"{tuple(lp['shape'])} now")
        if sp["group"] != lp["group"]:
            out.append(f"parameter {name!r} is in param group {sp['group']} in the checkpoint but in group "
                       f"{lp['group']} now")
    if [n for n in s_params] != [n for n in l_params] and not missing and not extra:
        out.append("trainable parameters are in another order than in the checkpoint")
    s_groups, l_groups = saved.get("groups", []), live["groups"]
    if len(s_groups) != len(l_groups):
        out.append(f"the checkpoint has {len(s_groups)} param groups, the optimizer {len(l_groups)}")
    for gi, (sg, lg) in enumerate(zip(s_groups, l_groups)):
        for key in STRUCTURAL_KEYS:
            if _canonical(sg.get(key)) != _canonical(lg.get(key)):
                what = {"has_beta1": "betas[0] > 0", "has_momentum": "momentum > 0"}.get(key, key)
                out.append(f"param group {gi}: {what} differs (checkpoint {_fmt(sg.get(key))}, optimizer "
                           f"{_fmt(lg.get(key))})")
    if not out and saved.get("fingerprint") != live["fingerprint"]:
        out.append(f"the block plan differs (checkpoint {saved.get('num_blocks')} blocks, fingerprint "
                   f"{saved.get('fingerprint')}; optimizer {live['num_blocks']} blocks, fingerprint "
                   f"{live['fingerprint']})")
    return out


def check_compatible(saved: dict[str, Any] | None, live: dict[str, Any], where: str = "checkpoint") -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``saved`` describes the same plan as ``live``."""
    if saved is None:
        raise IncompatibleCheckpointError(
            f"{where} has no ShardedShampoo description (it was not written by sharded_shampoo.checkpointing "
            "or by a TrainState); load it with torch.distributed.checkpoint and set_state_dict directly.")
    if saved.get("format") != FORMAT:
        raise IncompatibleCheckpointError(f"{where} has format {saved.get('format')!r}; this version reads "
                                          f"{FORMAT!r}.")
    if saved.get("fingerprint") == live["fingerprint"]:
        return
    diffs = differences(saved, live)
    raise IncompatibleCheckpointError(
        f"{where} does not match this optimizer: " + "; ".join(diffs) + ". These settings decide the block plan "
        "and the state layout and must be the same when resuming (lr, betas values, epsilon, weight_decay, "
        "precondition_frequency, start_preconditioning_step, the number of ranks and the mesh may change).")


def adapt_to_saved_layout(state_dict: dict[str, Any], metadata: Any) -> list[str]:
    """Make ``state_dict`` (what DCP will load into) ask for the storage layout the checkpoint has;
    returns the keys changed.

    DCP plans a load by the live shapes and refuses a saved tensor of another size. Where a key's saved
    size is the other layout of the live symmetric matrix (``(d, d)`` vs ``(d(d+1)/2,)``), the live tensor
    is replaced, in ``state_dict`` only, by an empty tensor of the saved size; DCP reads into it and the
    optimizer's ``load_state_dict`` converts it by shape. Storage-only config entries of the param groups
    (``...preconditioner.symmetric_packing``) that the checkpoint does not have are not asked for (a
    checkpoint of the default layout omits them). Keys are DCP's: the nested keys joined by ".".
    """
    saved = metadata.state_dict_metadata
    changed: list[str] = []

    def visit(container: dict[str, Any], prefix: str) -> None:
        for key, value in list(container.items()):
            fqn = f"{prefix}{key}"
            if isinstance(value, dict):
                visit(value, fqn + ".")
                continue
            md = saved.get(fqn)
            if md is None and fqn.rsplit(".", 1)[-1] in STORAGE_ONLY_FIELDS:
                del container[key]
                changed.append(fqn)
            elif (isinstance(value, torch.Tensor) and not hasattr(value, "device_mesh")
                    and isinstance(md, TensorStorageMetadata)
                    and convertible(tuple(md.size), tuple(value.shape))):
                container[key] = torch.empty(tuple(md.size), dtype=value.dtype, device=value.device)
                changed.append(fqn)

    visit(state_dict, "")
    return changed


class LayoutAdaptingLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading symmetric matrices in the layout the checkpoint has them in.

    :func:`.storage.load_checkpoint` does this by itself. Pass it to a plain ``dcp.load`` (with a
    :class:`.state.TrainState`, or torch's ``get_state_dict``/``set_state_dict``) to load a checkpoint
    written with the other ``symmetric_packing`` setting or before packing existed; without it DCP
    reports a "Size mismatch" for the factors and roots.
    """

    def set_up_planner(self, state_dict: Any, metadata: Optional[Metadata] = None,
                       is_coordinator: bool = False) -> None:
        if metadata is not None:
            adapt_to_saved_layout(state_dict, metadata)
        super().set_up_planner(state_dict, metadata, is_coordinator)
