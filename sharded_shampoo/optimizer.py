"""``ShardedShampoo``: the public optimizer. Construction decides everything; ``step`` keeps the policy.

Construction (the data flow of docs/design.md): parameters -> ``ParamSpec``s (``runtime/placements``)
-> the plan: blocks, owners, per-rank accounting (``planning/``) -> this rank's runtime: typed
records, stacked state buckets, the routing schedule (``runtime/records``) -> the executor.

``step()`` keeps only policy: validate the groups, collect and check the local gradients, agree
with the other ranks in one small all-reduce (errors, NaN/Inf/overflow, missing gradients,
hyperparameters), apply the non-finite policy and the state-initialisation rule, decide the
schedule (root refresh? precondition?) and hand the executor one :class:`GroupStep` per group.
One process is the degenerate case: one rank owns every block and routing is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, cast

import torch
from torch.optim import Optimizer

from .averaging_config import IterateAveragingConfig, WeightDecayType
from .compute.averaging import UpdateRule
from .compute.preconditioner import BucketConfig, BucketHyperparams, RootFailureError
from .config import (AdaGradGrafting, BlockingConfig, ElementwiseMode, GraftingConfig, NonFinitePolicy,
                     PlanSettings, PreconditionerConfig, RootInverseShampoo, STRUCTURAL_SETTINGS, structural_signature)
from .membership import GroupMembership
from .param_groups import (BOOKKEEPING_KEYS, check_comm_dtype, check_overlap_chunks, check_parameter,
                           check_release_buffers, split_named, validate_group)
from .planning.plan import make_plan
from .planning.experts import with_expert_blocks
from .root_schedule import Decision, RootSchedule
from .runtime.agreement import Agreement, RankFailureError, gradient_flags, stable_digest
from .runtime.averaging import IterateAveraging, primal_averaging_of, update_rule
from .runtime.executor import GroupStep, StepExecutor
from .runtime.gradients import gradient_summary, local_gradients
from .runtime.placements import local_tensor, resolve_mesh
from .runtime.records import CommContext, RankRuntime, build_runtime, param_records
from .runtime.routing import block_waves
from .runtime.state_io import StateIO
from .update_options import LR_SUM_KEY, resolve_group, resolve_weight_decay_type


class NonFiniteGradientError(RuntimeError):
    """A gradient contained NaN/Inf or overflowed and ``nonfinite_grads='raise'``."""


class ShardedShampoo(Optimizer):
    """Distributed Shampoo native to DTensor/FSDP2/HSDP/TP/EP; see docs/user_guide.md for every option."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: Optional[float] = None,
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        use_decoupled_weight_decay: Optional[bool] = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        use_nesterov: bool = False,
        weight_decay_type: Optional[WeightDecayType | str] = None,
        iterate_averaging: Optional[IterateAveragingConfig] = None,
        peak_lr: Optional[float] = None,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 100,
        start_preconditioning_step: Optional[int] = None,
        use_bias_correction: bool = True,
        grafting: Optional[GraftingConfig] = AdaGradGrafting(),
        preconditioner: PreconditionerConfig = RootInverseShampoo(),
        blocking: BlockingConfig = BlockingConfig(),
        mesh: Any = None,
        comm_dtype: torch.dtype = torch.float32,
        nonfinite_grads: str | NonFinitePolicy = "raise",
        overlap_chunks: int = 4,
        elementwise: str | ElementwiseMode = "eager",
        release_buffers_between_steps: bool = False,
    ) -> None:
        self.nonfinite_grads = NonFinitePolicy.parse(nonfinite_grads)
        check_comm_dtype(comm_dtype)
        check_overlap_chunks(overlap_chunks)
        check_release_buffers(release_buffers_between_steps)
        self.comm_dtype = comm_dtype
        self.overlap_chunks = overlap_chunks
        #: keep nothing but the state between steps (memory-bound jobs; costs a little step time)
        self.release_buffers_between_steps = release_buffers_between_steps
        # weight_decay_type=None: DECOUPLED, unless the deprecated use_decoupled_weight_decay says otherwise
        weight_decay_type = resolve_weight_decay_type(weight_decay_type, use_decoupled_weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, beta3=beta3,
                        epsilon=epsilon,
                        weight_decay=weight_decay, weight_decay_type=weight_decay_type, peak_lr=peak_lr,
                        momentum=momentum, dampening=dampening, use_nesterov=use_nesterov,
                        iterate_averaging=iterate_averaging,
                        max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        use_bias_correction=use_bias_correction, grafting=grafting, preconditioner=preconditioner,
                        blocking=blocking, elementwise=elementwise, step=0)
        groups = split_named(params)
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self.last_step_was_init = False
        self.last_step_skipped = False
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
        explicit = set(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        own = explicit - {"params", "param_names"}     # a group's own settings are named after the group
        resolve_group(group, explicit, f"param group {len(self.param_groups) - 1}" if own else "ShardedShampoo")
        validate_group(group)
        for j, (p, n) in enumerate(zip(group["params"], group["param_names"])):
            check_parameter(p, repr(n) if n is not None else f"param_groups[{len(self.param_groups) - 1}][{j}]")

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
        resolved = resolve_mesh(params, names, mesh_arg)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        # frozen parameters (requires_grad=False at construction) get no blocks and no state
        # 3-D parameters sharded over an expert-parallel mesh dim get per-expert blocks (planning/experts.py)
        self.plan = make_plan([resolved.param_specs[i] for i in trainable], resolved.spec,
                              [with_expert_blocks(resolved.param_specs[i],
                                                  PlanSettings.from_group(self.param_groups[group_of[i]],
                                                                          self.comm_dtype,
                                                                          self.release_buffers_between_steps))
                               for i in trainable])
        device = local_tensor(params[0]).device
        comm = CommContext(resolved.group, resolved.spec.world_size, resolved.rank, self.comm_dtype, device)
        self.agreement = Agreement(comm)
        self.agreement.same_everywhere(self._description(names, params), "the optimizer configuration")
        momentum_groups = {gi for gi, g in enumerate(self.param_groups) if g["momentum"] > 0}
        averaging_groups = frozenset(gi for gi, g in enumerate(self.param_groups) if primal_averaging_of(g))
        records = param_records(params, names, group_of, resolved.param_specs, self.plan, resolved.rank,
                                momentum_groups, averaging_groups)
        chunks = self.overlap_chunks if comm.world_size > 1 else 1
        self.runtime: RankRuntime = build_runtime(records, self.plan, [_bucket_config(g) for g in self.param_groups],
                                                  comm, block_waves(self.plan, chunks),
                                                  release_buffers=self.release_buffers_between_steps)
        self.executor = StepExecutor(self.runtime)
        self.state_io = StateIO(self.runtime)
        self.averaging = IterateAveraging(self.runtime, self.param_groups)
        self._structure = [structural_signature(g) for g in self.param_groups]
        self.membership = GroupMembership(self.param_groups)
        self.root_schedule = RootSchedule(self.param_groups)
        # parameters whose statistics are float64 (structural, so fixed): their overflow limit is wider
        self._float64_state = {cast(int, rec.plan_index) for rec in self.runtime.trainable
                               if self.param_groups[rec.group]["preconditioner"].factor_dtype == torch.float64}
        self.state.clear()
        self.state.update(self.runtime.state_entries())

    def _description(self, names: list[str], params: list[torch.Tensor]) -> dict[str, Any]:
        """What every rank must agree on: structure, parameters, policies and every hyperparameter."""
        return {"params": [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in zip(names, params)],
                "groups": [_settings_of(g) for g in self.param_groups],
                "comm_dtype": str(self.comm_dtype), "nonfinite_grads": self.nonfinite_grads.value,
                "overlap_chunks": self.overlap_chunks,
                "release_buffers_between_steps": self.release_buffers_between_steps}

    # ------------------------------------------------------------------ step

    def _check_groups(self) -> None:
        self.membership.check(self.param_groups)
        for gi, (group, frozen) in enumerate(zip(self.param_groups, self._structure)):
            now = structural_signature(group)
            changed = [k for k in now if now[k] != frozen[k]]
            if changed:
                raise ValueError(f"param group {gi} changed {changed} after construction; these decide the block "
                                 "plan and the state layout (iterate_averaging included). Only lr, betas (keeping "
                                 "beta1 > 0 or == 0), epsilon, weight_decay, weight_decay_type, peak_lr, momentum "
                                 "(keeping > 0 or == 0), precondition_frequency and start_preconditioning_step "
                                 "may change.")
            validate_group(group)

    def _local_phase(self) -> tuple[Optional[Exception], dict[int, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
        """Everything this rank checks alone; a failure is reported, not raised, so all ranks agree first."""
        try:
            self.averaging.check_train_mode(self.param_groups)
            self._check_groups()
            grads = local_gradients(self.runtime)
            summary = gradient_summary(grads, len(self.runtime.trainable),
                                       self.nonfinite_grads != NonFinitePolicy.IGNORE, self._float64_state)
            return None, grads, summary
        except Exception as err:  # noqa: BLE001 - re-raised after the agreement, on every rank
            return err, {}, None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_was_init = False
        error, grads, summary = self._local_phase()
        flags = gradient_flags(self.runtime.comm, len(self.runtime.trainable), summary, error is not None,
                               stable_digest([_settings_of(g, dynamic=True) for g in self.param_groups]))
        active = self._decide(error, flags)
        self.last_step_skipped = not active   # skip policy, init step, or no gradient on any parameter
        if not active:
            return loss
        for rec in self.runtime.trainable:   # zero stand-ins keep message sizes static
            if rec.plan_index not in grads:
                grads[cast(int, rec.plan_index)] = torch.zeros_like(rec.local())
        decisions = [self.root_schedule.decide(gi, g) for gi, g in enumerate(self.param_groups)]
        rules = [update_rule(g) for g in self.param_groups]
        plan = [self._group_step(g, d, rule) for g, d, (rule, _) in zip(self.param_groups, decisions, rules)]
        self.averaging.start_z(self.param_groups)
        self.executor.step(grads, active, plan)
        for gi, (group, decision, (_, lr_sum)) in enumerate(zip(self.param_groups, decisions, rules)):
            group["step"] += 1
            if lr_sum is not None:
                group[LR_SUM_KEY] = lr_sum
            self.root_schedule.stepped(gi, group["step"], decision)
        if any(g.amortized for g in plan):
            self._raise_on_exhausted_roots()
        return loss

    def _decide(self, error: Optional[Exception], flags: Any) -> set[int]:
        """The agreed policy: raise, skip (empty set), the init step (empty set) or the active parameters."""
        names = [rec.name for rec in self.runtime.trainable]
        if error is not None:
            raise error
        if flags.failed_ranks:
            raise RankFailureError(f"the step failed its local checks on rank(s) {flags.failed_ranks} (see the error "
                                   "raised there); nothing was updated on any rank.")
        if not flags.settings_agree:
            raise ValueError("the param-group hyperparameters (lr, betas, epsilon, weight_decay, momentum, "
                             "precondition_frequency, ...) or step counts differ between ranks; set them the same "
                             "way on every rank. Nothing was updated.")
        world = self.runtime.comm.world_size
        partial = [n for n, h in zip(names, flags.holders) if 0 < h < world]
        if partial:
            raise RuntimeError(f"parameters {partial} have a gradient on some ranks but not on others; every rank "
                               "must produce the same set of gradients.")
        bad = [n for n, a, b in zip(names, flags.nonfinite, flags.overflow) if a or b]
        if bad:
            if self.nonfinite_grads == NonFinitePolicy.RAISE:
                over = [n for n, b in zip(names, flags.overflow) if b]
                raise NonFiniteGradientError(
                    f"non-finite gradient in parameters {bad}"
                    + (f" ({over} overflow: finite entries whose squared norm is not representable, so the "
                       "statistics would become inf)" if over else " (NaN/Inf)")
                    + "; nothing was updated. Pass nonfinite_grads='skip' to skip such steps instead.")
            return set()
        if all(float(g["lr"]) == 0 for g in self.param_groups) and not any(flags.nonzero):
            # the state-initialisation step (zero lr, zero grads, as torch's get_state_dict and
            # torchtitan issue it): state already exists, so it must change nothing
            self.last_step_was_init = True
            return set()
        return {k for k, h in enumerate(flags.holders) if h == world}

    @staticmethod
    def _group_step(group: dict[str, Any], decision: Decision, rule: UpdateRule) -> GroupStep:
        """The schedule and settings of a group for its next step; the same on every rank."""
        l2 = WeightDecayType.parse(group["weight_decay_type"]) == WeightDecayType.L2
        return GroupStep(hyperparams=_hyperparams(group), amortized=decision.amortized,
                         precondition=decision.precondition, l2_weight_decay=group["weight_decay"] if l2 else 0.0,
                         update=rule)

    # ------------------------------------------------------------------ train / eval sequences

    def train(self) -> "ShardedShampoo":
        """Parameters of GPA / Schedule-Free groups back to the training sequence y (idempotent).

        Local to this rank (every rank converts its own shards; call it on every rank, like
        ``model.train()``). A no-op without iterate averaging: the parameters are the training
        sequence. Returns the optimizer.
        """
        self.averaging.switch(self.param_groups, train=True)
        return self

    def eval(self) -> "ShardedShampoo":
        """Parameters of GPA / Schedule-Free groups to the evaluation sequence x (idempotent).

        ``step()`` raises until :meth:`train` is called. Raises (changing nothing) when no group
        has ``iterate_averaging=GeneralizedPrimalAveraging(...)`` or ``ScheduleFree(...)``.
        """
        self.averaging.switch(self.param_groups, train=False)
        return self

    def _raise_on_exhausted_roots(self) -> None:
        """After a completed amortized step: raise on every rank if any owner hit the failure limit."""
        exhausted = [b for bucket in self.runtime.buckets for b in bucket.exhausted]
        limits = sorted({limit for bk in self.runtime.buckets
                         if bk.exhausted and (limit := bk.kind.failure_limit) is not None})
        for bucket in self.runtime.buckets:
            bucket.exhausted = []
        count = self.agreement.total(float(len(exhausted)))
        if count > 0:
            where = f"blocks {exhausted}" if exhausted else f"{int(count)} blocks owned by other ranks"
            raise RootFailureError(
                f"the inverse root / eigenbasis of {where} failed max_consecutive_root_failures={limits or '?'} "
                "times in a row (non-finite or non-convergent factors). This step was applied with the previous "
                "roots. Raise epsilon, lower the learning rate, or raise max_consecutive_root_failures.")

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """torch's protocol: the pre-hooks, the dict, then each post-hook (a returned dict replaces it).

        Local to this rank (no collective: it may be called on one rank only), so an edited param
        list raises here on the ranks that edited it.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self.membership.check(self.param_groups)
        state_dict = self.state_io.state_dict(self.param_groups, self.state)
        for gi, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            pending = self.root_schedule.pending_start(gi, group)
            if pending is not None:      # roots due at the next step: a resume must compute them too
                saved["start_preconditioning_step"] = pending
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            returned = post_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate everything on every rank, agree, then apply (a failure changes nothing anywhere).

        torch's hooks: the pre-hooks see a shallow copy of ``state_dict`` and a dict one returns is
        what is loaded (a pre-hook that raises fails the load on every rank, like a bad dict); the
        post-hooks run after a successful load.
        """
        error: Optional[Exception] = None
        staged = None
        try:
            state_dict = self._run_load_pre_hooks(state_dict)
            self.membership.check(self.param_groups)
            staged = self.state_io.prepare(self.param_groups, self.state, state_dict)
        except Exception as err:  # noqa: BLE001 - re-raised on this rank by the agreement
            error = err
        self.agreement.outcome(error, "load_state_dict")
        assert staged is not None
        staged.apply(self.param_groups)
        for gi, group in enumerate(self.param_groups):
            self.root_schedule.loaded(gi, group)
        self.agreement.same_everywhere(self._description([r.name for r in self.runtime.params],
                                                         [r.param for r in self.runtime.params]),
                                       "the optimizer configuration after load_state_dict")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _run_load_pre_hooks(self, state_dict: Any) -> Any:
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        return state_dict


def _hyperparams(group: dict[str, Any]) -> BucketHyperparams:
    return BucketHyperparams(beta1=group["betas"][0], beta2=group["betas"][1], epsilon=group["epsilon"],
                             use_bias_correction=group["use_bias_correction"],
                             elementwise=ElementwiseMode.parse(group["elementwise"]), beta3=group.get("beta3"))


def _bucket_config(group: dict[str, Any]) -> BucketConfig:
    """What of a group decides its buckets' state (structural: fixed after construction)."""
    return BucketConfig(preconditioner=group["preconditioner"], grafting=group["grafting"],
                        has_filtered_grad=group["betas"][0] > 0)


def _settings_of(group: dict[str, Any], dynamic: bool = False) -> dict[str, Any]:
    """A group's settings as plain values; ``dynamic``: only what may change between steps (+ the step)."""
    out = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in group.items()
           if k not in BOOKKEEPING_KEYS}
    if dynamic:
        for k in STRUCTURAL_SETTINGS:
            out.pop(k, None)
    return {k: repr(v) for k, v in out.items()}
