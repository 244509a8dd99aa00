"""ShardedShampoo as torchrec's dense optimizer: a ``KeyedOptimizerWrapper`` that splits the work.

A ``DistributedModelParallel`` (DMP) model trains its sharded embedding tables with torchrec's
fused in-backward optimizer (``model.fused_optimizer``) and wraps the remaining, *dense*
parameters in DDP, so every rank holds them in full and sees the same averaged gradient. Those
are plain replicated tensors: ShardedShampoo (with the default process group of size > 1 and no
``mesh``) plans them over the world, each rank owns some of the preconditioner blocks, and one
``all_to_all_single`` returns the updates -- the work is split across the DMP ranks instead of
every rank repeating it.

:class:`ShampooDenseOptimizer` makes that optimizer a torchrec ``KeyedOptimizer`` so that
``CombinedOptimizer([model.fused_optimizer, dense])`` gives one ``step``, one ``state_dict`` (keyed
by parameter FQN, as torchrec's checkpointing expects) and one LR scheduler for both. The torchrec
hooks, checked against ``torchrec/optim/keyed.py`` (1.8):

- ``state_dict``/``load_state_dict`` (KeyedOptimizer's): state keyed by FQN, loaded by copying
  into the live tensors, so ``dcp.load`` can fill it in place and re-shard it. Per parameter the
  entries are ShardedShampoo's (``block_{i}`` dicts on the block's owner only, ``momentum``) plus
  ``step``: torchrec does not save ``param_groups`` by default (``save_param_groups``), but
  ShardedShampoo's precondition schedule reads the group's step counter, so it travels as a
  per-parameter 0-d int64 tensor, like ``step`` in ``torch.optim.Adam``'s state.
- ``post_load_state_dict``: restores each param group's ``step`` from those tensors.
- ``init_state``: a no-op. KeyedOptimizer's version runs a zero-gradient step to create lazy
  state; ShardedShampoo allocates all of its state at construction, and a real step would
  advance its counters. (``CombinedOptimizer.init_state`` still steps every sub-optimizer with
  zero gradients; torchrec follows it with ``load_state_dict``, which restores everything.)
- ``save_param_groups(True)``: param groups (hyperparameters and config objects) are saved too,
  the config objects as plain dicts (``config_to_dict``), so a checkpoint holds only data.
- ``set_optimizer_step``/``update_hyper_parameters``: not provided (torchrec calls them only if
  present); change hyperparameters through ``param_groups`` or an LR scheduler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.config import CONFIG_OBJECT_SETTINGS, config_from_dict, config_to_dict

#: the per-parameter state entry that carries the param group's step counter
STEP_KEY = "step"


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters torchrec leaves to a dense optimizer, by FQN.

    Those without an in-backward (fused) optimizer, as torchrec's own examples select them with
    ``in_backward_optimizer_filter``. Tables that the sharding plan made ``data_parallel`` have no
    fused optimizer, so they are dense parameters too.
    """
    return {n: p for n, p in in_backward_optimizer_filter(model.named_parameters()) if p.requires_grad}


def check_not_fused(params: Mapping[str, torch.Tensor]) -> None:
    """Refuse parameters that torchrec's in-backward (fused) optimizer trains: sharded embedding tables.

    Without this, ``ShampooDenseOptimizer(dict(dmp.named_parameters()))`` fails deep in planning with a
    cross-rank shape mismatch (each rank holds other shards of the tables), which names the wrong cause.
    """
    fused = [name for name, _ in in_backward_optimizer_filter(iter(params.items()), include=True)]
    if fused:
        shown = fused[:4] + ([f"... ({len(fused)} in all)"] if len(fused) > 4 else [])
        raise ValueError(f"ShampooDenseOptimizer got parameters that torchrec's fused (in-backward) optimizer "
                         f"already trains: {shown}. These are sharded embedding tables -- each rank holds only its "
                         "shards, and they belong to the fused optimizer (model.fused_optimizer). Pass "
                         "dense_parameters(model) instead of dict(model.named_parameters()), and combine: "
                         "CombinedOptimizer([model.fused_optimizer, ShampooDenseOptimizer(dense_parameters(model), "
                         "...)]) (or combined_optimizer(model, ...)).")


def _to_plain(value: Any) -> Any:
    # dataclass configs and Enum settings (weight_decay_type) are pickled by class otherwise, which a
    # weights_only load refuses
    if isinstance(value, Enum) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return config_to_dict(value)
    return value


def _to_config(value: Any) -> Any:
    return config_from_dict(value) if isinstance(value, Mapping) and "__config__" in value else value


def plain_param_groups(groups: Any, plain: bool) -> list[dict[str, Any]]:
    """Saved param groups with ShardedShampoo's config objects as plain dicts (``plain=True``: data a
    ``torch.load(weights_only=True)`` reads) or back as objects (``plain=False``); idempotent, and
    other optimizers' groups pass unchanged."""
    convert = _to_plain if plain else _to_config
    return [{k: (convert(v) if k in CONFIG_OBJECT_SETTINGS else v) for k, v in g.items()} for g in groups]


class _KeyedState(Mapping[torch.Tensor, dict[str, Any]]):
    """ShardedShampoo's per-parameter state plus the param group's ``step`` tensor, read live.

    Values are fresh dicts whose tensors are the optimizer's own (views of its stacked state),
    so torchrec's in-place ``copy_`` on load and DCP's in-place load reach the real state.
    """

    def __init__(self, optimizer: ShardedShampoo, steps: Mapping[torch.Tensor, torch.Tensor]) -> None:
        self._optimizer = optimizer
        self._steps = steps

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        state = self._optimizer.state
        if param not in state:  # torch keeps state in a defaultdict: never create entries here
            raise KeyError(param)
        entry = state[param]
        if STEP_KEY in entry:
            raise RuntimeError(f"ShardedShampoo's state already has a per-parameter {STEP_KEY!r} entry; the "
                               "torchrec wrapper cannot add the group step counter under that name.")
        return {**entry, STEP_KEY: self._steps[param]}

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(list(self._optimizer.state.keys()))

    def __len__(self) -> int:
        return len(self._optimizer.state)


class ShampooDenseOptimizer(KeyedOptimizerWrapper):
    """ShardedShampoo over a DMP model's dense parameters, as a torchrec ``KeyedOptimizer``.

    Args:
        params: ``{fqn: parameter}``, usually :func:`dense_parameters` of the DMP model. FQNs name
            the state in ``state_dict`` and the blocks (``{fqn}.block_{i}``).
        **shampoo_kwargs: ShardedShampoo's keyword arguments (``lr``, ``betas``, ``epsilon``,
            ``max_preconditioner_dim``, ``grafting``, ``mesh``, ...). Without ``mesh`` the work is
            split over the default process group; pass ``mesh=`` if the DMP model runs on a
            sub-group, or ``mesh="local"`` to repeat all the work on every rank.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], **shampoo_kwargs: Any) -> None:
        params = dict(params)
        if not params:
            raise ValueError("ShampooDenseOptimizer got no parameters; pass dense_parameters(model) of a model "
                             "that has dense (non-embedding) parameters.")
        check_not_fused(params)

        def factory(named: Mapping[str, torch.Tensor]) -> ShardedShampoo:
            return ShardedShampoo(list(named.items()), **shampoo_kwargs)

        super().__init__(params, factory, pass_params_dict=True)
        if self.shampoo.averaging.groups:
            raise ValueError("ShampooDenseOptimizer does not support iterate_averaging=GeneralizedPrimalAveraging / "
                             "ScheduleFree yet: their train/eval mode and Schedule-Free lr_sum live in the param "
                             "groups, which torchrec's KeyedOptimizer does not checkpoint, so a resume would "
                             "silently restart the averaging. Use ClassicMomentum (or momentum=) here, or "
                             "ShardedShampoo directly.")
        # one host-side counter per param group, shared by that group's parameters' ``step`` entries
        self._group_steps = [torch.zeros((), dtype=torch.int64) for _ in self.shampoo.param_groups]
        steps = {p: t for g, t in zip(self.shampoo.param_groups, self._group_steps) for p in g["params"]}
        self._record_steps()
        self.state = _KeyedState(self.shampoo, steps)

    @property
    def shampoo(self) -> ShardedShampoo:
        """The wrapped ShardedShampoo (its ``plan`` says which blocks each rank owns)."""
        optimizer = self._optimizer
        assert isinstance(optimizer, ShardedShampoo)
        return optimizer

    def _record_steps(self) -> None:
        for group, counter in zip(self.shampoo.param_groups, self._group_steps):
            counter.fill_(int(group["step"]))

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = self.shampoo.step(closure)
        self._record_steps()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """KeyedOptimizer's, with config objects in saved param groups as plain dicts (``config_to_dict``):
        a checkpoint then holds only data, which loads with ``torch.load(weights_only=True)``."""
        out = super().state_dict()
        if "param_groups" in out:
            out["param_groups"] = plain_param_groups(out["param_groups"], plain=True)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """KeyedOptimizer's, turning plain-dict configs of saved param groups back into config objects."""
        if "param_groups" in state_dict:
            state_dict = {**state_dict, "param_groups": plain_param_groups(state_dict["param_groups"], plain=False)}
        super().load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.shampoo.zero_grad(set_to_none=set_to_none)

    def init_state(self, sparse_grad_parameter_names: Optional[set[str]] = None) -> None:
        """Nothing to do: ShardedShampoo's state exists from construction (see the module doc)."""

    def post_load_state_dict(self) -> None:
        """After torchrec copied a state dict in: take each group's step from its ``step`` tensor."""
        for group, counter in zip(self.shampoo.param_groups, self._group_steps):
            group["step"] = int(counter)


def combined_optimizer(model: nn.Module, **shampoo_kwargs: Any) -> CombinedOptimizer:
    """``CombinedOptimizer([model.fused_optimizer, ShampooDenseOptimizer(dense_parameters(model))])``.

    ``model`` is a ``DistributedModelParallel``; its sparse tables keep torchrec's fused optimizer.
    """
    fused = getattr(model, "fused_optimizer", None)
    if fused is None:
        raise TypeError(f"combined_optimizer needs a torchrec DistributedModelParallel model (it has "
                        f"fused_optimizer); got {type(model).__name__}. For a plain model use ShardedShampoo.")
    return CombinedOptimizer([fused, ShampooDenseOptimizer(dense_parameters(model), **shampoo_kwargs)])
