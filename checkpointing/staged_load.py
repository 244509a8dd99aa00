"""A DCP load planner that reads into host staging buffers and applies them only when told to.

DCP loads in place: its reader copies each item into the live tensor as soon as it is read, so a
failure halfway (a truncated or damaged file on one rank) leaves the model and optimizer
partly overwritten. :class:`StagingLoadPlanner` hands DCP's reader a fresh CPU buffer for every
read instead, and keeps small objects (param-group values, ``extra``) as raw bytes. DCP's read
step gathers every rank's outcome, so when ``dcp.load`` returns, every rank has read and verified
all of its items; only then does :meth:`StagingLoadPlanner.apply` copy the buffers into the live
tensors (plain copies of already-checked shapes and dtypes, which do not fail).

Cost: this rank's share of the checkpoint is held once in host memory during the load (the
default planner held one item at a time).
"""

from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint.planner import ReadItem

from .compat import LayoutAdaptingLoadPlanner


class StagingLoadPlanner(LayoutAdaptingLoadPlanner):
    """``DefaultLoadPlanner`` whose reads land in staging buffers until :meth:`apply`.

    Symmetric matrices saved in the other storage layout (packed vs full) are requested in the saved
    layout (:class:`.compat.LayoutAdaptingLoadPlanner`); ``load_state_dict`` converts them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.staged_tensors: list[tuple[ReadItem, torch.Tensor]] = []
        self.staged_bytes: list[tuple[ReadItem, bytes]] = []

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        live = super().resolve_tensor(read_item)
        buffer = torch.empty(live.size(), dtype=live.dtype, device="cpu")
        self.staged_tensors.append((read_item, buffer))
        return buffer

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # the buffer stays staged until apply()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.staged_bytes.append((read_item, value.read()))

    def apply(self) -> None:
        """Copy every staged value into the state dict DCP was given (the live tensors)."""
        for read_item, buffer in self.staged_tensors:
            live = super().resolve_tensor(read_item)
            live.copy_(buffer)
            super().commit_tensor(read_item, live)
        for read_item, raw in self.staged_bytes:
            super().load_bytes(read_item, io.BytesIO(raw))
        self.staged_tensors, self.staged_bytes = [], []
