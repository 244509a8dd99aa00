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
from .profiling import AGREE, phase
from .runtime.agreement import Agreement, FlagsAgreement, stable_digest
from .runtime.averaging import IterateAveraging, primal_averaging_of, update_rule
from .runtime.deferred import PendingStep
from .runtime.executor import GroupStep, StepExecutor
from .runtime.flags import FlagLayout
from .runtime.gradients import GradientSummarizer, GradientSummary, local_gradients
from .runtime.host_transfer import HostMirror, to_device
from .runtime.policy import NonFiniteGradientError, StepDecision, StepOutcome, device_masks
from .runtime.placements import local_tensor, resolve_mesh
from .runtime.records import CommContext, RankRuntime, build_runtime, param_records
from .runtime.routing import block_waves
from .runtime.state_io import StateIO
from .update_options import LR_SUM_KEY, resolve_group, resolve_weight_decay_type

__all__ = ["NonFiniteGradientError", "ShardedShampoo"]


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
        self._last_decision: Optional[StepDecision] = None
        self._pending: Optional[PendingStep] = None
        self._deferred_error: Optional[Exception] = None
        self._steps_called = 0
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
        float64_state = {cast(int, rec.plan_index) for rec in self.runtime.trainable
                         if self.param_groups[rec.group]["preconditioner"].factor_dtype == torch.float64}
        self.summarizer = GradientSummarizer(len(self.runtime.trainable),
                                             self.nonfinite_grads != NonFinitePolicy.IGNORE, float64_state, device)
        self.flag_layout = FlagLayout(len(self.runtime.trainable), comm.world_size)
        self._mirror = HostMirror(device)
        # what a rank whose local checks failed runs (all masked, no refresh): its own settings may be unusable
        self._fallback_plan = [self._group_step(g, Decision(refresh_roots=False, precondition=False, roots_computed=False),
                                                update_rule(g)[0]) for g in self.param_groups]
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

    def _local_phase(self) -> tuple[Optional[Exception], dict[int, torch.Tensor], Optional[GradientSummary], int]:
        """Everything this rank checks alone; a failure is reported, not raised, so all ranks agree first.

        Returns the failure, the local gradients, their device summary and the settings digest."""
        try:
            self.averaging.check_train_mode(self.param_groups)
            self._check_groups()
            grads = local_gradients(self.runtime)
            digest = stable_digest([_settings_of(g, dynamic=True) for g in self.param_groups])
            return None, grads, self.summarizer(grads), digest
        except Exception as err:  # noqa: BLE001 - re-raised after the agreement, on every rank
            return err, {}, None, 0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One step; see docs/user_guide.md ("When errors are reported") for what raises where.

        A steady step reads no device value on the host: the outcome (applied, skipped, init step,
        an error) is decided on the device and read at the next host-visible point (the next
        ``step()``, ``state_dict()``, ``load_state_dict()``, a checkpoint save or :meth:`check`). A
        step that refreshes roots reads it at once (it reads root failures on the host anyway)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check()
        comm = self.runtime.comm
        with phase(AGREE):
            error, grads, summary, digest = self._local_phase()
            if error is not None and comm.world_size == 1:
                raise error                # one process: nothing to stay in step with
            present = summary.present if summary is not None else (False,) * self.flag_layout.params
            head = to_device(self.flag_layout.host_part(present, error is not None, comm.rank, digest),
                             torch.float64, comm.device)
            rows = summary.rows if summary is not None else self.summarizer.empty
            agreed = FlagsAgreement(comm, torch.cat([head, rows]))
            plan, rules, decisions = self._schedule(error)
            all_lr_zero = error is None and all(_lr_is_zero(g["lr"]) for g in self.param_groups)
            active = device_masks(agreed.wait(), self.flag_layout, self.nonfinite_grads, all_lr_zero)
        for rec in self.runtime.trainable:   # zero stand-ins keep message sizes static
            if rec.plan_index not in grads:
                grads[cast(int, rec.plan_index)] = torch.zeros_like(rec.local())
        if error is None:
            self.averaging.start_z(self.param_groups)
        self.executor.step(grads, active, plan)
        self._steps_called += 1
        self._mirror.capture(agreed.wait())
        self._pending = PendingStep(self._steps_called, self.flag_layout, self._mirror, self.nonfinite_grads,
                                    all_lr_zero, PendingStep.counters(self.param_groups, self.root_schedule,
                                                                      LR_SUM_KEY), error)
        if error is None:          # as if applied; the next host-visible point undoes a step that was not
            for gi, (group, decision, (_, lr_sum)) in enumerate(zip(self.param_groups, decisions, rules)):
                group["step"] += 1
                if lr_sum is not None:
                    group[LR_SUM_KEY] = lr_sum
                self.root_schedule.stepped(gi, group["step"], decision)
        if any(g.refresh_roots for g in plan):
            self.check()           # a refresh step reads the host: its outcome at once
            self._raise_on_exhausted_roots()
        return loss

    def _schedule(self, error: Optional[Exception]) -> tuple[list[GroupStep], list[Any], list[Decision]]:
        """Each group's step (what the executor runs), update rule and root decision. A rank whose local
        checks failed runs the construction-time plan (all masked): its settings may be unusable."""
        if error is not None:
            return self._fallback_plan, [], []
        decisions = [self.root_schedule.decide(gi, g) for gi, g in enumerate(self.param_groups)]
        rules = [update_rule(g) for g in self.param_groups]
        plan = [self._group_step(g, d, rule) for g, d, (rule, _) in zip(self.param_groups, decisions, rules)]
        return plan, rules, decisions

    # ------------------------------------------------------------------ the host-visible point

    def _resolve(self) -> None:
        """Read the last step's outcome from host memory: fix the counters, keep its error for :meth:`check`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        decision, error = pending.resolve(self.param_groups, self.root_schedule, LR_SUM_KEY,
                                          [rec.name for rec in self.runtime.trainable])
        self._last_decision = decision
        if error is not None:
            self._deferred_error = error

    def check(self) -> None:
        """Raise the error of the last step, if it had one (on every rank, the same call).

        ``step()``, ``state_dict()``, ``load_state_dict()`` and checkpoint saves call it first; call it
        yourself to learn a step's outcome without taking another step. Reads host memory only (the
        flags were copied there asynchronously at the end of the step): not a device synchronisation
        beyond waiting for that copy."""
        self._resolve()
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error

    @property
    def last_step_outcome(self) -> Optional[StepOutcome]:
        """What the last step did (None before the first); reading it resolves the last step (see :meth:`check`)."""
        self._resolve()
        return None if self._last_decision is None else self._last_decision.outcome

    @property
    def last_step_skipped(self) -> bool:
        """The last step changed nothing (skip policy, an error, the init step, or no gradients)."""
        outcome = self.last_step_outcome
        return outcome is not None and outcome != StepOutcome.APPLIED

    @property
    def last_step_was_init(self) -> bool:
        """The last step was the zero-lr, zero-gradient state-initialisation step (it changed nothing)."""
        return self.last_step_outcome == StepOutcome.INIT_STEP

    @staticmethod
    def _group_step(group: dict[str, Any], decision: Decision, rule: UpdateRule) -> GroupStep:
        """The schedule and settings of a group for its next step; the same on every rank."""
        l2 = WeightDecayType.parse(group["weight_decay_type"]) == WeightDecayType.L2
        return GroupStep(hyperparams=_hyperparams(group), refresh_roots=decision.refresh_roots,
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
        list raises here on the ranks that edited it. A host-visible point: raises the last step's
        deferred error first (:meth:`check`).
        """
        self.check()
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
        self.check()
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


def _lr_is_zero(lr: Any) -> bool:
    """A group's lr is 0 (a tensor lr is read on the host here: see docs/user_guide.md)."""
    return float(lr) == 0


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
