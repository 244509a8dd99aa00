"""The per-rank runtime, built once from the plan as typed records.

* :class:`ParamRecord` -- one per parameter of the optimizer: its name, group, spec, the region
  of the global tensor this rank holds, views into its local storage, its momentum or ``z``.
* :class:`BlockRecord` -- one per block this rank owns: the block, its bucket and slot.
* :class:`RankRuntime` -- the records, the stacked state buckets, the routing schedule and the
  communication context. Routing, the executor, state I/O and the checkpoint fingerprint all
  read these records; nothing else keeps parallel index lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
import torch.distributed as dist

from ..compute.preconditioner import BlockBucket, BucketConfig, bucket_key
from ..compute.workspace import Workspace
from ..planning.blocking import Block
from ..planning.layout import ParamSpec, Region
from ..planning.plan import ShampooPlan
from .placements import local_tensor
from .routing import Piece, RankSchedule, build_schedule


@dataclass
class ParamRecord:
    """One parameter as this rank sees it."""

    index: int                      # position among all the optimizer's parameters (groups in order)
    name: str
    group: int
    param: torch.Tensor             # the live parameter (DTensor or plain tensor)
    spec: ParamSpec
    plan_index: Optional[int]       # index among the plan's parameters; None: frozen at construction
    region: Optional[Region]        # the box of the global tensor this rank holds; None: nothing
    momentum: Optional[torch.Tensor] = None   # local-shaped momentum buffer (momentum > 0 only)
    z: Optional[torch.Tensor] = None          # local-shaped base sequence z (GPA / Schedule-Free only)

    @property
    def trainable(self) -> bool:
        return self.plan_index is not None

    def local(self) -> torch.Tensor:
        """The rank-local storage of the parameter."""
        return local_tensor(self.param)

    def view(self, local: torch.Tensor, box: Region) -> torch.Tensor:
        """The part of ``local`` (a tensor laid out like this rank's shard) covering global ``box``.

        Narrowing keeps the tensor's own strides, so non-contiguous parameters (channels_last,
        transposed leaves) are updated in place, never through a copy.
        """
        assert self.region is not None
        return narrow_to(local, box, self.region)


def narrow_to(t: torch.Tensor, box: Region, origin: Region) -> torch.Tensor:
    """The part of ``t`` (which covers global box ``origin``) that covers global ``box``, as a view."""
    for d, ((a, b), (start, _)) in enumerate(zip(box, origin)):
        t = t.narrow(d, a - start, b - a)
    return t


@dataclass(frozen=True)
class BlockRecord:
    """One block this rank owns: where its state lives in the buckets."""

    index: int          # plan block index
    block: Block
    param: ParamRecord
    bucket: int
    slot: int

    @property
    def state_key(self) -> str:
        """The key of the block's state under its parameter (``block_{i}``)."""
        return self.block.block_id.removeprefix(self.block.param_name + ".")


@dataclass
class CommContext:
    """How this rank talks to the others of the plan."""

    group: Optional[dist.ProcessGroup]
    world_size: int
    rank: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class RankRuntime:
    """Everything this rank executes, built once from the plan."""

    params: list[ParamRecord]                       # every parameter of the optimizer
    trainable: list[ParamRecord]                    # by plan index
    blocks: dict[int, BlockRecord]                  # owned blocks, by plan block index
    buckets: list[BlockBucket]
    bucket_group: list[int]
    bucket_members: list[list[BlockRecord]]
    schedule: RankSchedule
    comm: CommContext
    waves: list[int]                                # overlap wave of every plan block
    workspace: Workspace                            # the buckets' shared scratch and packing indices
    release_buffers: bool = False                   # drop every buffer between steps (indices, salts too)

    def end_of_step(self) -> None:
        """Free what the step used besides the state: the scratch always; with ``release_buffers`` also the
        packing indices and the buckets' salts (remade at the next step), so nothing but the state stays."""
        self.workspace.release(indices=self.release_buffers)
        if self.release_buffers:
            for bucket in self.buckets:
                bucket.release_buffers()

    def block_view(self, stacks: list[torch.Tensor], piece: Piece) -> torch.Tensor:
        """The part ``piece`` of its block inside per-bucket stacks ``[B, *block shape]``."""
        rec = self.blocks[piece.block_index]
        return narrow_to(stacks[rec.bucket][rec.slot].view(rec.block.box_shape), piece.box, rec.block.box)

    def piece_view(self, tensors: dict[int, torch.Tensor], piece: Piece) -> torch.Tensor:
        """The part ``piece`` of a local-shaped tensor of its parameter (``tensors`` by plan index)."""
        return self.trainable[piece.param_index].view(tensors[piece.param_index], piece.box)

    def state_entries(self) -> dict[torch.Tensor, dict[str, Any]]:
        """What ``optimizer.state`` shows: per trainable parameter, its owned blocks' views, momentum, z.

        Every trainable parameter gets an entry, empty on ranks that own none of its blocks, so
        the state is non-empty on every rank: torch's ``_init_optim_state`` (get_state_dict) then
        skips its init step everywhere instead of stepping (a collective) on some ranks only, and
        ``set_state_dict(strict=True)`` finds state for every trainable parameter.
        """
        out: dict[torch.Tensor, dict[str, Any]] = {rec.param: {} for rec in self.trainable}
        for block in self.blocks.values():
            out[block.param.param][block.state_key] = self.buckets[block.bucket].state_views(block.slot)
        for rec in self.trainable:
            if rec.momentum is not None:
                out[rec.param]["momentum"] = rec.momentum
            if rec.z is not None:
                out[rec.param]["z"] = rec.z
        return out


def param_records(params: list[torch.Tensor], names: list[str], group_of: list[int], specs: list[ParamSpec],
                  plan: ShampooPlan, rank: int, momentum_groups: set[int],
                  averaging_groups: frozenset[int] = frozenset()) -> list[ParamRecord]:
    """One record per parameter; trainable ones in plan order get their plan index and momentum / z.

    ``z`` is allocated here (zeros, so the planner's bytes are what exists from construction on)
    and set to the parameter at the group's first step (``runtime/averaging.py``).
    """
    plan_index = {p.name: k for k, p in enumerate(plan.params)}
    records = []
    for i, (p, n, gi, spec) in enumerate(zip(params, names, group_of, specs)):
        k = plan_index.get(n)
        region = plan.geometries[k].held(rank) if k is not None else None
        rec = ParamRecord(i, n, gi, p, spec, k, region)
        if k is not None and gi in momentum_groups:
            rec.momentum = torch.zeros_like(rec.local())
        if k is not None and gi in averaging_groups:
            rec.z = torch.zeros_like(rec.local())
        records.append(rec)
    return records


def build_runtime(records: list[ParamRecord], plan: ShampooPlan, bucket_configs: list[BucketConfig],
                  comm: CommContext, waves: list[int], release_buffers: bool = False) -> RankRuntime:
    """Buckets of the blocks this rank owns (per wave, first appearance in plan order) and the schedule.

    ``bucket_configs``: per param group, what decides its buckets' state layout. ``waves``: the overlap
    wave of every plan block (``routing.block_waves``); blocks of different waves never share a bucket,
    so a wave's math needs only its own gradients. All buckets share one scratch :class:`Workspace`
    (they run one after the other). ``release_buffers``: keep nothing but the state between steps;
    otherwise the packing indices of every owned size are made now and kept (the planner's resident bytes).
    """
    trainable = sorted((r for r in records if r.trainable), key=lambda r: cast(int, r.plan_index))
    keyed: dict[tuple, list[int]] = {}
    for b in plan.owned_indices(comm.rank):
        rec = trainable[plan.block_param[b]]
        keyed.setdefault((waves[b], *bucket_key(rec.group, plan.blocks[b])), []).append(b)
    buckets: list[BlockBucket] = []
    bucket_group: list[int] = []
    members: list[list[BlockRecord]] = []
    blocks: dict[int, BlockRecord] = {}
    workspace = Workspace(comm.device)
    for key, indices in keyed.items():
        gi = key[1]
        bucket = BlockBucket([plan.blocks[b] for b in indices], bucket_configs[gi], comm.device, workspace)
        recs = [BlockRecord(b, plan.blocks[b], trainable[plan.block_param[b]], len(buckets), j)
                for j, b in enumerate(indices)]
        blocks.update((r.index, r) for r in recs)
        members.append(recs)
        buckets.append(bucket)
        bucket_group.append(gi)
    if release_buffers:
        for bucket in buckets:
            bucket.release_buffers()
    else:
        workspace.reserve_indices({d for bucket in buckets for d in bucket.packed_dims})
    return RankRuntime(records, trainable, blocks, buckets, bucket_group, members,
                       build_schedule(plan, comm.rank), comm, waves, workspace, release_buffers)


__all__ = ["BlockRecord", "CommContext", "ParamRecord", "RankRuntime", "build_runtime", "param_records"]
