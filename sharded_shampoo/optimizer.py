"""``ShardedShampoo``: the public optimizer.

Construction does all the deciding (DESIGN.md "Data flow"): parameters -> ``ParamSpec``s ->
the planner's blocks and owners -> this rank's routing schedule -> stacked state buckets for
the blocks this rank owns. ``step()`` only executes that static schedule. One process is the
degenerate case: one rank owns every block and routing is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .config import (NONFINITE_POLICIES, STRUCTURAL_SETTINGS, AdaGradGrafting, BlockingConfig, EigenvalueCorrectedShampoo,
                     GraftingConfig, PreconditionerConfig, RootInverseShampoo, SGDGrafting, AdamGrafting,
                     RMSpropGrafting, _check_range)
from .runtime.executor import StepExecutor, local_tensor
from .planning.layout import MeshSpec, ParamSpec
from .runtime.placements import resolve_mesh
from .planning.plan import PlanSettings, make_plan
from .compute.preconditioner import BlockBucket, BucketHyperparams, RootFailureError, bucket_key
from .runtime.routing import build_schedule
from .runtime.state_io import load_optimizer_state, optimizer_state_dict



class NonFiniteGradientError(RuntimeError):
    """A gradient contained NaN or Inf and ``nonfinite_grads='raise'``."""


def _validate_group(g: dict[str, Any]) -> None:
    """Raise ValueError naming the field and its valid range for any bad hyperparameter."""
    _check_range("ShardedShampoo", "lr", g["lr"], 0.0, math.inf) if not isinstance(g["lr"], torch.Tensor) else None
    betas = g["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"ShardedShampoo.betas must be a pair (beta1, beta2); got {betas!r}.")
    _check_range("ShardedShampoo", "betas[0]", betas[0], 0.0, 1.0, high_open=True)
    _check_range("ShardedShampoo", "betas[1]", betas[1], 0.0, 1.0, low_open=True)
    _check_range("ShardedShampoo", "epsilon", g["epsilon"], 0.0, math.inf, low_open=True)
    _check_range("ShardedShampoo", "weight_decay", g["weight_decay"], 0.0, math.inf)
    _check_range("ShardedShampoo", "momentum", g["momentum"], 0.0, 1.0, high_open=True)
    _check_range("ShardedShampoo", "dampening", g["dampening"], 0.0, 1.0, high_open=True)
    if g["use_nesterov"] and g["momentum"] == 0:
        raise ValueError("ShardedShampoo.use_nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or "
                         "use_nesterov=False.")
    for name in ("max_preconditioner_dim", "precondition_frequency"):
        v = g[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"ShardedShampoo.{name} must be an integer >= 1; got {v!r}.")
    s = g["start_preconditioning_step"]
    if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 1):
        raise ValueError("ShardedShampoo.start_preconditioning_step must be None (= precondition_frequency) "
                         f"or an integer >= 1; got {s!r}.")
    grafting = g["grafting"]
    if grafting is not None and not isinstance(grafting, (SGDGrafting, AdaGradGrafting, RMSpropGrafting,
                                                          AdamGrafting)):
        raise ValueError("ShardedShampoo.grafting must be None, SGDGrafting(), AdaGradGrafting(), "
                         f"RMSpropGrafting() or AdamGrafting(); got {grafting!r}.")
    if not isinstance(g["preconditioner"], (RootInverseShampoo, EigenvalueCorrectedShampoo)):
        raise ValueError("ShardedShampoo.preconditioner must be RootInverseShampoo() or "
                         f"EigenvalueCorrectedShampoo(); got {g['preconditioner']!r}.")
    if not isinstance(g["blocking"], BlockingConfig):
        raise ValueError(f"ShardedShampoo.blocking must be a BlockingConfig; got {g['blocking']!r}.")


def _split_named(params: Any) -> list[dict[str, Any]]:
    """Normalise params / named_parameters / group dicts into group dicts with 'params' and 'names'."""
    if isinstance(params, torch.Tensor):
        raise TypeError("ShardedShampoo expects an iterable of parameters, named parameters or param-group "
                        "dicts; got a single Tensor. Pass [tensor] or model.parameters().")
    items = list(params)
    if not items:
        raise ValueError("ShardedShampoo got an empty parameter list.")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("param groups must be dicts with a 'params' entry.")
        g = dict(group)
        entries = g["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        names: list[Optional[str]] = []
        tensors: list[torch.Tensor] = []
        for e in entries:
            if isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str):
                names.append(e[0])
                tensors.append(e[1])
            else:
                names.append(None)
                tensors.append(e)
        g["params"] = tensors
        g["param_names"] = names
        out.append(g)
    return out


class ShardedShampoo(Optimizer):
    """Distributed Shampoo native to DTensor/FSDP2/HSDP; see docs/user_guide.md for every option."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        use_decoupled_weight_decay: bool = True,
        momentum: float = 0.0,
        dampening: float = 0.0,
        use_nesterov: bool = False,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 100,
        start_preconditioning_step: Optional[int] = None,
        use_bias_correction: bool = True,
        grafting: Optional[GraftingConfig] = AdaGradGrafting(),
        preconditioner: PreconditionerConfig = RootInverseShampoo(),
        blocking: BlockingConfig = BlockingConfig(),
        mesh: Any = None,
        comm_dtype: torch.dtype = torch.float32,
        nonfinite_grads: str = "raise",
    ) -> None:
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"ShardedShampoo.nonfinite_grads must be one of 'raise', 'skip', 'ignore'; "
                             f"got {nonfinite_grads!r}.")
        if comm_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"ShardedShampoo.comm_dtype must be a floating dtype (float32 or bfloat16); "
                             f"got {comm_dtype!r}.")
        defaults = dict(lr=lr, betas=tuple(betas), epsilon=epsilon, weight_decay=weight_decay,
                        use_decoupled_weight_decay=use_decoupled_weight_decay, momentum=momentum,
                        dampening=dampening, use_nesterov=use_nesterov,
                        max_preconditioner_dim=max_preconditioner_dim,
                        precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        use_bias_correction=use_bias_correction, grafting=grafting,
                        preconditioner=preconditioner, blocking=blocking, step=0)
        groups = _split_named(params)
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self.nonfinite_grads = nonfinite_grads
        self.comm_dtype = comm_dtype
        self._build(mesh)

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            raise NotImplementedError("ShardedShampoo plans blocks and owners once at construction; adding a "
                                      "param group later is not supported. Construct a new optimizer with all "
                                      "groups instead.")
        # every group carries "param_names" into torch's add_param_group: torch rejects a mix of
        # groups with and without names (which made a second param group fail)
        if not param_group.get("param_names"):
            param_group["param_names"] = [None] * len(param_group["params"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError("ShardedShampoo does not support complex parameters; got a "
                                 f"{p.dtype} parameter of shape {tuple(p.shape)}. Use torch.view_as_real "
                                 "on a real parameter instead.")
            if not p.is_floating_point():
                raise ValueError(f"ShardedShampoo needs floating-point parameters; got {p.dtype}.")

    def _build(self, mesh_arg: Any) -> None:
        params: list[torch.Tensor] = []
        names: list[str] = []
        group_of: list[int] = []
        for gi, group in enumerate(self.param_groups):
            for p, n in zip(group["params"], group["param_names"]):
                names.append(n if n is not None else f"params.{len(params)}")
                params.append(p)
                group_of.append(gi)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"ShardedShampoo got duplicate parameter names {dup}; names must be unique.")
        self._params = params
        self._names = names
        self._group_of = group_of
        resolved = resolve_mesh(params, names, mesh_arg)
        self._mesh_spec: MeshSpec = resolved.spec
        self._process_group = resolved.group
        self._rank = resolved.rank
        self._specs: list[ParamSpec] = resolved.param_specs
        # frozen parameters (requires_grad=False at construction) get no blocks and no state
        self._trainable = [i for i, p in enumerate(params) if p.requires_grad]
        self._trainable_set = set(self._trainable)
        settings = [self._settings(self.param_groups[group_of[i]]) for i in self._trainable]
        self.plan = make_plan([self._specs[i] for i in self._trainable], self._mesh_spec, settings)
        name_to_index = {n: i for i, n in enumerate(names)}
        block_params = [name_to_index[b.param_name] for b in self.plan.blocks]
        self._block_params = block_params
        device = local_tensor(params[0]).device
        self._device = device

        # buckets of owned blocks (deterministic order: first appearance in plan order)
        keyed: dict[tuple, list[int]] = {}
        for b, (block, owner) in enumerate(zip(self.plan.blocks, self.plan.owners)):
            if owner == self._rank:
                keyed.setdefault(bucket_key(group_of[block_params[b]], block), []).append(b)
        self._buckets: list[BlockBucket] = []
        self._bucket_group: list[int] = []
        bucket_of_block: dict[int, tuple[int, int]] = {}
        for key, members in keyed.items():
            gi = key[0]
            bucket = BlockBucket([self.plan.blocks[b] for b in members], self._hyperparams(self.param_groups[gi]),
                                 device)
            for j, b in enumerate(members):
                bucket_of_block[b] = (len(self._buckets), j)
            self._buckets.append(bucket)
            self._bucket_group.append(gi)
        self._bucket_of_block = bucket_of_block
        self._bucket_members = list(keyed.values())
        schedule = build_schedule(self.plan.blocks, self.plan.owners, block_params, self._specs,
                                  self._mesh_spec, self._rank)
        self._executor = StepExecutor(self.plan.blocks, block_params, self._specs, self._mesh_spec, schedule,
                                      self._buckets, bucket_of_block, self.comm_dtype, self._process_group,
                                      device)
        self._structure = [self._structural(g) for g in self.param_groups]
        self._init_state()

    @staticmethod
    def _structural(group: dict[str, Any]) -> dict[str, Any]:
        """What of a group decides the plan and state layout (compared at every step)."""
        return {k: group[k] for k in STRUCTURAL_SETTINGS} | {"has_beta1": group["betas"][0] > 0,
                                                             "has_momentum": group["momentum"] > 0}

    def _settings(self, group: dict[str, Any]) -> PlanSettings:
        return PlanSettings(max_preconditioner_dim=group["max_preconditioner_dim"],
                            preconditioner=group["preconditioner"], blocking=group["blocking"],
                            grafting=group["grafting"], beta1=group["betas"][0], momentum=group["momentum"],
                            precondition_frequency=group["precondition_frequency"], comm_dtype=self.comm_dtype)

    @staticmethod
    def _hyperparams(group: dict[str, Any]) -> BucketHyperparams:
        return BucketHyperparams(beta1=group["betas"][0], beta2=group["betas"][1], epsilon=group["epsilon"],
                                 use_bias_correction=group["use_bias_correction"], grafting=group["grafting"],
                                 preconditioner=group["preconditioner"])

    def _init_state(self) -> None:
        """Expose bucket state as per-block views in ``self.state`` and allocate momentum shards.

        Every trainable parameter gets an entry, empty on ranks that own none of its blocks, so
        ``self.state`` is non-empty on every rank: torch's ``_init_optim_state`` (get_state_dict)
        then skips its init step everywhere instead of stepping (a collective) on some ranks only,
        and ``set_state_dict(strict=True)`` finds state for every trainable parameter.
        """
        self.state.clear()
        for i in self._trainable:
            self.state[self._params[i]] = {}
        for b, (bi, j) in self._bucket_of_block.items():
            block = self.plan.blocks[b]
            p = self._params[self._block_params[b]]
            self.state[p][block.block_id.removeprefix(block.param_name + ".")] = self._buckets[bi].state_views(j)
        for i in self._trainable:
            p, gi = self._params[i], self._group_of[i]
            if self.param_groups[gi]["momentum"] > 0:
                self.state[p]["momentum"] = torch.zeros_like(local_tensor(p))

    # ------------------------------------------------------------------ step

    def _check_structure(self) -> None:
        for gi, (group, frozen) in enumerate(zip(self.param_groups, self._structure)):
            now = self._structural(group)
            changed = [k for k in now if now[k] != frozen[k]]
            if changed:
                raise ValueError(f"param group {gi} changed {changed} after construction; these decide the block "
                                 "plan and the state layout. Only lr, betas (keeping beta1 > 0 or == 0), epsilon, "
                                 "weight_decay, momentum (keeping > 0 or == 0), precondition_frequency and "
                                 "start_preconditioning_step may change.")
            _validate_group(group)

    def _collect_grads(self) -> tuple[dict[int, torch.Tensor], set[int]]:
        """Local gradients by param index, the set of params with a gradient on every rank."""
        grads: dict[int, torch.Tensor] = {}
        for i, p in enumerate(self._params):
            if p.grad is None:
                continue
            if i not in self._trainable_set:
                raise ValueError(f"parameter {self._names[i]!r} was frozen (requires_grad=False) when the optimizer "
                                 "was built, so it has no blocks or state, but now has a gradient. Build the "
                                 "optimizer after unfreezing, or set its .grad to None.")
            if p.grad.is_sparse:
                raise ValueError(f"ShardedShampoo does not support sparse gradients (parameter "
                                 f"{self._names[i]!r}); use a dense embedding or a sparse optimizer for it.")
            grads[i] = local_tensor(p.grad)
        # one small all-reduce carries, per parameter: has-gradient, non-finite, non-zero
        P = len(self._params)
        flags = torch.zeros(3 * P, dtype=torch.float32, device=self._device)
        if grads:
            idx = list(grads)
            flags[idx] = 1.0
            # fp32 2-norms in one foreach pass (the max-abs norm is ~7x slower on CPU); a norm can only
            # be non-finite through a NaN/Inf entry or an overflow of huge finite values, so those
            # (rare) tensors are confirmed entry by entry
            norms = torch.zeros(len(idx), dtype=torch.float64, device=self._device)
            wide = [k for k, i in enumerate(idx) if grads[i].dtype in (torch.float32, torch.float64)]
            narrow = [k for k, i in enumerate(idx) if grads[i].dtype not in (torch.float32, torch.float64)]
            for ks, dtype in ((wide, None), (narrow, torch.float32)):  # fp16/bf16 norms accumulate in fp32
                if ks:
                    norms[ks] = torch.stack(torch._foreach_norm([grads[idx[k]] for k in ks], 2, dtype=dtype)).double()
            if self.nonfinite_grads != "ignore":
                bad = ~torch.isfinite(norms)
                if bool(bad.any()):
                    for k in bad.nonzero().flatten().tolist():
                        bad[k] = not bool(torch.isfinite(grads[idx[k]]).all())
                        if not bad[k]:
                            norms[k] = 1.0  # huge but finite: non-zero
                flags[[P + i for i in idx]] = bad.float()
            flags[[2 * P + i for i in idx]] = (norms != 0).float()
        world = self._mesh_spec.world_size
        if world > 1:
            dist.all_reduce(flags, group=self._process_group)
        flags = flags.tolist()
        partial = [self._names[i] for i in range(P) if 0 < flags[i] < world]
        if partial:
            raise RuntimeError(f"parameters {partial} have a gradient on some ranks but not on others; every rank "
                               "must produce the same set of gradients.")
        bad = [self._names[i] for i in range(P) if flags[P + i] > 0]
        if bad:
            if self.nonfinite_grads == "raise":
                raise NonFiniteGradientError(
                    f"non-finite (NaN/Inf) gradient in parameters {bad}; nothing was updated. Pass "
                    "nonfinite_grads='skip' to skip such steps instead.")
            return grads, set()
        if all(g["lr"] == 0 for g in self.param_groups) and not any(flags[2 * P:]):
            # the state-initialisation step (zero lr, zero grads, as torch's get_state_dict and
            # torchtitan issue it): state already exists, so it must change nothing
            self.last_step_was_init = True
            return grads, set()
        active = {i for i in range(P) if flags[i] == world}
        return grads, active

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_structure()
        self.last_step_was_init = False
        grads, active = self._collect_grads()
        self.last_step_skipped = not active
        if not active:
            return loss
        # zero stand-ins keep message sizes static for params without gradient
        for i in self._trainable:
            if i not in grads:
                grads[i] = torch.zeros_like(local_tensor(self._params[i]))
        # L2 (coupled) weight decay folds into the gradient before it travels
        for gi, group in enumerate(self.param_groups):
            wd = group["weight_decay"]
            if wd != 0 and not group["use_decoupled_weight_decay"]:
                idx = [i for i in active if self._group_of[i] == gi]
                if idx:
                    new = torch._foreach_add([grads[i] for i in idx],
                                             [local_tensor(self._params[i]) for i in idx], alpha=wd)
                    grads.update(zip(idx, new))
        stacks = self._executor.gather(grads)
        schedule = [self._schedule(group) for group in self.param_groups]
        directions = []
        for bi, (bucket, G) in enumerate(zip(self._buckets, stacks)):
            gi = self._bucket_group[bi]
            bucket.hp = self._hyperparams(self.param_groups[gi])
            amortized, precondition = schedule[gi]
            mask = torch.tensor([self._block_params[b] in active for b in self._bucket_members[bi]],
                                device=self._device) if len(active) < len(self._trainable) else None
            directions.append(bucket.step_blocks(G, mask, amortized, precondition))
        updates = self._executor.scatter(directions, active)
        self._apply(updates)
        for group in self.param_groups:
            group["step"] += 1
        if any(a for a, _ in schedule):
            self._raise_on_exhausted_roots()
        return loss

    @staticmethod
    def _schedule(group: dict[str, Any]) -> tuple[bool, bool]:
        """(amortized step?, precondition?) for the group's next step; the same on every rank."""
        t = group["step"] + 1
        freq = group["precondition_frequency"]
        start = group["start_preconditioning_step"] or freq
        return t >= start and (t % freq == 0 or t == start), t >= start

    def _raise_on_exhausted_roots(self) -> None:
        """After a completed amortized step: raise on every rank if any owner hit the failure limit."""
        exhausted = [b for bucket in self._buckets for b in bucket.exhausted]
        limits = sorted({bk.hp.preconditioner.max_consecutive_root_failures for bk in self._buckets if bk.exhausted})
        for bucket in self._buckets:
            bucket.exhausted = []
        count = torch.tensor([float(len(exhausted))], device=self._device)
        if self._mesh_spec.world_size > 1:
            dist.all_reduce(count, group=self._process_group)
        if count.item() > 0:
            where = f"blocks {exhausted}" if exhausted else f"{int(count.item())} blocks owned by other ranks"
            raise RootFailureError(
                f"the inverse root / eigenbasis of {where} failed max_consecutive_root_failures={limits or '?'} "
                "times in a row "
                "(non-finite or non-convergent factors). This step was applied with the previous roots. Raise "
                "epsilon, lower the learning rate, or raise max_consecutive_root_failures.")

    def _apply(self, updates: list) -> None:
        """Decoupled weight decay, momentum/Nesterov and the lr step on this rank's shards, per group."""
        by_group: dict[int, list] = {}
        for piece, u in updates:
            by_group.setdefault(self._group_of[piece.param_index], []).append((piece, u))
        for gi, items in by_group.items():
            group = self.param_groups[gi]
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            lr = float(lr) if isinstance(lr, torch.Tensor) else lr  # a 0-d tensor lr (schedulers, compile)
            p_views = [self._executor.local_piece(local_tensor(self._params[pc.param_index]), pc)
                       for pc, _ in items]
            # directions are per-step buffers of this rank (P stacks or the receive buffer): safe to edit
            dirs = [u if u.dtype in (torch.float32, torch.float64) else u.float() for _, u in items]
            if wd != 0 and group["use_decoupled_weight_decay"]:
                torch._foreach_add_(dirs, p_views, alpha=wd)
            if mu > 0:
                m_views = [self._executor.local_piece(self.state[self._params[pc.param_index]]["momentum"], pc)
                           for pc, _ in items]
                torch._foreach_mul_(m_views, mu)
                torch._foreach_add_(m_views, dirs, alpha=1.0 - group["dampening"])
                if group["use_nesterov"]:  # P <- (1 - dampening) P + mu B, as in the reference
                    if group["dampening"]:
                        torch._foreach_mul_(dirs, 1.0 - group["dampening"])
                    torch._foreach_add_(dirs, m_views, alpha=mu)
                else:
                    dirs = m_views
            torch._foreach_add_(p_views, dirs, alpha=-lr)

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_optimizer_state(self, state_dict)
