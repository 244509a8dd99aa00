"""A DCP load planner that reads into host staging buffers and applies them only when told to.

DCP loads in place: its reader copies each item into the live tensor as soon as it is read, so a
failure halfway (a truncated or damaged file on one rank) leaves the model and optimizer
partly overwritten. :class:`StagingLoadPlanner` hands DCP's reader a fresh CPU buffer for every
read instead, and keeps small objects (param-group values, ``extra``) as raw bytes. DCP's read
step gathers every rank's outcome, so when ``dcp.load`` returns, every rank has read and verified
all of its items; only then does :meth:`StagingLoadPlanner.apply` copy the buffers into the live
tensors (plain copies of already-checked shapes and dtypes, which do not fail).

Small objects are unpickled as they are read -- with ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`), where DCP's default planner uses ``weights_only=False`` and so runs
whatever a crafted item names -- so a refused item fails the read phase on every rank too.

Cost: this rank's share of the checkpoint is held once in host memory during the load (the
default planner held one item at a time).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint.planner import ReadItem

from sharded_shampoo._torch_compat import dcp_set_element

from .compat import LayoutAdaptingLoadPlanner
from .safe_pickle import load_object


class SafeLoadPlanner(LayoutAdaptingLoadPlanner):
    """``DefaultLoadPlanner`` that unpickles small objects with ``weights_only=True`` (:mod:`.safe_pickle`).

    Symmetric matrices saved in the other storage layout (packed vs full) are requested in the saved
    layout (:class:`.compat.LayoutAdaptingLoadPlanner`); ``load_state_dict`` converts them.
    """

    def __init__(self, ckpt: str = "") -> None:
        super().__init__()
        self.ckpt = ckpt

    def parse_bytes(self, read_item: ReadItem, value: io.BytesIO) -> Any:
        return load_object(value.read(), f"checkpoint {self.ckpt!r}: item {read_item.dest_index.fqn}", self.ckpt)

    def set_object(self, read_item: ReadItem, obj: Any) -> None:
        """Where DCP's ``load_bytes`` puts a small object (the nested state dict DCP was given)."""
        if self.flatten_state_dict:
            dcp_set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.set_object(read_item, self.parse_bytes(read_item, value))


class StagingLoadPlanner(SafeLoadPlanner):
    """``SafeLoadPlanner`` whose reads land in staging buffers until :meth:`apply`."""

    def __init__(self, ckpt: str = "") -> None:
        super().__init__(ckpt)
        self.staged_tensors: list[tuple[ReadItem, torch.Tensor]] = []
        self.staged_objects: list[tuple[ReadItem, Any]] = []

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        live = super().resolve_tensor(read_item)
        buffer = torch.empty(live.size(), dtype=live.dtype, device="cpu")
        self.staged_tensors.append((read_item, buffer))
        return buffer

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # the buffer stays staged until apply()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.staged_objects.append((read_item, self.parse_bytes(read_item, value)))

    def apply(self) -> None:
        """Copy every staged value into the state dict DCP was given (the live tensors)."""
        for read_item, buffer in self.staged_tensors:
            live = super().resolve_tensor(read_item)
            live.copy_(buffer)
            super().commit_tensor(read_item, live)
        for read_item, obj in self.staged_objects:
            self.set_object(read_item, obj)
        self.staged_tensors, self.staged_objects = [], []
