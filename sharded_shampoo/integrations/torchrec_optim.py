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
- ``save_param_groups(True)``: param groups (hyperparameters and config objects) are saved too.
- ``set_optimizer_step``/``update_hyper_parameters``: not provided (torchrec calls them only if
  present); change hyperparameters through ``param_groups`` or an LR scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from sharded_shampoo import ShardedShampoo

#: the per-parameter state entry that carries the param group's step counter
STEP_KEY = "step"


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters torchrec leaves to a dense optimizer, by FQN.

    Those without an in-backward (fused) optimizer, as torchrec's own examples select them with
    ``in_backward_optimizer_filter``. Tables that the sharding plan made ``data_parallel`` have no
    fused optimizer, so they are dense parameters too.
    """
    return {n: p for n, p in in_backward_optimizer_filter(model.named_parameters()) if p.requires_grad}


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

        def factory(named: Mapping[str, torch.Tensor]) -> ShardedShampoo:
            return ShardedShampoo(list(named.items()), **shampoo_kwargs)

        super().__init__(params, factory, pass_params_dict=True)
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
