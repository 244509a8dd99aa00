"""Live tensors -> the planner's description: the plan mesh, and a ParamSpec per parameter.

The one home of DTensor placement parsing (the optimizer and the dry-run both use it).

* Placements: any mix of ``Shard(d)``, ``_StridedShard(d, sf)`` and ``Replicate()`` on any mesh
  (FSDP2, HSDP, tensor parallel, expert parallel, their combinations). ``Partial`` and unknown
  placements raise, naming the parameter. Plain tensors are held whole by every rank (DDP).
* Meshes: parameters may live on several meshes (dense weights on ``("fsdp", "tp")``, experts on
  ``("efsdp", "ep")``, a 1-D ``dp`` mesh for some modules). The plan runs over the ranks of the
  *plan mesh*: the ``mesh`` argument, or the parameter mesh with the most ranks. Every other
  parameter mesh must cover a subset of its ranks (with pipeline parallelism: this stage's ranks).
  A mesh ``m`` is described to the planner by the coordinate every plan rank has in its own slice
  of ``m`` (:class:`~..planning.layout.SubMesh`); for the plan mesh that is the row-major position,
  for the others one ``all_gather`` at construction tells every rank everyone's coordinates. The
  dry-run, which has no real process group, passes those coordinates itself (``coordinates=``).
* ``mesh=None`` with no DTensor and a default process group of size > 1 means DDP-style replication
  over the world; ``mesh="local"`` forces a single-rank optimizer even inside a process group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

from .._torch_compat import all_gather_into, flatten_mesh
from ..planning.layout import SHARD_TYPES, Layout, MeshSpec, ParamSpec, SubMesh

class MeshKeyword(str, Enum):
    """The strings ``mesh=`` accepts besides ``None`` and a ``DeviceMesh``."""

    LOCAL = "local"  # plan on this rank alone, even inside a process group

    @classmethod
    def parse(cls, mesh: Any) -> Optional["MeshKeyword"]:
        """The keyword ``mesh`` names, None for a non-string (``None`` or a mesh); the one check of strings."""
        if not isinstance(mesh, str):
            return None
        try:
            return cls(mesh)
        except ValueError:
            raise ValueError(f"mesh must be None, {LOCAL_MESH.value!r} or a DeviceMesh; got {mesh!r}.") from None


#: ``mesh="local"``: plan on this rank alone, even inside a process group.
LOCAL_MESH = MeshKeyword.LOCAL

#: ``coordinates(device_mesh, plan_mesh) -> coordinate of every plan rank in device_mesh``.
CoordinatesFn = Callable[[Any, Any], Sequence[tuple[int, ...]]]


@dataclass
class ResolvedMesh:
    """The plan mesh, this rank's place in it, its process group and every parameter's spec."""

    spec: MeshSpec
    group: Optional[dist.ProcessGroup]
    rank: int
    param_specs: list[ParamSpec]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """A DTensor (duck-typed, so no import of torch.distributed.tensor is needed to ask)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a parameter or gradient (DTensor or plain tensor)."""
    return t.to_local() if is_dtensor(t) else t


def check_placements(name: str, placements: Sequence[Any], ndim: int) -> tuple:
    """The placements as a tuple; raise naming the parameter for any we cannot route."""
    from torch.distributed.tensor import Replicate

    for p in placements:
        if isinstance(p, Replicate):
            continue
        if isinstance(p, SHARD_TYPES):
            if not 0 <= p.dim < max(ndim, 1):
                raise ValueError(f"parameter {name!r} has placement {p} on a {ndim}-d tensor.")
            continue
        raise ValueError(f"parameter {name!r} has placements {tuple(placements)}; ShardedShampoo supports "
                         f"Shard(d), _StridedShard and Replicate() placements, not {p!r} (a parameter should "
                         "never be Partial: redistribute it to Replicate or Shard first).")
    return tuple(placements)


def _distinct_meshes(params: Sequence[torch.Tensor]) -> list[Any]:
    meshes: list[Any] = []
    for p in params:
        if is_dtensor(p) and all(p.device_mesh != m for m in meshes):
            meshes.append(p.device_mesh)
    return meshes


def _mesh_ranks(device_mesh: Any) -> list[int]:
    """Global ranks of this rank's slice of ``device_mesh``, row-major."""
    return [int(r) for r in device_mesh.mesh.flatten().tolist()]


def _group_for(device_mesh: Any) -> Optional[dist.ProcessGroup]:
    """A process group whose rank order is the mesh's row-major order (None = the world group)."""
    if _mesh_ranks(device_mesh) == list(range(dist.get_world_size())):
        return None
    if device_mesh.ndim == 1:
        return device_mesh.get_group()
    return flatten_mesh(device_mesh).get_group()


def _plan_mesh(meshes: list[Any], names_by_mesh: dict[int, str], mesh_arg: Any) -> Any:
    """The explicit mesh, or the parameter mesh with the most ranks; check the others fit inside it."""
    plan = mesh_arg if mesh_arg is not None else max(meshes, key=lambda m: m.mesh.numel())
    if not hasattr(plan, "mesh") or not hasattr(plan, "get_coordinate"):
        raise ValueError(f"mesh must be None, {LOCAL_MESH.value!r} or a DeviceMesh; got {plan!r}.")
    if plan.get_coordinate() is None:
        raise ValueError("this rank is not part of the given mesh; build the optimizer on the ranks of the mesh.")
    ranks = set(_mesh_ranks(plan))
    for i, m in enumerate(meshes):
        if not set(_mesh_ranks(m)) <= ranks:
            raise ValueError(f"parameter {names_by_mesh[i]!r} lives on mesh {m} whose ranks are not all ranks of "
                             f"the optimizer mesh {plan}; pass mesh= a DeviceMesh covering every parameter mesh "
                             "(e.g. the root mesh of the model).")
    return plan


def gather_coordinates(meshes: list[Any], plan_mesh: Any, group: Optional[dist.ProcessGroup]) -> list[list[tuple]]:
    """Every plan rank's coordinate in each mesh, by one ``all_gather`` over the plan group."""
    width = max((m.ndim for m in meshes), default=0)
    world = plan_mesh.mesh.numel()
    if not meshes or width == 0:
        return [[] for _ in meshes]
    mine = torch.full((len(meshes), width), -1, dtype=torch.int64)
    for i, m in enumerate(meshes):
        mine[i, :m.ndim] = torch.tensor(m.get_coordinate())
    device = _collective_device(group)
    out = torch.empty(world * len(meshes) * width, dtype=torch.int64, device=device)
    all_gather_into(out, mine.flatten().to(device), group=group)
    table = out.view(world, len(meshes), width).cpu().tolist()
    return [[tuple(table[r][i][:m.ndim]) for r in range(world)] for i, m in enumerate(meshes)]


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _specs_for(params: Sequence[torch.Tensor], names: Sequence[str], submeshes: dict[int, SubMesh],
               meshes: list[Any]) -> list[ParamSpec]:
    specs = []
    for p, n in zip(params, names):
        if is_dtensor(p):
            k = next(i for i, m in enumerate(meshes) if p.device_mesh == m)
            layout = Layout(submeshes[k], check_placements(n, p.placements, p.ndim))
            sharded = any(isinstance(x, SHARD_TYPES) for x in layout.placements)
            specs.append(ParamSpec(n, tuple(p.shape), p.dtype, sharded=sharded, layout=layout))
        else:
            specs.append(ParamSpec(n, tuple(p.shape), p.dtype))
    return specs


def resolve_mesh(params: Sequence[torch.Tensor], names: Sequence[str], mesh: Any = None, *,
                 coordinates: Optional[CoordinatesFn] = None) -> ResolvedMesh:
    """Pick the plan mesh (explicit, from DTensors, or the DDP world) and describe every parameter on it."""
    meshes = _distinct_meshes(params)
    if MeshKeyword.parse(mesh) is MeshKeyword.LOCAL:
        if meshes:
            raise ValueError(f"mesh={LOCAL_MESH.value!r} runs the optimizer on this rank alone, but some parameters are "
                             "DTensors; pass their DeviceMesh (or None) instead.")
        return ResolvedMesh(MeshSpec((1,)), None, 0, _specs_for(params, names, {}, []))
    if mesh is None and not meshes:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(params[0].device.type if params else "cpu", (dist.get_world_size(),))
        else:
            return ResolvedMesh(MeshSpec((1,)), None, 0, _specs_for(params, names, {}, []))
    first_name = {i: next(n for p, n in zip(params, names) if is_dtensor(p) and p.device_mesh == m)
                  for i, m in enumerate(meshes)}
    plan = _plan_mesh(meshes, first_name, mesh)
    shape = tuple(int(s) for s in plan.mesh.shape)
    spec = MeshSpec(shape, tuple(plan.mesh_dim_names) if plan.mesh_dim_names else None)
    world = spec.world_size
    # a dry-run (coordinates given) has no real group to communicate over, and needs none
    group = _group_for(plan) if world > 1 and coordinates is None else None
    coord = plan.get_coordinate()
    rank = 0
    for c, s in zip(coord, shape):
        rank = rank * s + c
    others = [m for m in meshes if m != plan]
    if coordinates is not None:
        gathered = [list(coordinates(m, plan)) for m in others]
    else:
        gathered = gather_coordinates(others, plan, group) if world > 1 else [[tuple(m.get_coordinate())]
                                                                               for m in others]
    submeshes: dict[int, SubMesh] = {}
    for i, m in enumerate(meshes):
        names_m = tuple(m.mesh_dim_names) if m.mesh_dim_names else None
        if m == plan:
            submeshes[i] = SubMesh(shape, SubMesh.root(spec).coords, names_m)
        else:
            submeshes[i] = SubMesh(tuple(int(s) for s in m.mesh.shape), tuple(gathered[others.index(m)]), names_m)
    return ResolvedMesh(spec, group, rank, _specs_for(params, names, submeshes, meshes))


def param_specs_from_tensors(named_params: Iterable[tuple[str, torch.Tensor]], mesh: Any = None, *,
                             coordinates: Optional[CoordinatesFn] = None) -> tuple[list[ParamSpec], MeshSpec]:
    """ParamSpecs and the plan mesh of (name, tensor) pairs, without a process group of real ranks.

    For the dry-run and notebooks: DTensors on a fake process group need ``coordinates`` when they
    live on more than one mesh (see the module doc).
    """
    named = list(named_params)
    resolved = resolve_mesh([t for _, t in named], [n for n, _ in named], mesh, coordinates=coordinates)
    return resolved.param_specs, resolved.spec


__all__ = ["CoordinatesFn", "LOCAL_MESH", "MeshKeyword", "ResolvedMesh", "check_placements", "gather_coordinates", "is_dtensor",
           "local_tensor", "param_specs_from_tensors", "resolve_mesh"]
