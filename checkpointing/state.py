"""``TrainState``: the model and its optimizer as one DCP ``Stateful``.

``dcp.save({"app": TrainState(model, opt)}, checkpoint_id=path)`` and the matching
``dcp.load`` work directly; :mod:`.storage` builds the crash-safe save/load pair on top.

The state dict is torch's own ``get_state_dict(model, optimizer)`` (FSDP2/HSDP DTensors for
the model, the optimizer's FQN-keyed state, flattened or nested) plus two small entries:

- ``shampoo_meta``: the JSON description of the block plan and structural settings
  (:func:`.compat.describe`), written once (every rank has the same value, DCP dedups it);
- ``shampoo_plan_<fingerprint>``: a guard entry whose *key* carries the fingerprint. Loading
  requests the live optimizer's guard key, so DCP's load planning -- which runs on every rank
  before any byte is read -- fails with "Missing key ... shampoo_plan_<fp>" when the plan or a
  structural setting differs, and no live tensor is touched even though DCP loads in place.
  :func:`.storage.load_checkpoint` checks the description first and raises a readable
  :class:`.compat.IncompatibleCheckpointError` instead.

ShardedShampoo's block state keys are ``optim.state.{fqn}.block_{i}.{kind}`` (the same in the
flattened and the nested layout), momentum is ``optim.state.{fqn}.momentum`` (a DTensor shaped
like the parameter); no key contains a rank or a world size. Each block exists on its owner
only, so DCP writes it exactly once, and on load every rank requests the blocks it owns under
the *new* plan, which is how a checkpoint resumes on another world size or mesh.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from enum import Enum
from typing import Any, Optional, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from sharded_shampoo import ShardedShampoo

from .compat import check_compatible, describe
from .errors import CheckpointArgumentError

META_KEY = "shampoo_meta"
GUARD_PREFIX = "shampoo_plan_"


class HyperparameterSource(str, Enum):
    """Where a load takes the param groups' hyperparameters (lr, betas, ...) from."""

    CHECKPOINT = "checkpoint"  # torch's convention: the saved values come back
    CURRENT = "current"        # keep the live values (a new lr, precondition_frequency, ...)

    @classmethod
    def parse(cls, value: Any) -> "HyperparameterSource":
        """The source for ``value`` (the enum or its string); the one check of ``hyperparameters=``."""
        try:
            return cls(value)
        except ValueError:
            raise CheckpointArgumentError(f"TrainState.hyperparameters must be one of {HYPERPARAMETER_MODES}; "
                                          f"got {value!r}.") from None


HYPERPARAMETER_MODES = tuple(s.value for s in HyperparameterSource)
#: param-group entries that are state, never "hyperparameters" kept from the live optimizer (the
#: step count, and iterate averaging's mode and Schedule-Free learning-rate sum)
_GROUP_STATE_KEYS = ("params", "param_names", "step", "train_mode", "lr_sum")


class CheckpointState(Protocol):
    """What the save and load machinery (:mod:`.saving`, :mod:`.loading`) needs of a checkpoint's state.

    :class:`TrainState` is one; the torchrec integration's ``DMPTrainState`` is the other.
    """

    extra: dict[str, Any]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    def describe(self) -> Optional[dict[str, Any]]: ...

    def guard_key(self) -> Optional[str]: ...


def plan_entries(meta: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The entries a state dict holding a ShardedShampoo starts with: the plan guard, then the plan
    description. The guard comes first: DCP's load planning reports the first missing key, so a
    checkpoint of another plan fails naming the guard."""
    if meta is None:
        return {}
    return {GUARD_PREFIX + meta["fingerprint"]: meta["fingerprint"], META_KEY: json.dumps(meta, sort_keys=True)}


def check_plan(state_dict: Mapping[str, Any], meta: Optional[dict[str, Any]]) -> None:
    """Before anything is loaded: the stored plan description must be compatible with ``meta``."""
    if meta is not None:
        raw = state_dict.get(META_KEY)
        check_compatible(json.loads(raw) if isinstance(raw, str) and raw else None, meta)


def _nests(value: Any) -> bool:
    """Would DCP split ``value`` into several entries (a dict, or a container holding a tensor or dict)?"""
    if isinstance(value, Mapping):
        return True
    if isinstance(value, (list, tuple, Set)):
        return any(isinstance(v, torch.Tensor) or _nests(v) for v in value)
    return False


def check_extra(extra: Optional[Mapping[str, Any]]) -> None:
    """Refuse ``extra`` values that DCP would save but that could never be loaded back by their key.

    DCP flattens a dict value ``{"cfg": {"a": 1}}`` into the key ``extra.cfg.a`` (a list of tensors
    into ``extra.lst.0``, ...), and an empty dict into nothing at all, so ``load_checkpoint(extra={"cfg":
    ...})`` finds no ``extra.cfg`` to load. Refusing at save time beats finding out at resume time.
    """
    if extra is None:
        return
    if not isinstance(extra, Mapping):
        raise CheckpointArgumentError(f"extra must be a dict of named values; got {type(extra).__name__}.")
    for key, value in extra.items():
        if not isinstance(key, str) or not key:
            raise CheckpointArgumentError(f"extra keys must be non-empty strings; got {key!r}.")
        if _nests(value):
            raise CheckpointArgumentError(
                f"extra[{key!r}] is a {type(value).__name__} that DCP would store as several entries, which "
                "cannot be loaded back under one key. Store each entry as its own extra key (e.g. "
                f"extra={{'{key}_a': ...}}), or json.dumps(...) it into a string.")


class TrainState(Stateful):
    """Model + optimizer (+ small ``extra`` values such as the step index) for DCP.

    Args:
        model: the (FSDP2/HSDP-wrapped or plain) module.
        optimizer: a ``ShardedShampoo`` (fingerprinted and checked) or any torch optimizer.
        extra: plain values saved next to them (ints, floats, strings, bytes, None, tensors, lists
            and tuples of those without tensors); after a load, ``self.extra`` holds the
            checkpoint's values for the keys given here. Dicts are refused (see
            :func:`check_extra`).
        flatten_optimizer_state_dict: passed to ``StateDictOptions``; load with the value the
            checkpoint was saved with (``storage.load_checkpoint`` detects it).
        hyperparameters: ``"checkpoint"`` (torch's convention: lr, betas, ... come back from the
            checkpoint) or ``"current"`` (keep the live param-group values, e.g. a new lr or
            precondition_frequency; step counters and statistics still come from the checkpoint).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 extra: Optional[Mapping[str, Any]] = None, flatten_optimizer_state_dict: bool = True,
                 hyperparameters: str | HyperparameterSource = "checkpoint") -> None:
        source = HyperparameterSource.parse(hyperparameters)
        self.model = model
        self.optimizer = optimizer
        check_extra(extra)
        self.extra: dict[str, Any] = dict(extra or {})
        self.flatten_optimizer_state_dict = flatten_optimizer_state_dict
        self.hyperparameters = source

    def _options(self) -> StateDictOptions:
        return StateDictOptions(flatten_optimizer_state_dict=self.flatten_optimizer_state_dict)

    def describe(self) -> Optional[dict[str, Any]]:
        """The optimizer's plan description, or None for optimizers other than ShardedShampoo."""
        return describe(self.optimizer) if isinstance(self.optimizer, ShardedShampoo) else None

    def guard_key(self) -> Optional[str]:
        meta = self.describe()
        return None if meta is None else GUARD_PREFIX + meta["fingerprint"]

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        out = plan_entries(self.describe())
        out.update(model=model_sd, optim=optim_sd, extra=dict(self.extra))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_plan(state_dict, self.describe())
        keep = None
        if self.hyperparameters is HyperparameterSource.CURRENT:
            keep = [{k: v for k, v in g.items() if k not in _GROUP_STATE_KEYS} for g in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"], options=self._options())
        if keep is not None:
            for group, values in zip(self.optimizer.param_groups, keep):
                group.update(values)
        self.extra.update({k: v for k, v in state_dict.get("extra", {}).items() if k in self.extra})
