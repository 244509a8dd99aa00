"""Count host reads of tensor values (a device sync on accelerators) made by the library.

:func:`count_host_reads` wraps the ``torch.Tensor`` methods that hand a tensor's value to Python
(:data:`HOST_READS`) and counts every call made while a frame of the library (``sharded_shampoo/``,
``checkpointing/``) is on the stack -- a read inside torch code the library called counts too, so
a helper cannot hide one. The key of each count names the method and the innermost library frame.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch

import sharded_shampoo

#: Tensor methods that read a value on the host (each a device sync on an accelerator); ``nonzero``
#: (a data-dependent shape) syncs too.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")

_PACKAGE = os.path.dirname(os.path.realpath(sharded_shampoo.__file__))
_CHECKPOINTING = os.path.join(os.path.dirname(_PACKAGE), "checkpointing")
LIBRARY_DIRS = (_PACKAGE + os.sep, _CHECKPOINTING + os.sep)


def _library_frame(frame: Any) -> Any:
    """The innermost frame of the library on the stack from ``frame`` outwards, or None."""
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if path.startswith(LIBRARY_DIRS):
            return frame
        frame = frame.f_back
    return None


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Within the block, count :data:`HOST_READS` calls made from the library (see the module doc)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = _library_frame(sys._getframe(1))
            if frame is not None:
                where = os.path.relpath(os.path.realpath(frame.f_code.co_filename), os.path.dirname(_PACKAGE))
                counts[f"{name} from {where}:{frame.f_code.co_name}"] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def steady_step_reads(opt: Any, set_grads: Callable[[int], None], warmup: int = 2, counted: int = 2) -> Counter:
    """Host reads made by ``counted`` steady steps of ``opt`` (after ``warmup`` steps), with
    ``set_grads(t)`` filling the gradients of step ``t``; the optimizer must not refresh roots then."""
    for t in range(warmup):
        set_grads(t)
        opt.step()
    total: Counter = Counter()
    for t in range(warmup, warmup + counted):
        set_grads(t)
        with count_host_reads() as counts:
            opt.step()
        total.update(counts)
    return total


def fsdp_host_reads(rank: int, world: int) -> dict[str, int]:
    """In a spawned rank: host reads of steady steps of a 2-layer model under ``fully_shard`` (FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sharded_shampoo import ShardedShampoo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.named_parameters(), lr=0.01, momentum=0.9, weight_decay=0.01,
                         precondition_frequency=100, start_preconditioning_step=100)

    def set_grads(t: int) -> None:
        gen = torch.Generator().manual_seed(t)
        opt.zero_grad()
        model(torch.randn(5, 8, generator=gen)).square().sum().backward()

    return dict(steady_step_reads(opt, set_grads))
