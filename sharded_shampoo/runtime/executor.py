"""Executes the static per-step schedule: gather block gradients, run buckets, return updates.

Built once per optimizer from the plan and the rank's routing schedule. A step is:
gather (one ``all_to_all_single`` when distributed, copies otherwise) -> batched bucket math
-> scatter (one ``all_to_all_single``) -> foreach update of the local shards. On one rank the
routing is the identity and no collective is issued. Every rank issues the same collectives
in the same order whatever its gradients are, so nothing can hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..planning.blocking import Block
from ..planning.layout import MeshSpec, ParamSpec, held_merged_rows
from ..compute.preconditioner import BlockBucket
from .routing import Piece, RankSchedule


@dataclass
class LocalParam:
    """A parameter as this rank holds it: its local tensor and merged-row window."""

    index: int
    spec: ParamSpec
    merged_shape: tuple[int, ...]
    held: tuple[int, int]

    def merged_view(self, local: torch.Tensor) -> torch.Tensor:
        """The local shard seen as ``[held rows, *merged_shape[1:]]``."""
        return local.reshape(self.held[1] - self.held[0], *self.merged_shape[1:])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a parameter/gradient (DTensor or plain tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


class StepExecutor:
    """Data movement and bucket dispatch for one rank."""

    def __init__(self, blocks: list[Block], block_params: list[int], params: list[ParamSpec],
                 mesh: MeshSpec, schedule: RankSchedule, buckets: list[BlockBucket],
                 bucket_of_block: dict[int, tuple[int, int]], comm_dtype: torch.dtype,
                 group: Optional[dist.ProcessGroup], device: torch.device) -> None:
        self.blocks = blocks
        self.block_params = block_params
        self.schedule = schedule
        self.buckets = buckets
        self.bucket_of_block = bucket_of_block
        self.comm_dtype = comm_dtype
        self.group = group
        self.device = device
        self.world_size = mesh.world_size
        merged: dict[int, tuple[int, ...]] = {}
        for b, p in zip(blocks, block_params):
            merged.setdefault(p, b.merged_shape)
        self.locals = {
            p: LocalParam(p, params[p], m, held_merged_rows(params[p], m, schedule.rank, mesh))
            for p, m in merged.items()}
        self.grad_send_sizes = schedule.split_sizes(schedule.grad_send)
        self.grad_recv_sizes = schedule.split_sizes(schedule.grad_recv)
        self.update_send_sizes = schedule.split_sizes(schedule.update_send)
        self.update_recv_sizes = schedule.split_sizes(schedule.update_recv)

    # ------------------------------------------------------------------ views

    def local_piece(self, local: torch.Tensor, piece: Piece) -> torch.Tensor:
        """The part of ``local`` (this rank's shard of the piece's parameter) that the piece covers."""
        lp = self.locals[piece.param_index]
        block = self.blocks[piece.block_index]
        view = lp.merged_view(local)[piece.row_start - lp.held[0]:piece.row_end - lp.held[0]]
        for d, (a, b) in enumerate(block.ranges[1:], start=1):
            view = view.narrow(d, a, b - a)
        return view

    def _buffer_piece(self, stacks: list[torch.Tensor], piece: Piece) -> torch.Tensor:
        bucket, j = self.bucket_of_block[piece.block_index]
        start = self.blocks[piece.block_index].ranges[0][0]
        return stacks[bucket][j, piece.row_start - start:piece.row_end - start]

    def _flat_views(self, buffer: torch.Tensor, pieces: list[Piece]) -> list[torch.Tensor]:
        sizes = [p.numel for p in pieces]
        views = buffer.split(sizes) if pieces else []
        return [v.view(p.row_end - p.row_start, *self.blocks[p.block_index].shape[1:])
                for v, p in zip(views, pieces)]

    def _exchange(self, send_lists: list[list[Piece]], send_sources: list[torch.Tensor],
                  send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        """One ``all_to_all_single`` carrying ``send_sources`` (already in canonical order)."""
        send = torch.empty(sum(send_sizes), dtype=self.comm_dtype, device=self.device)
        flat_pieces = [p for pieces in send_lists for p in pieces]
        if flat_pieces:
            torch._foreach_copy_(self._flat_views(send, flat_pieces), send_sources)
        recv = torch.empty(sum(recv_sizes), dtype=self.comm_dtype, device=self.device)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                               group=self.group)
        return recv

    # ------------------------------------------------------------------ gather

    def gather(self, grads: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Full block gradients of every owned bucket (``[B, *shape]`` in the factor dtype).

        ``grads`` maps param index -> local gradient; inactive params map to a zero tensor
        of the local shape so every rank sends the same amount.
        """
        stacks = [torch.empty(len(b.blocks), *b.shape, dtype=b.dtype, device=self.device) for b in self.buckets]
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        s = self.schedule
        for piece in s.grad_local:
            dst.append(self._buffer_piece(stacks, piece))
            src.append(self.local_piece(grads[piece.param_index], piece))
        if self.world_size > 1:
            send_src = [self.local_piece(grads[p.param_index], p) for pieces in s.grad_send for p in pieces]
            recv = self._exchange(s.grad_send, send_src, self.grad_send_sizes, self.grad_recv_sizes)
            recv_pieces = [p for pieces in s.grad_recv for p in pieces]
            dst.extend(self._buffer_piece(stacks, p) for p in recv_pieces)
            src.extend(self._flat_views(recv, recv_pieces))
        if dst:
            torch._foreach_copy_(dst, src)
        return stacks

    # ------------------------------------------------------------------ scatter

    def scatter(self, directions: list[torch.Tensor], active: set[int]) -> list[tuple[Piece, torch.Tensor]]:
        """Each local piece of every active parameter paired with its update slice."""
        s = self.schedule
        out = [(p, self._buffer_piece(directions, p)) for p in s.update_local]
        if self.world_size > 1:
            send_src = [self._buffer_piece(directions, p) for pieces in s.update_send for p in pieces]
            recv = self._exchange(s.update_send, send_src, self.update_send_sizes, self.update_recv_sizes)
            recv_pieces = [p for pieces in s.update_recv for p in pieces]
            out.extend(zip(recv_pieces, self._flat_views(recv, recv_pieces)))
        return [(p, u) for p, u in out if p.param_index in active]
