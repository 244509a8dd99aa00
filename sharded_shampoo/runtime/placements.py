"""Infer the optimizer's mesh and each parameter's layout from DTensor parameters.

Supported layouts (anything else raises NotImplementedError naming the parameter):
- 1-D mesh: ``(Shard(0),)`` from ``fully_shard``, or ``(Replicate(),)``;
- 2-D HSDP mesh (replicate, shard): ``(Replicate(), Shard(0))`` or ``(Replicate(), Replicate())``;
- plain tensors: replicated on every rank of the mesh (DDP, or unsharded parameters).
With no DTensor and no ``mesh`` argument, a default process group of size > 1 means DDP-style
replication over the world; otherwise the optimizer runs on one rank. ``mesh="local"`` forces
a single-rank optimizer even when a process group exists (independent per-rank models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..planning.layout import MeshSpec, ParamSpec


@dataclass
class ResolvedMesh:
    spec: MeshSpec
    group: Optional[dist.ProcessGroup]
    rank: int
    param_specs: list[ParamSpec]
    device_mesh: Any = None


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _sharded_from_placements(name: str, placements: tuple, ndim: int) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    kinds = tuple(placements)
    if ndim == 1:
        if kinds == (Shard(0),):
            return True
        if kinds == (Replicate(),):
            return False
    elif ndim == 2:
        if kinds == (Replicate(), Shard(0)):
            return True
        if kinds == (Replicate(), Replicate()):
            return False
    raise NotImplementedError(
        f"parameter {name!r} has placements {kinds} on a {ndim}-D mesh; ShardedShampoo supports Shard(0) "
        "(FSDP2), (Replicate(), Shard(0)) (HSDP) and replicated parameters. Tensor-parallel placements such "
        "as Shard(1) are not supported yet: keep the optimizer on an FSDP/HSDP mesh.")


def _group_for(device_mesh: Any) -> Optional[dist.ProcessGroup]:
    """A process group whose rank order is the mesh's row-major order (None = the world group)."""
    flat = device_mesh.mesh.flatten().tolist()
    if flat == list(range(dist.get_world_size())):
        return None
    if device_mesh.ndim == 1:
        return device_mesh.get_group()
    return device_mesh._flatten().get_group()


def resolve_mesh(params: list[torch.Tensor], names: list[str], mesh: Any = None) -> ResolvedMesh:
    """Pick the mesh (explicit, from DTensors, or the DDP world) and describe every parameter on it."""
    dmeshes = []
    for p in params:
        if _is_dtensor(p) and all(p.device_mesh is not m for m in dmeshes):
            dmeshes.append(p.device_mesh)
    if isinstance(mesh, str):
        if mesh != "local":
            raise ValueError(f"mesh must be None, 'local' or a DeviceMesh; got {mesh!r}.")
        if dmeshes:
            raise ValueError("mesh='local' runs the optimizer on this rank alone, but some parameters are "
                             "DTensors; pass their DeviceMesh (or None) instead.")
        specs = [ParamSpec(n, tuple(p.shape), p.dtype, sharded=False) for p, n in zip(params, names)]
        return ResolvedMesh(MeshSpec((1,)), None, 0, specs)
    if mesh is None:
        if len(dmeshes) > 1 and any(m != dmeshes[0] for m in dmeshes[1:]):
            raise ValueError("parameters live on different device meshes; pass mesh= explicitly (the mesh "
                             "that FSDP/HSDP shards over) so every parameter is planned on the same ranks.")
        if dmeshes:
            mesh = dmeshes[0]
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            device = params[0].device.type
            mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh is None:
        specs = [ParamSpec(n, tuple(p.shape), p.dtype, sharded=False) for p, n in zip(params, names)]
        return ResolvedMesh(MeshSpec((1,)), None, 0, specs)
    if not hasattr(mesh, "mesh") or mesh.ndim not in (1, 2):
        raise ValueError(f"mesh must be a 1-D or 2-D (replicate, shard) DeviceMesh; got {mesh!r}.")
    shape = tuple(int(s) for s in mesh.mesh.shape)
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError("this rank is not part of the given mesh; build the optimizer on the ranks of the mesh.")
    rank = coord[0] * shape[-1] + coord[1] if len(shape) == 2 else coord[0]
    specs = []
    for p, n in zip(params, names):
        if _is_dtensor(p):
            if p.device_mesh != mesh:
                raise ValueError(f"parameter {n!r} lives on mesh {p.device_mesh} but the optimizer mesh is {mesh}; "
                                 "pass the mesh the parameter is sharded over.")
            sharded = _sharded_from_placements(n, tuple(p.placements), mesh.ndim)
        else:
            sharded = False
        specs.append(ParamSpec(n, tuple(p.shape), p.dtype, sharded=sharded))
    group = _group_for(mesh) if MeshSpec(shape).world_size > 1 else None
    return ResolvedMesh(MeshSpec(shape), group, rank, specs, mesh)
