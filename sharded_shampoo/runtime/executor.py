"""One optimizer step of one rank: gather -> bucket math -> scatter -> apply, overlapped in waves.

Executes the static schedule of the :class:`~.records.RankRuntime`:

1. gather: L2 weight decay folds into the local gradients, then every owned block's full gradient
   is assembled in a per-bucket stack ``[B, *block shape]`` (local copies, plus ``all_to_all_single``
   when distributed);
2. bucket math (``compute/preconditioner.py``): factor updates, amortized roots, directions;
3. scatter: every holder gets the update of the pieces it holds (local views, plus ``all_to_all_single``);
4. apply: the update stage (``compute/averaging.py``: non-L2 weight decay, classic momentum or
   GPA / Schedule-Free, the learning-rate step) on this rank's local shards (``foreach`` ops,
   narrow views, so non-contiguous parameters update in place).

Overlap: each owner's blocks are cut into ``chunks`` waves (``routing.block_waves``, the same on
every rank; blocks of different waves never share a bucket). All gather exchanges are issued asynchronously at once; the math of wave ``w`` starts
as soon as its gradients have arrived, while later waves are still in flight, and its update
exchange is issued right after, overlapping the next wave's math. Every rank issues the same
collectives in the same order (``chunks`` gathers, then ``chunks`` scatters) whatever its
gradients are, so nothing hangs; the numbers do not depend on ``chunks``.

The executor owns every buffer it edits in place (the gathered stacks, which become the
directions, and the receive buffers): no optimizer state tensor is ever an update buffer. They
live for one step: nothing of the exchange or the stacks stays allocated between steps (one
process exchanges nothing at all), see ``docs/planner.md`` ("resident buffers").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
import torch.distributed as dist

from .._torch_compat import foreach_add, foreach_copy_
from ..compute.averaging import PieceMask, UpdateRule, apply_update_
from ..compute.preconditioner import BucketHyperparams, BucketStep
from .gradients import widened
from ..profiling import APPLY, GATHER, SCATTER, phase
from .records import RankRuntime
from .routing import Piece, RankSchedule, split_waves


@dataclass(frozen=True)
class GroupStep:
    """What one param group does this step (the optimizer's policy decided it)."""

    hyperparams: BucketHyperparams
    refresh_roots: bool              # refresh roots / eigenbases this step
    precondition: bool               # use the preconditioner (else the grafting direction)
    l2_weight_decay: float           # folded into the gradient before it travels (0: none)
    update: UpdateRule               # the update stage after the direction


@dataclass
class _Exchange:
    """One ``all_to_all_single``: what this rank sends and receives, flattened in canonical order."""

    send: list[Piece]
    recv: list[Piece]
    send_sizes: list[int]
    recv_sizes: list[int]

    @classmethod
    def of(cls, send: list[list[Piece]], recv: list[list[Piece]]) -> "_Exchange":
        return cls([p for x in send for p in x], [p for x in recv for p in x], RankSchedule.split_sizes(send),
                   RankSchedule.split_sizes(recv))


@dataclass
class _Wave:
    """One wave: its gather and update exchanges and the owned buckets whose math it runs."""

    gather: _Exchange
    update: _Exchange
    buckets: list[int]


class StepExecutor:
    """Data movement, bucket dispatch and the parameter update of one rank."""

    def __init__(self, runtime: RankRuntime) -> None:
        self.rt = runtime
        waves = runtime.waves
        chunks = max(waves, default=0) + 1
        c = runtime.comm
        self.waves: list[_Wave] = []
        for w, sched in enumerate(split_waves(runtime.schedule, waves, chunks)):
            buckets = [bi for bi, members in enumerate(runtime.bucket_members) if waves[members[0].index] == w]
            self.waves.append(_Wave(_Exchange.of(sched.grad_send, sched.grad_recv),
                                    _Exchange.of(sched.update_send, sched.update_recv), buckets))
        # per bucket, the plan index of each member block's parameter: selects the bucket's rows of the step's mask
        self._member_index = [torch.tensor([cast(int, rec.param.plan_index) for rec in members], dtype=torch.int64,
                                           device=c.device) for members in runtime.bucket_members]
        #: seconds this rank waited for communication in the last step (CPU/gloo: the exposed
        #: communication time; on CUDA ``wait`` only orders streams, so profile there instead)
        self.last_exposed_comm_seconds = 0.0

    # ------------------------------------------------------------------ the step

    def step(self, grads: dict[int, torch.Tensor], active: torch.Tensor, groups: list[GroupStep]) -> None:
        """One step. ``grads``: local gradient of every trainable parameter by plan index (zeros where a
        parameter has none: message sizes stay static); ``active``: bool ``[P]`` on the device, the
        parameters that step (the policy's mask, never read on the host: the others stay bit-identical).

        The stacks and the communication buffers live for this step only, and the runtime frees its
        scratch at the end (``RankRuntime.end_of_step``): between steps the optimizer holds its state
        and, unless ``release_buffers_between_steps``, the packing indices and salts (the planner's
        ``resident_buffer_bytes``). Allocating them reads nothing on the host."""
        try:
            self._step(grads, active, groups)
        finally:
            self.rt.end_of_step()

    def _step(self, grads: dict[int, torch.Tensor], active: torch.Tensor, groups: list[GroupStep]) -> None:
        self.last_exposed_comm_seconds = 0.0
        rt = self.rt
        with phase(GATHER):
            self._fold_l2(grads, groups)
            # this step's stacks; an entry is replaced where a bucket returns a new direction tensor
            stacks = [torch.empty(len(b.blocks), *b.shape, dtype=b.dtype, device=rt.comm.device) for b in rt.buckets]
            inflight = [self._start(w.gather, [rt.piece_view(grads, p) for p in w.gather.send]) for w in self.waves]
            self._copy([rt.block_view(stacks, p) for p in rt.schedule.grad_local],
                       [rt.piece_view(grads, p) for p in rt.schedule.grad_local])
        updates = []
        for wave, work in zip(self.waves, inflight):
            with phase(GATHER):
                recv = self._finish(work)
                self._copy([rt.block_view(stacks, p) for p in wave.gather.recv], self._views(recv, wave.gather.recv))
            for bi in wave.buckets:
                stacks[bi] = self._bucket_step(bi, stacks[bi], active, groups)
            with phase(SCATTER):
                updates.append(self._start(wave.update, [rt.block_view(stacks, p) for p in wave.update.send]))
        with phase(APPLY):
            self._apply([(p, rt.block_view(stacks, p)) for p in rt.schedule.update_local], active, groups)
        for wave, work in zip(self.waves, updates):
            with phase(SCATTER):
                recv = self._finish(work)
            with phase(APPLY):
                self._apply(list(zip(wave.update.recv, self._views(recv, wave.update.recv))), active, groups)

    def _bucket_step(self, bi: int, G: torch.Tensor, active: torch.Tensor, groups: list[GroupStep]) -> torch.Tensor:
        rt = self.rt
        g = groups[rt.bucket_group[bi]]
        mask = active.index_select(0, self._member_index[bi])
        return rt.buckets[bi].step_blocks(G, BucketStep(g.hyperparams, g.refresh_roots, g.precondition, mask))

    def _fold_l2(self, grads: dict[int, torch.Tensor], groups: list[GroupStep]) -> None:
        """L2 (coupled) weight decay folds into the gradient before it travels (inactive parameters too: the
        bucket step masks their rows before anything reads them)."""
        by_group: dict[int, list[int]] = {}
        for k, rec in enumerate(self.rt.trainable):
            if groups[rec.group].l2_weight_decay != 0 and k in grads:
                by_group.setdefault(rec.group, []).append(k)
        for gi, ks in by_group.items():
            # fp16/bf16 gradients fold in fp32: torch's bf16 ``a + alpha * b`` rounds differently in its vector
            # body and its tail, so a bf16 fold would depend on how the parameter is sharded (and lose precision)
            wide = [widened(grads[k]) for k in ks]
            new = foreach_add(wide, [self.rt.trainable[k].local() for k in ks], alpha=groups[gi].l2_weight_decay)
            grads.update(zip(ks, new))

    # ------------------------------------------------------------------ data movement

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        if dst:
            foreach_copy_(dst, src)

    @staticmethod
    def _views(buffer: torch.Tensor, pieces: list[Piece]) -> list[torch.Tensor]:
        views = buffer.split([p.numel for p in pieces]) if pieces else []
        return [v.view(tuple(b - a for a, b in p.box)) for v, p in zip(views, pieces)]

    def _start(self, ex: _Exchange, sources: list[torch.Tensor]) -> Optional[tuple[Any, torch.Tensor, torch.Tensor]]:
        """Issue one asynchronous ``all_to_all_single`` (None on one rank) into buffers of this step only."""
        c = self.rt.comm
        if c.world_size <= 1:
            return None
        send = torch.empty(sum(ex.send_sizes), dtype=c.dtype, device=c.device)
        self._copy(self._views(send, ex.send), sources)
        recv = torch.empty(sum(ex.recv_sizes), dtype=c.dtype, device=c.device)
        work = dist.all_to_all_single(recv, send, output_split_sizes=ex.recv_sizes, input_split_sizes=ex.send_sizes,
                                      group=c.group, async_op=True)
        return work, recv, send           # the send buffer stays referenced until the exchange is waited on

    def _finish(self, started: Optional[tuple[Any, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Wait for an exchange; its receive buffer (empty on one rank)."""
        if started is None:
            return torch.empty(0, dtype=self.rt.comm.dtype, device=self.rt.comm.device)
        work, recv, _ = started
        t0 = time.perf_counter()
        work.wait()
        self.last_exposed_comm_seconds += time.perf_counter() - t0
        return recv

    # ------------------------------------------------------------------ apply

    def _apply(self, updates: list[tuple[Piece, torch.Tensor]], active: torch.Tensor, groups: list[GroupStep]) -> None:
        """The update stage on this rank's shards, per group (``compute/averaging.py``); ``active``: bool
        ``[P]``, the parameters that step (the others stay bit-identical)."""
        by_group: dict[int, list[tuple[Piece, torch.Tensor]]] = {}
        for piece, u in updates:
            by_group.setdefault(self.rt.trainable[piece.param_index].group, []).append((piece, u))
        for gi, items in by_group.items():
            rule = groups[gi].update
            recs = [self.rt.trainable[p.param_index] for p, _ in items]
            p_views = [rec.view(rec.local(), p.box) for rec, (p, _) in zip(recs, items)]
            buffers = [rec.view(_shard_buffer(rec.momentum if rule.averaging is None else rec.z, rule), p.box)
                       for rec, (p, _) in zip(recs, items)] if rule.momentum > 0 or rule.averaging else []
            # directions are this executor's buffers (stacks or the receive buffers): safe to edit
            mask = PieceMask(active, [p.param_index for p, _ in items])
            apply_update_(p_views, [u for _, u in items], buffers, rule, mask)


def _shard_buffer(buffer: Optional[torch.Tensor], rule: UpdateRule) -> torch.Tensor:
    what = "a z buffer (iterate_averaging is structural)" if rule.averaging else \
        "a momentum buffer (momentum must stay > 0 after construction)"
    assert buffer is not None, f"this update needs {what}"
    return buffer
