"""What an optimizer keeps allocated between steps besides its state: a walk of the object graph.

The planner's ``resident_buffer_bytes`` claims what the optimizer holds between steps besides
``opt.state`` (communication buffers, gathered stacks, scratch, index tables). This helper measures
it independently: starting at the optimizer object it follows attributes, ``__slots__``, dicts,
lists, tuples and sets, collects every tensor it reaches, and sums the bytes of their storages,
each storage once, leaving out the storages of ``opt.state`` tensors, of the parameters and of
their gradients. Modules, functions and classes are not entered (they are code, not buffers).
"""

from __future__ import annotations

import types
from typing import Any, Iterator

import torch

_NOT_ENTERED = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                str, bytes, int, float, bool, complex, torch.dtype, torch.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (its storage is what this rank holds)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "device_mesh") else t


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = _local(t).untyped_storage()
    return st.data_ptr(), st.nbytes()


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    else:
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            yield from attrs.values()
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    yield getattr(obj, slot)


def _is_torch_object(obj: Any) -> bool:
    """torch's own objects (device meshes, process groups, generators, hooks' handles) hold no
    optimizer buffers; only their containers and the optimizer's own classes are entered."""
    module = type(obj).__module__ or ""
    return module.startswith("torch") and not isinstance(obj, torch.optim.Optimizer)


def reachable_tensors(root: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes and containers (each object once)."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, _NOT_ENTERED):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        if _is_torch_object(obj):
            continue
        stack.extend(_children(obj))
    return found


def _excluded_storages(opt: torch.optim.Optimizer) -> set[tuple[int, int]]:
    """Storages of the optimizer state, the parameters and their gradients."""
    excluded: set[tuple[int, int]] = set()
    for entry in opt.state.values():
        excluded.update(_storage_key(t) for t in reachable_tensors(entry))
    for group in opt.param_groups:
        for p in group["params"]:
            excluded.add(_storage_key(p))
            if p.grad is not None:
                excluded.add(_storage_key(p.grad))
    return excluded


def resident_buffer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the storages the optimizer references besides its state, parameters and gradients.

    Measured after a step: what stays allocated until the next one. Meta tensors count nothing.
    """
    excluded = _excluded_storages(opt)
    total: dict[tuple[int, int], int] = {}
    for t in reachable_tensors(opt):
        local = _local(t)
        if local.is_meta:
            continue
        key = _storage_key(local)
        if key not in excluded:
            total[key] = key[1]
    return sum(total.values())


def resident_tensors(opt: torch.optim.Optimizer) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """(shape, dtype, storage bytes) of every counted storage, largest first: what to look at when it fails."""
    excluded = _excluded_storages(opt)
    out: dict[tuple[int, int], tuple[tuple[int, ...], torch.dtype, int]] = {}
    for t in reachable_tensors(opt):
        local = _local(t)
        key = _storage_key(local)
        if not local.is_meta and key not in excluded:
            out[key] = (tuple(local.shape), local.dtype, key[1])
    return sorted(out.values(), key=lambda x: -x[2])


def grad_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's gradients of the optimizer's parameters (local shards)."""
    return sum(_local(p.grad).numel() * p.grad.element_size() for g in opt.param_groups for p in g["params"]
               if p.grad is not None)


__all__ = ["grad_bytes", "reachable_tensors", "resident_buffer_bytes", "resident_tensors"]


def step_policy_bytes(opt: Any, rank: int = 0) -> int:
    """Bytes the sync-free step policy keeps between steps by design, which the planner does not model:

    * the host copy of the last step's agreed flags (one float64 per flag), read at the next host-visible
      point (``opt.check()``, the next step) to raise deferred errors: it must outlive the step;
    * the gradient summarizer's device constants (the all-absent rows, per gradient pattern the norm
      limits and index/order tables), cached so that a steady step copies nothing host -> device;
    * the executor's per-bucket plan indices (one int64 per owned block) that select a bucket's rows
      of the step's device mask.

    All are O(parameters + owned blocks), independent of the gradient sizes.
    """
    summarizer: dict[tuple[int, int], int] = {}
    for t in reachable_tensors(opt.summarizer):
        key = _storage_key(t)
        summarizer[key] = key[1]
    blocks = len(opt.plan.owned_indices(rank))
    return sum(summarizer.values()) + 8 * opt.flag_layout.size + 8 * blocks
