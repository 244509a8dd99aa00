"""One optimizer step of one rank: gather -> bucket math -> scatter -> apply.

Executes the static schedule of the :class:`~.records.RankRuntime`:

1. gather: L2 weight decay folds into the local gradients, then every owned block's full gradient
   is assembled in a per-bucket stack ``[B, *block shape]`` (local copies, plus one
   ``all_to_all_single`` when distributed);
2. bucket math (``compute/preconditioner.py``): factor updates, amortized roots, directions;
3. scatter: every holder gets the update of the pieces it holds (local views, plus one
   ``all_to_all_single``);
4. apply: decoupled weight decay, momentum / Nesterov and the learning-rate step on this rank's
   local shards (``foreach`` ops, narrow views, so non-contiguous parameters update in place).

The executor owns every buffer it edits in place (the gathered stacks, which become the
directions, and the receive buffer): no optimizer state tensor is ever an update buffer. Every
rank issues the same collectives in the same order whatever its gradients are, so nothing hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..compute.preconditioner import BucketHyperparams
from .records import RankRuntime
from .routing import Piece


@dataclass(frozen=True)
class GroupStep:
    """What one param group does this step (the optimizer's policy decided it)."""

    hyperparams: BucketHyperparams
    amortized: bool                  # refresh roots / eigenbases this step
    precondition: bool               # use the preconditioner (else the grafting direction)
    lr: float
    weight_decay: float
    decoupled_weight_decay: bool
    momentum: float
    dampening: float
    nesterov: bool


class StepExecutor:
    """Data movement, bucket dispatch and the parameter update of one rank."""

    def __init__(self, runtime: RankRuntime) -> None:
        self.rt = runtime
        s = runtime.schedule
        self.grad_send_sizes = s.split_sizes(s.grad_send)
        self.grad_recv_sizes = s.split_sizes(s.grad_recv)
        self.update_send_sizes = s.split_sizes(s.update_send)
        self.update_recv_sizes = s.split_sizes(s.update_recv)
        self.grad_send_pieces = [p for pieces in s.grad_send for p in pieces]
        self.grad_recv_pieces = [p for pieces in s.grad_recv for p in pieces]
        self.update_send_pieces = [p for pieces in s.update_send for p in pieces]
        self.update_recv_pieces = [p for pieces in s.update_recv for p in pieces]

    # ------------------------------------------------------------------ the step

    def step(self, grads: dict[int, torch.Tensor], active: set[int], groups: list[GroupStep]) -> None:
        """One step. ``grads``: local gradient of every trainable parameter by plan index (zeros where a
        parameter has none: message sizes stay static); ``active``: plan indices that have a gradient."""
        self._fold_l2(grads, active, groups)
        stacks = self._gather(grads)
        everything = len(active) == len(self.rt.trainable)
        for bi, (bucket, G) in enumerate(zip(self.rt.buckets, stacks)):
            g = groups[self.rt.bucket_group[bi]]
            bucket.hp = g.hyperparams
            mask = None if everything else torch.tensor(
                [rec.param.plan_index in active for rec in self.rt.bucket_members[bi]], device=G.device)
            stacks[bi] = bucket.step_blocks(G, mask, g.amortized, g.precondition)
        self._apply(self._scatter(stacks, active), groups)

    def _fold_l2(self, grads: dict[int, torch.Tensor], active: set[int], groups: list[GroupStep]) -> None:
        """L2 (coupled) weight decay folds into the gradient before it travels."""
        by_group: dict[int, list[int]] = {}
        for k in active:
            g = groups[self.rt.trainable[k].group]
            if g.weight_decay != 0 and not g.decoupled_weight_decay:
                by_group.setdefault(self.rt.trainable[k].group, []).append(k)
        for gi, ks in by_group.items():
            # fp16/bf16 gradients fold in fp32: torch's bf16 ``a + alpha * b`` rounds differently in its vector
            # body and its tail, so a bf16 fold would depend on how the parameter is sharded (and lose precision)
            wide = [grads[k] if grads[k].dtype in (torch.float32, torch.float64) else grads[k].float() for k in ks]
            new = torch._foreach_add(wide, [self.rt.trainable[k].local() for k in ks], alpha=groups[gi].weight_decay)
            grads.update(zip(ks, new))

    # ------------------------------------------------------------------ data movement

    def _flat_views(self, buffer: torch.Tensor, pieces: list[Piece]) -> list[torch.Tensor]:
        views = buffer.split([p.numel for p in pieces]) if pieces else []
        return [v.view(tuple(b - a for a, b in p.box)) for v, p in zip(views, pieces)]

    def _exchange(self, pieces: list[Piece], sources: list[torch.Tensor], send_sizes: list[int],
                  recv_sizes: list[int]) -> torch.Tensor:
        """One ``all_to_all_single`` carrying ``sources`` (already in canonical order)."""
        c = self.rt.comm
        send = torch.empty(sum(send_sizes), dtype=c.dtype, device=c.device)
        if pieces:
            torch._foreach_copy_(self._flat_views(send, pieces), sources)
        recv = torch.empty(sum(recv_sizes), dtype=c.dtype, device=c.device)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=c.group)
        return recv

    def _gather(self, grads: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Full block gradients of every owned bucket (``[B, *shape]`` in the factor dtype)."""
        rt = self.rt
        stacks = [torch.empty(len(b.blocks), *b.shape, dtype=b.dtype, device=rt.comm.device) for b in rt.buckets]
        dst = [rt.block_view(stacks, p) for p in rt.schedule.grad_local]
        src = [rt.piece_view(grads, p) for p in rt.schedule.grad_local]
        if rt.comm.world_size > 1:
            sources = [rt.piece_view(grads, p) for p in self.grad_send_pieces]
            recv = self._exchange(self.grad_send_pieces, sources, self.grad_send_sizes, self.grad_recv_sizes)
            dst.extend(rt.block_view(stacks, p) for p in self.grad_recv_pieces)
            src.extend(self._flat_views(recv, self.grad_recv_pieces))
        if dst:
            torch._foreach_copy_(dst, src)
        return stacks

    def _scatter(self, directions: list[torch.Tensor], active: set[int]) -> list[tuple[Piece, torch.Tensor]]:
        """Each local piece of every active parameter paired with its update slice."""
        rt = self.rt
        out = [(p, rt.block_view(directions, p)) for p in rt.schedule.update_local]
        if rt.comm.world_size > 1:
            sources = [rt.block_view(directions, p) for p in self.update_send_pieces]
            recv = self._exchange(self.update_send_pieces, sources, self.update_send_sizes, self.update_recv_sizes)
            out.extend(zip(self.update_recv_pieces, self._flat_views(recv, self.update_recv_pieces)))
        return [(p, u) for p, u in out if p.param_index in active]

    # ------------------------------------------------------------------ apply

    def _apply(self, updates: list[tuple[Piece, torch.Tensor]], groups: list[GroupStep]) -> None:
        """Decoupled weight decay, momentum/Nesterov and the lr step on this rank's shards, per group."""
        by_group: dict[int, list[tuple[Piece, torch.Tensor]]] = {}
        for piece, u in updates:
            by_group.setdefault(self.rt.trainable[piece.param_index].group, []).append((piece, u))
        for gi, items in by_group.items():
            self._apply_group(items, groups[gi])

    def _apply_group(self, items: list[tuple[Piece, torch.Tensor]], g: GroupStep) -> None:
        recs = [self.rt.trainable[p.param_index] for p, _ in items]
        p_views = [rec.view(rec.local(), p.box) for rec, (p, _) in zip(recs, items)]
        # directions are this executor's buffers (stacks or the receive buffer): safe to edit
        dirs = [u if u.dtype in (torch.float32, torch.float64) else u.float() for _, u in items]
        if g.weight_decay != 0 and g.decoupled_weight_decay:
            torch._foreach_add_(dirs, p_views, alpha=g.weight_decay)
        if g.momentum > 0:
            m_views = [rec.view(_momentum(rec.momentum), p.box) for rec, (p, _) in zip(recs, items)]
            torch._foreach_mul_(m_views, g.momentum)
            torch._foreach_add_(m_views, dirs, alpha=1.0 - g.dampening)
            if g.nesterov:  # P <- (1 - dampening) P + mu B, as in the reference
                if g.dampening:
                    torch._foreach_mul_(dirs, 1.0 - g.dampening)
                torch._foreach_add_(dirs, m_views, alpha=g.momentum)
            else:   # a bf16 buffer is widened: bf16 + bf16 rounding depends on the sharding (see _fold_l2)
                dirs = [m if m.dtype in (torch.float32, torch.float64) else m.float() for m in m_views]
        torch._foreach_add_(p_views, dirs, alpha=-g.lr)


def _momentum(m: Optional[torch.Tensor]) -> torch.Tensor:
    assert m is not None, "momentum > 0 needs a momentum buffer (momentum must stay > 0 after construction)"
    return m
