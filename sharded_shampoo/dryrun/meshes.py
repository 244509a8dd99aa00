"""The dry-run's meshes: named parallel axes -> fake-process-group device meshes and their coordinates.

Axes (sizes; 1 = unused): ``pp`` (pipeline stages), ``dp`` (HSDP replicas), ``fsdp`` (FSDP shards),
``tp`` (tensor parallel), ``ep`` (expert parallel). World size = pp x dp x fsdp x tp; ``pp`` is the
outermost axis (torchtitan's order), so stage ``s`` holds ranks ``[s * W, (s + 1) * W)`` with
``W = dp x fsdp x tp``. Every stage parallelizes its own part of the model over the same
``dp x fsdp x tp`` layout, so the fake process group has ``W`` ranks and the plan of a stage is
made over its ``W`` stage-local ranks (stage-local optimizers). As torchtitan does, both meshes of
a stage are views of one 1-D mesh, unflattened row-major:

* dense ``(dp, fsdp, tp)`` -- FSDP/HSDP over ``(dp, fsdp)``, tensor parallel over ``tp``;
* sparse ``(dp, efsdp, ep)`` with ``efsdp = fsdp * tp / ep`` -- experts sharded over ``ep``, then
  by FSDP over ``(dp, efsdp)``.

Axes of size 1 are left out (``fsdp`` is always there), so ``--mesh 64`` is the 1-D FSDP mesh and
``--mesh 16x64`` the 2-D HSDP mesh of earlier versions. The plan runs over the dense mesh; since
the fake process group cannot all-gather real coordinates, :meth:`FakeMeshes.coordinates` derives
every rank's coordinate in any sub-mesh from the axis names (what the optimizer gathers at run time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .._torch_compat import unflatten_mesh
from ..planning.layout import MeshSpec

#: Largest world the dry-run plans, all pipeline stages together (llama3-405b on
#: ``pp=16,dp=32,fsdp=16,tp=8`` plans in well under 30 s and 4 GiB; see docs/benchmarks.md).
MAX_RANKS = 65536

_AXES = ("pp", "dp", "fsdp", "tp", "ep")


@dataclass(frozen=True)
class MeshAxes:
    """Sizes of the parallel axes of a dry-run (``pp`` last, so positional use of the others keeps its meaning)."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in _AXES:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--mesh: {name} must be an integer >= 1; got {v!r}.")
        if self.world_size > MAX_RANKS:
            raise ValueError(f"--mesh: {self.world_size} ranks is more than the dry-run plans ({MAX_RANKS}); plan a "
                             "smaller mesh (the per-rank numbers of a larger data-parallel mesh follow the same "
                             "pattern: fewer dp replicas give the same per-rank bytes).")
        if (self.fsdp * self.tp) % self.ep:
            raise ValueError(f"--mesh: ep={self.ep} must divide fsdp x tp = {self.fsdp * self.tp} (experts are "
                             "sharded over ep inside the fsdp x tp ranks of a replica, as torchtitan does).")

    @property
    def world_size(self) -> int:
        return self.pp * self.stage_world_size

    @property
    def stage_world_size(self) -> int:
        """Ranks of one pipeline stage: dp x fsdp x tp (the whole world without pp)."""
        return self.dp * self.fsdp * self.tp

    @property
    def efsdp(self) -> int:
        return self.fsdp * self.tp // self.ep

    def dense(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        names = [n for n in ("dp", "fsdp", "tp") if getattr(self, n) > 1 or n == "fsdp"]
        return tuple(names), tuple(getattr(self, n) for n in names)

    def sparse(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        names = [n for n in ("dp", "efsdp", "ep") if getattr(self, n) > 1 or n == "efsdp"]
        return tuple(names), tuple(getattr(self, n) for n in names)

    def expert_mesh_text(self) -> str | None:
        """``"efsdp=8 x ep=8"``: the experts' mesh for the report (None without expert parallelism)."""
        if self.ep == 1:
            return None
        return " x ".join(f"{n}={s}" for n, s in zip(*self.sparse()))


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"64"`` -> ``(64,)`` (FSDP); ``"16x64"`` -> ``(16, 64)`` (HSDP: replicate x shard)."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*[0-9]+\s*([xX]\s*[0-9]+\s*)?", text):
        raise ValueError(f"--mesh {text!r} is not valid: use S (e.g. 64) for FSDP, RxS (e.g. 16x64) for HSDP "
                         "with R replicas of S shards, or named axes such as dp=8,fsdp=32,tp=8 (and pp=N, ep=N).")
    shape = tuple(int(part) for part in re.split(r"[xX]", text.strip()))
    if any(d < 1 for d in shape):
        raise ValueError(f"--mesh {text!r} has a zero dimension: every mesh dimension must be >= 1.")
    return shape


def parse_axes(text: str | tuple[int, ...] | MeshAxes, tp: int | None = None, ep: int | None = None) -> MeshAxes:
    """``"64"``, ``"16x64"``, ``"dp=8,fsdp=32,tp=8"`` (or a shape tuple) -> :class:`MeshAxes`.

    ``tp`` / ``ep`` (the ``--tp`` / ``--ep`` flags) add those axes to a mesh given without them.
    """
    if isinstance(text, MeshAxes):
        axes = text
    elif isinstance(text, tuple):
        axes = _from_shape(text)
    elif isinstance(text, str) and "=" in text:
        axes = _from_names(text)
    else:
        axes = _from_shape(parse_mesh(text))
    extra = {k: v for k, v in (("tp", tp), ("ep", ep)) if v is not None}
    for k, v in extra.items():
        if getattr(axes, k) != 1 and getattr(axes, k) != v:
            raise ValueError(f"--{k} {v} contradicts the mesh's {k}={getattr(axes, k)}; give it once.")
    return MeshAxes(**{n: extra.get(n, getattr(axes, n)) for n in _AXES})


def _from_shape(shape: tuple[int, ...]) -> MeshAxes:
    if len(shape) == 1:
        return MeshAxes(fsdp=shape[0])
    if len(shape) == 2:
        return MeshAxes(dp=shape[0], fsdp=shape[1])
    raise ValueError(f"--mesh {shape}: a shape has 1 (FSDP) or 2 (HSDP) dims; name the axes for more "
                     "(e.g. dp=8,fsdp=32,tp=8).")


def _from_names(text: str) -> MeshAxes:
    sizes: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([0-9]+)\s*", part)
        if not m or m.group(1) not in _AXES:
            raise ValueError(f"--mesh {text!r}: {part.strip()!r} is not an axis=size pair with an axis among "
                             f"{', '.join(_AXES)}.")
        if m.group(1) in sizes:
            raise ValueError(f"--mesh {text!r} names {m.group(1)} twice.")
        sizes[m.group(1)] = int(m.group(2))
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"--mesh {text!r} has a zero dimension: every axis must be >= 1.")
    return MeshAxes(**sizes)


class FakeMeshes:
    """The dense and sparse device meshes of a dry-run, built over an initialised fake process group."""

    def __init__(self, axes: MeshAxes) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.axes = axes
        world = init_device_mesh("cpu", (axes.stage_world_size,), mesh_dim_names=("world",))
        self.views: dict[tuple[str, ...], tuple[int, ...]] = {}
        self.dense = self._view(world, *axes.dense())
        self.sparse = self._view(world, *axes.sparse()) if axes.ep > 1 else None

    def _view(self, world: Any, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        self.views[names] = shape
        return unflatten_mesh(world, 0, shape, names)

    def coordinates(self, mesh: Any, plan_mesh: Any) -> list[tuple[int, ...]]:
        """Every plan rank's coordinate in ``mesh`` (a view or a sub-mesh of one), from its dim names."""
        return view_coordinates(self.views, mesh, range(self.axes.stage_world_size))


def view_coordinates(views: dict[tuple[str, ...], tuple[int, ...]], mesh: Any,
                     ranks: Iterable[int]) -> list[tuple[int, ...]]:
    """The coordinate of each of ``ranks`` in ``mesh``, a sub-mesh of one of ``views``.

    ``views`` maps dim names to the shape of a row-major view of the 1-D world (what
    ``unflatten`` builds); a rank's coordinate in a sub-mesh is its coordinate in the view,
    restricted to the sub-mesh's dims. ``ranks`` are world ranks (with pipeline stages: global).
    """
    names = tuple(mesh.mesh_dim_names or ())
    for view, shape in views.items():
        if set(names) <= set(view):
            picks = [view.index(n) for n in names]
            root = MeshSpec(shape)
            return [tuple(c[i] for i in picks) for c in map(root.coordinate, ranks)]
    raise ValueError(f"the dry-run cannot place mesh {names}: parameters must live on sub-meshes of "
                     f"{list(views)}.")


__all__ = ["MAX_RANKS", "FakeMeshes", "view_coordinates", "MeshAxes", "parse_axes", "parse_mesh"]
