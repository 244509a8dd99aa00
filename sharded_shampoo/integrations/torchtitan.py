"""ShardedShampoo as a drop-in optimizer for torchtitan 0.3.0 (``pip install sharded-shampoo[torchtitan]``).

torchtitan builds its optimizer from ``Trainer.Config.optimizer`` (an ``OptimizersContainer.Config``)
by ``config.optimizer.build(model_parts=...)`` and resolves ``ParamGroupConfig.optimizer_name``
through a fixed table (Adam, AdamW, DistMuon): there is no registry to add a name to. So this
module ships a subclass, ``ShardedShampooContainer``, whose ``Config`` is used in place of
torchtitan's. It resolves ``optimizer_name="ShardedShampoo"`` and differs from the parent in three
ways, all because ShardedShampoo is one *distributed* optimizer rather than a per-tensor one:

* ONE ShardedShampoo is built over the ShardedShampoo groups of all model parts (the parent
  builds one optimizer per part), since the planner balances blocks over every rank of the mesh.
* Each group's keys are checked: torchtitan's injected ``fused``/``foreach`` are dropped, unknown
  keys raise ``ValueError`` (``param_groups.shampoo_group_kwargs``). Optimizer-wide arguments
  (``mesh``, ``comm_dtype``, ``nonfinite_grads``) go in
  ``optimizer_factory_kwargs_by_name["ShardedShampoo"]``.
* 3-D MoE expert weights go into a group of their own with per-expert blocking
  (``param_groups.split_expert_groups``), controlled by ``Config.expert_module_pattern``.
* Pipeline stages: a rank may hold several model parts (interleaved virtual stages). A
  ``ParamGroupConfig`` pattern that matches nothing in one part is fine (torchtitan raises): it
  must match in some part on some rank (``stage_groups``). A part with no ShardedShampoo
  parameters adds nothing to the ShardedShampoo, and a rank with none builds none; a rank with no
  trainable parameter at all has no optimizer. Every stage's ShardedShampoo plans over the mesh
  of its own DTensor parameters (the stage's FSDP/TP mesh): stage-local, as pipelining needs.

Other optimizer names (e.g. AdamW for embeddings) are built exactly as torchtitan does. Checkpointing
needs nothing extra: the parent's ``state_dict``/``load_state_dict`` flatten the optimizer's
``state_dict()`` to ``state.{fqn}.{block}.{key}`` keys, which never contain a rank, so DCP reshards
them to another layout; the parent's zero-lr ``init_optim_state`` step is a no-op for ShardedShampoo
(its state exists from construction, and a zero-lr all-zero-gradient step changes nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn
from torch.optim import Optimizer

try:
    from torchtitan.components.checkpointer.utils import canonical_fqn
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sharded_shampoo.integrations.torchtitan needs torchtitan: "
                      "pip install 'sharded-shampoo[torchtitan]'") from exc

from ..optimizer import ShardedShampoo
from .trainer_groups import DEFAULT_EXPERT_MODULE_PATTERN, expert_pattern, shampoo_group_kwargs, split_expert_groups
from .stage_groups import check_every_entry_matched, check_unique_names, matched_on_any_rank, part_param_groups

__all__ = ["SHAMPOO_NAME", "ShardedShampooContainer", "build_sharded_shampoo", "default_sharded_shampoo"]

SHAMPOO_NAME = "ShardedShampoo"

logger = logging.getLogger(__name__)


def build_sharded_shampoo(groups: list[dict[str, Any]], patterns: list[str],
                          factory_kwargs: dict[str, Any],
                          expert_module_pattern: Optional[str] = DEFAULT_EXPERT_MODULE_PATTERN) -> ShardedShampoo:
    """One ShardedShampoo from torchtitan-style groups (``params`` + aligned ``param_names``).

    ``patterns[i]`` is the config pattern of ``groups[i]`` (for error messages only).
    """
    checked = [shampoo_group_kwargs(g, pattern) for g, pattern in zip(groups, patterns)]
    split = split_expert_groups(checked, expert_module_pattern)
    return ShardedShampoo(split, **factory_kwargs)      # groups carry aligned params and param_names


class ShardedShampooContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also resolves ``optimizer_name="ShardedShampoo"``.

    Use ``ShardedShampooContainer.Config`` (or ``default_sharded_shampoo``) as
    ``Trainer.Config.optimizer``; everything else in torchtitan stays as it is.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        expert_module_pattern: Optional[str] = DEFAULT_EXPERT_MODULE_PATTERN
        """Regex matched against each module-name component of a parameter's FQN; 3-D
        parameters under a matching module are MoE expert weights ``[E, d_in, d_out]`` and are
        preconditioned per expert (a param group of their own). None: no expert group."""

        def __post_init__(self) -> None:
            # checked when the config is made (not at build time, after the model is built); no
            # zero-argument super() here: slots=True recreates the class, which breaks it
            expert_pattern(self.expert_module_pattern, "ShardedShampooContainer.Config.expert_module_pattern")

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        impl_kwargs = self._build_impl_kwargs(config)
        self.optimizers = []
        self.model_parts = model_parts
        all_params: list[nn.Parameter] = []
        shampoo_groups: list[dict[str, Any]] = []
        shampoo_patterns: list[str] = []
        matched: set[int] = set()
        for part_idx, model in enumerate(model_parts):
            part, part_matched = part_param_groups(model, config.param_groups, impl_kwargs, canonical_fqn)
            matched |= part_matched
            for name, groups in part.groups.items():
                for group in groups:
                    all_params.extend(group["params"])
                if name == SHAMPOO_NAME:
                    shampoo_groups.extend(groups)
                    shampoo_patterns.extend(part.patterns[name])
                    continue
                optimizer = self._resolve_optimizer_factory(name)(
                    groups, **config.optimizer_factory_kwargs_by_name.get(name, {}))
                self.optimizers.append(optimizer)
                self._log_optimizer(optimizer, part_idx, part.patterns[name])
        check_every_entry_matched(config.param_groups, matched_on_any_rank(matched, len(config.param_groups)))
        if shampoo_groups:
            check_unique_names(shampoo_groups)
            shampoo = build_sharded_shampoo(shampoo_groups, shampoo_patterns,
                                            config.optimizer_factory_kwargs_by_name.get(SHAMPOO_NAME, {}),
                                            config.expert_module_pattern)
            self.optimizers.append(shampoo)
            self._log_shampoo(shampoo, len(model_parts))
        self._validate_params(all_params)
        if config.implementation == "fused_opt_states_bf16":
            self._register_bf16_optimizer_state_hook()
        self._post_init(all_params)

    def _post_init(self, all_params: list[nn.Parameter]) -> None:
        # torch's Optimizer refuses an empty parameter list; a pipeline stage with nothing
        # trainable is valid (it has no optimizer), so it gets one empty group for the hooks
        Optimizer.__init__(self, all_params if all_params else [{"params": []}], {})

    @staticmethod
    def _log_shampoo(optimizer: Optimizer, n_parts: int) -> None:
        for gi, group in enumerate(optimizer.param_groups):
            logger.info("ShardedShampoo (over %d model part(s)) group %d: %d params, lr=%s, blocking=%s",
                        n_parts, gi, len(group["params"]), group["lr"], group["blocking"])


def default_sharded_shampoo(lr: float = 3e-4, **kwargs: Any) -> ShardedShampooContainer.Config:
    """A ``ShardedShampooContainer.Config`` with one catch-all ShardedShampoo group.

    The counterpart of torchtitan's ``default_adamw``: ``Trainer.Config(optimizer=default_sharded_shampoo(
    lr=3e-4, betas=(0.9, 0.95), grafting=AdamGrafting(beta2=0.95, epsilon=1e-8)), ...)``. ``kwargs`` are
    per-group ShardedShampoo options (the ``fused``/``foreach`` keys torchtitan adds are dropped).
    """
    return ShardedShampooContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=SHAMPOO_NAME,
                                       optimizer_kwargs={"lr": lr, **kwargs})],
    )
