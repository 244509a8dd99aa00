"""Every private torch name the project uses, in one place.

torch may rename or drop a private name in any release. Each one the library, the tests or the
scripts need is reached through this module only, with why we need it and what replaces it once
torch makes it public; ``tests/test_torch_compat.py`` checks that each exists on the installed
torch, so an upgrade that breaks one fails there, by name, instead of deep inside a run. Nothing
else in the repository imports a private torch name (``from torch.x._y import``, ``torch._z``,
``torch.testing._internal``): add new ones here.

The supported torch range is ``pyproject.toml``'s (README: which versions CI tests).
"""

from __future__ import annotations

__all__ = ["DCP_ITEM_READ_HOOK", "DYNAMO_MODULE", "StridedShard", "all_gather_into", "dcp_set_element", "fake_store", "flatten_mesh",
           "foreach_add", "foreach_add_", "foreach_copy_", "foreach_lerp_", "foreach_mul", "foreach_mul_", "foreach_norm",
           "init_optim_state", "local_shape_and_offset", "local_shape_and_offset_at", "pretend_no_accelerator", "print_options",
           "profiler_enabled", "unflatten_mesh"]

from collections.abc import Sequence
from typing import Any

import torch

# --- DTensor placements ----------------------------------------------------------------------------
# FSDP2 shards a tensor-parallel parameter with ``_StridedShard`` (dim, split_factor): each TP chunk is
# split again over the FSDP ranks. The planner must read it to know which region a rank holds.
# Public replacement: none yet (torch may publish it as ``StridedShard``); import that here then.
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard

# --- Device meshes ---------------------------------------------------------------------------------


def flatten_mesh(mesh: Any) -> Any:
    """One 1-D mesh over all of ``mesh``'s ranks in row-major order (to get one process group for them).

    ``DeviceMesh._flatten``: no public twin yet; ``DeviceMesh.flatten`` if torch publishes it.
    """
    return mesh._flatten()


def unflatten_mesh(mesh: Any, dim: int, sizes: Sequence[int], names: Sequence[str]) -> Any:
    """A view of ``mesh`` with dim ``dim`` split into ``sizes`` named ``names`` (same root mesh).

    ``DeviceMesh._unflatten``: the only way to lay dense (fsdp x tp) and expert (efsdp x ep) meshes
    over one root mesh; public replacement: ``DeviceMesh.unflatten`` once torch publishes it.
    """
    return mesh._unflatten(dim, tuple(sizes), tuple(names))


# --- A process group without processes (the dry-run planner) -------------------------------------


def fake_store() -> Any:
    """A store for ``init_process_group("fake", ...)``: a process group of any size in one process.

    The "fake" backend answers collectives without communicating; the dry-run parallelizes a model
    with torch's own fully_shard/TP on the meta device through it. ``FakeStore`` lives in
    ``torch.testing._internal.distributed.fake_pg``, and importing that module is what registers the
    backend (torch's own ``init_process_group`` reaches for it too); imported on first use, so
    ``import sharded_shampoo`` registers nothing. Public replacement: a "fake" backend registered by
    torch.distributed itself (then ``dist.HashStore()`` suffices).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


#: torch's compiler stack, which DTensor construction imports on first use. The planner benchmark
#: (``scripts/benchmarks/bench_plan.py --stages``) imports it by this name before timing the stages,
#: so its seconds count as imports, not as the first parallelized module. Only ever imported, never
#: called into; public replacement: ``torch.compiler`` if DTensor's lazy import moves there.
DYNAMO_MODULE = "torch._dynamo"


# --- Collectives whose public name changed ------------------------------------------------------


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> None:
    """Gather every rank's ``tensor`` into ``output`` (rank-major), one collective.

    torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` and warns (FutureWarning)
    on every call of the old name; older releases have only the old one. Drop the fallback once the
    supported minimum has ``all_gather_single``.
    """
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(output, tensor, group=group)


# --- Fused multi-tensor kernels ---------------------------------------------------------------------
# One kernel launch for a list of tensors (what torch.optim's foreach implementations use). No public
# API; ``torch._foreach_*`` have been stable across releases. Replacement if they go: a loop of the
# in-place tensor methods (same results, more launches).
foreach_add = torch._foreach_add
foreach_add_ = torch._foreach_add_
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_copy_ = torch._foreach_copy_
foreach_lerp_ = torch._foreach_lerp_
foreach_norm = torch._foreach_norm


# --- The profiler ------------------------------------------------------------------------------------
#: Whether a torch profiler is recording now: ``record_function`` costs tens of microseconds a range
#: even with no profiler (65 us measured on this project's CPU machine), so ``profiling.phase`` asks
#: first. ``torch._C._autograd._profiler_enabled`` is what ``torch.profiler`` itself asks; no public
#: twin (``torch.autograd.profiler._is_profiler_enabled`` is private too). Replace it when torch
#: makes one public.
from torch._C._autograd import _profiler_enabled as profiler_enabled  # noqa: E402


# --- torch.distributed.checkpoint ------------------------------------------------------------------
#: ``FileSystemReader``'s hook that turns one item's bytes into the stream ``torch.load`` reads:
#: ``sharded_shampoo.checkpointing``'s verifying reader overrides it to check each item's checksum
#: before it is deserialized. Public replacement: a storage-reader hook for item bytes, if DCP adds one.
DCP_ITEM_READ_HOOK = "_slice_file"
#: DCP's setter of one (possibly nested) entry of a state dict by its flattened path: the staged load
#: (``checkpointing/staged_load.py``) writes each verified small object where DCP's own planner would.
#: Public replacement: none; a copy of its ~15 lines (nested dict/list walk) if it goes.
from torch.distributed.checkpoint._traverse import set_element as dcp_set_element  # noqa: E402

# --- Used by the tests only (no library code depends on these) ------------------------------------


def local_shape_and_offset(global_shape: Sequence[int], mesh: Any, placements: Sequence[Any]) -> tuple[Any, Any]:
    """torch's own local shape and global offset of a DTensor shard (the reference the layout tests check).

    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``: no public twin.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(tuple(global_shape), mesh, tuple(placements))


def local_shape_and_offset_at(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
                              placements: Sequence[Any]) -> tuple[Any, Any]:
    """The same for the rank at ``coordinate`` of a mesh of ``mesh_shape`` (no mesh object needed).

    ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``: no public twin.
    """
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    return _compute_local_shape_and_global_offset(tuple(global_shape), tuple(mesh_shape), list(coordinate),
                                                  list(placements))


def init_optim_state(optimizer: torch.optim.Optimizer) -> None:
    """What ``get_state_dict`` does to an optimizer without state (a zero-gradient step), for the tests.

    ``torch.distributed.checkpoint.state_dict._init_optim_state``: no public twin.
    """
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


def print_options() -> Any:
    """torch's tensor print options object (tests check the library never changes it).

    ``torch._tensor_str.PRINT_OPTS``: no public getter (``torch.set_printoptions`` only sets).
    """
    from torch._tensor_str import PRINT_OPTS

    return PRINT_OPTS


def pretend_no_accelerator() -> None:
    """Make torch report no accelerator, so torchtitan builds its CPU path on a machine that has one.

    Replaces ``torch._utils._get_available_device_type`` (what torchtitan asks); no public switch.
    """
    import torch._utils as torch_utils

    setattr(torch_utils, "_get_available_device_type", lambda: "cpu")  # noqa: B010 (a plain write reads as a reach-in)
