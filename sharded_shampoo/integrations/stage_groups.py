"""Param groups of several model parts (pipeline stages) from one list of patterns. Pure.

A trainer's optimizer config lists ``(pattern, optimizer name, kwargs)`` entries; each trainable
parameter goes to the first entry whose pattern it matches. torchtitan applies the list to each
model part separately and raises when an entry matches nothing *in that part*. With pipeline
parallelism that is wrong: a rank holds a few stages (or interleaved virtual stages), and a stage
that holds only the embeddings, or no layer with a norm, or nothing trainable, is normal. So here
an entry must match a parameter in *some* part of this rank (else the config is wrong and the
error names it), and a part without a match for an entry simply gets no group from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class PartGroups:
    """One model part's param groups by optimizer name, and each group's pattern (for logs)."""

    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    patterns: dict[str, list[str]] = field(default_factory=dict)


def part_param_groups(model: nn.Module, entries: Sequence[Any], impl_kwargs: dict[str, Any],
                      canonical_name: Callable[[str], str]) -> tuple[PartGroups, set[int]]:
    """Groups of ``model`` (first matching entry wins) and the indices of the entries that matched.

    ``entries`` have ``pattern``, ``optimizer_name`` and ``optimizer_kwargs`` (torchtitan's
    ``ParamGroupConfig``); ``canonical_name`` strips wrapper segments from an FQN.
    """
    out = PartGroups()
    matched: set[int] = set()
    unclaimed = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for index, entry in enumerate(entries):
        pattern = re.compile(entry.pattern)
        mine = [(name, p) for name, p in unclaimed if pattern.search(name)]
        if not mine:
            continue
        matched.add(index)
        taken = {id(p) for _, p in mine}
        unclaimed = [(name, p) for name, p in unclaimed if id(p) not in taken]
        group = {"params": [p for _, p in mine], "param_names": [canonical_name(name) for name, _ in mine],
                 **impl_kwargs, **entry.optimizer_kwargs}
        out.groups.setdefault(entry.optimizer_name, []).append(group)
        out.patterns.setdefault(entry.optimizer_name, []).append(entry.pattern)
    return out, matched


def matched_on_any_rank(matched: set[int], num_entries: int) -> set[int]:
    """The entries that matched on this rank or on any other rank of the default process group.

    Every rank builds its optimizer at the same point of a job (torchtitan's Trainer does), so one
    all-reduce here is matched by every rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or num_entries == 0:
        return set(matched)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(num_entries, dtype=torch.int32, device=device)
    flags[sorted(matched)] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return {i for i, f in enumerate(flags.tolist()) if f}


def check_every_entry_matched(entries: Sequence[Any], matched: set[int]) -> None:
    """Raise ``ValueError`` naming each entry that matched no trainable parameter on any rank."""
    missing = [entries[i].pattern for i in range(len(entries)) if i not in matched]
    if missing:
        raise ValueError(f"Optimizer param_groups pattern(s) {missing} matched no trainable parameter in any "
                         "model part on any rank; fix the pattern or remove the entry.")


def check_unique_names(groups: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` if two parameters of one optimizer share a name (state keys would collide).

    Model parts of one rank must keep the whole model's FQNs (torchtitan's pipeline split does).
    """
    seen: set[str] = set()
    for group in groups:
        for name in group["param_names"]:
            if name in seen:
                raise ValueError(f"parameter name {name!r} occurs in two model parts of this rank; give every "
                                 "model part its parameters' FQNs in the whole model (split by deleting "
                                 "modules, as torchtitan's pipeline split does, not by renumbering).")
            seen.add(name)
