"""Stacked per-block optimizer state and the batched math of one step, for any preconditioner kind.

A :class:`BlockBucket` holds every owned block of one param group that shares a shape and
exponents. Its state is stored *stacked* (``[B, ...]``, one tensor per field the kind declares,
see :mod:`.kinds`), so a step is a handful of batched calls for the whole bucket, never a Python
loop over blocks. Per-block state entries in ``optimizer.state`` are views into these stacks.

One step (:meth:`BlockBucket.step_blocks`), per block, for the kind's statistics ``S`` and direction:
  zero the gradient rows of inactive blocks; t <- t + active
  kind.update(S, G)                       (e.g. F_i <- beta2 F_i + w G_(i) G_(i)^T)
  kind.refresh(S)  on amortized steps     (e.g. R_i = (F_i / (1 - beta2^t) + eps I)^(-e_i))
  kind.after_refresh(S, G)
  M <- beta1 M + (1 - beta1) G,  M_hat = M / (1 - beta1^t);  grafting state and direction
      (with a separate beta3: M_hat = (beta3 M_old + (1 - beta3) G) / (1 - beta3 beta1^(t-1)))
  P = kind.direction(M_hat) rescaled per block to the grafting direction's norm (or the grafting
      direction itself before preconditioning starts; without grafting the kind's direction from its
      initial state); P = 0 for inactive blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import (STATEFUL_GRAFTING_TYPES, AdaGradGrafting, AdamGrafting, ElementwiseMode, GraftingConfig,
                      PreconditionerConfig)
from ..planning.blocking import Block
from ..profiling import FACTOR_UPDATE, GRAFT, PRECONDITION, REFRESH, phase
from .elementwise import block_norms, moments_and_graft, rescale, update_moments_
from .kinds import make_kind
from .kinds.protocol import BucketHyperparams, BucketStep, StateField, StepContext, per_block
from .kinds.matrices import read_matrices
from .kinds.state import allocate, block_fields
from .low_precision import block_salt, rounding_seeds, stochastic_round_
from .refresh import RefreshCounts
from .workspace import Workspace


@dataclass(frozen=True)
class BucketConfig:
    """What decides a bucket's state layout: fixed at construction (the group's structural settings)."""

    preconditioner: PreconditionerConfig
    grafting: Optional[GraftingConfig]
    has_filtered_grad: bool          # beta1 > 0


#: Fields stored in ``moment_storage_dtype`` (the kinds' own fields have their own storage dtypes).
MOMENT_FIELDS = ("filtered_grad", "grafting")
#: Stochastic-rounding stream of the first moment field (factors use streams 0 .. order - 1).
MOMENT_STREAM = 64


class RootFailureError(RuntimeError):
    """Raised when a block's inverse root failed too many consecutive times."""


class BlockBucket:
    """Stacked state and batched step for blocks of equal shape/exponents in one param group."""

    def __init__(self, blocks: list[Block], config: BucketConfig, device: torch.device,
                 workspace: Optional[Workspace] = None) -> None:
        self.blocks = blocks
        self.shape = blocks[0].shape
        self.exponents = blocks[0].exponents
        self.config = config
        self.device = device
        self.kind = make_kind(config.preconditioner, self.shape, self.exponents)
        self.dtype = self.kind.compute_dtype   # the math (gathered gradients, moments, refresh) runs in this dtype
        self.fields: dict[str, StateField] = {f.name: f for f in block_fields(self.kind, config.grafting,
                                                                              config.has_filtered_grad)}
        self.state = allocate(list(self.fields.values()), len(blocks), device)
        self.workspace = workspace if workspace is not None else Workspace(device)
        # stochastic rounding of low-precision factors: a stable number per block, on the device
        # (made here; dropped by release_buffers() and remade at the next step)
        self._salts: Optional[torch.Tensor] = self._make_salts()
        self.refresh_counts = RefreshCounts()
        self.exhausted: list[str] = []  # blocks that reached the kind's failure limit this step

    def _make_salts(self) -> torch.Tensor:
        return torch.tensor([block_salt(b.block_id) for b in self.blocks], dtype=torch.int64, device=self.device)

    @property
    def salts(self) -> torch.Tensor:
        """Per-block stable numbers of stochastic rounding (int64 ``[B]``, kept between steps unless released)."""
        if self._salts is None:
            self._salts = self._make_salts()
        return self._salts

    @property
    def packed_dims(self) -> set[int]:
        """Sizes ``d`` of this bucket's packed ``(d, d)`` fields: the packing indices its math needs."""
        return {f.shape[0] for f in self.fields.values() if f.packed}

    def release_buffers(self) -> None:
        """Drop what the bucket keeps besides its state (the salts; the shared workspace is the executor's)."""
        self._salts = None

    @property
    def step(self) -> torch.Tensor:
        """Per-block step counters (int64 ``[B]``)."""
        return self.state["step"]

    @property
    def failures(self) -> torch.Tensor:
        """Per-block consecutive failed refreshes (int64 ``[B]``)."""
        return self.state["root_failures"]

    def matrices(self, name: str) -> torch.Tensor:
        """A ``(d, d)`` field of every block as ``[B, d, d]`` matrices (a copy; for tools and tests)."""
        return read_matrices(self.state[name], self.fields[name], slice(0, len(self.blocks)),
                             Workspace(self.device, keep=False)).clone()

    def state_views(self, j: int) -> dict[str, torch.Tensor]:
        """The state of block ``j`` as views into the stacks (what ``optimizer.state`` shows)."""
        return {name: stack[j] for name, stack in self.state.items()}

    # ------------------------------------------------------------------ the step

    def step_blocks(self, G: torch.Tensor, step: BucketStep) -> torch.Tensor:
        """Advance the state with block gradients ``G: [B, *shape]`` (edited in place); return directions.

        ``step.active`` (bool ``[B]`` on the device) selects the blocks that have a gradient; the others'
        state stays bit-identical and their direction is zero. The mask is never read on the host
        outside a refresh. The result is ``G`` itself or a new tensor, never a state tensor, so the
        caller may edit it in place.
        """
        active = step.active
        if active is None:
            self.step.add_(1)
        else:
            # first: a NaN/Inf in an inactive block's rows must not reach any state through 0 * NaN
            G.masked_fill_(~per_block(active, G.ndim), 0)
            self.step.add_(active.to(self.step.dtype))
        ctx = StepContext(step.hyperparams, step.refresh_roots, active, self.step, self.dtype, self.workspace,
                          self.refresh_counts, self.salts)
        kind, state = self.kind, self.state
        with phase(FACTOR_UPDATE):
            kind.update(state, G, ctx)
        if step.refresh_roots:
            with phase(REFRESH):
                ok = kind.refresh(state, ctx)
                if ok is not None:
                    self._count_failures(ok, active)
        with phase(PRECONDITION):
            kind.after_refresh(state, G, ctx)
        # without grafting there is no other direction: the kind's own is used from step 1, from its initial
        # state (as the reference does; e.g. SOAP is Adam in the standard basis until its first refresh)
        precondition = step.precondition or (self.config.grafting is None and not kind.starts_as_identity)
        moments = self._widened_moments()
        P = self._direction(G, ctx, precondition and kind.preconditions, moments)
        self._store_moments(moments)
        if active is not None:
            P.masked_fill_(~per_block(active, P.ndim), 0)
        return P

    def _widened_moments(self) -> dict[str, torch.Tensor]:
        """The filtered gradient and grafting state in the math dtype: the state tensors themselves, or fp32
        copies of low-precision storage (``moment_storage_dtype``; transient, one step)."""
        out = {}
        for name in MOMENT_FIELDS:
            stored = self.state.get(name)
            if stored is not None:
                out[name] = stored if stored.dtype == self.dtype else stored.to(self.dtype)
        return out

    def _store_moments(self, moments: dict[str, torch.Tensor]) -> None:
        """Write widened moments back to their low-precision storage, bfloat16 stochastically rounded (unbiased:
        small EMA increments survive in expectation). An inactive block's value came from the storage and is
        exactly representable, so it stays bit-identical. The copies are used as scratch."""
        for k, (name, wide) in enumerate(moments.items()):
            stored = self.state[name]
            if wide is not stored:
                stochastic_round_(stored, wide, rounding_seeds(self.salts, self.step, MOMENT_STREAM + k))

    def _direction(self, G: torch.Tensor, ctx: StepContext, preconditioned: bool,
                   moments: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = ctx.hp
        # M_hat = M / bc1 is never materialised: the per-block scale 1/bc1 is folded into the
        # grafting denominator and into the final per-block rescale (the preconditioner is linear in M).
        Mstate = moments.get("filtered_grad")
        M = Mstate if Mstate is not None else G
        bc1 = None
        if Mstate is not None and hp.use_bias_correction:
            bc1 = per_block(_first_moment_correction(ctx), G.ndim)
        with phase(GRAFT):
            graft, graft_norm = self._moments_and_graft(G, M, bc1, ctx, moments, direction=not preconditioned)
        if not preconditioned:
            assert graft is not None
            return graft
        if Mstate is not None and _separate_beta3(hp):
            M = G        # the moments left the beta3-filtered gradient in G
        # G is dead from here on (statistics and moments are updated): the direction is written into it
        if bc1 is not None and not self.kind.linear:
            M, bc1 = torch.div(M, bc1, out=G), None      # a kind that normalises its input needs M_hat itself
            if ctx.active is not None:       # a block never stepped has bc1 = 0: no NaN into an SVD
                M.masked_fill_(~per_block(ctx.active, M.ndim), 0)
        with phase(PRECONDITION):
            P = self.kind.direction({**self.state, **moments}, M, ctx, out=G)
        if self.config.grafting is not None:
            assert graft_norm is not None            # computed whenever there is a grafting method
            with phase(GRAFT):
                return rescale(P, graft_norm, out=G, compiled=hp.elementwise is ElementwiseMode.COMPILE)
        if bc1 is not None:
            return torch.div(P, bc1, out=G)
        return P if P.dtype == self.dtype else G.copy_(P)

    def _count_failures(self, ok: torch.Tensor, active: Optional[torch.Tensor]) -> None:
        """Failed refreshes in a row per block (reset by a success; inactive blocks keep theirs)."""
        f = self.failures
        new = torch.where(ok, torch.zeros_like(f), f + 1)
        f.copy_(new if active is None else torch.where(active, new, f))
        limit = self.kind.failure_limit
        if limit is not None and bool((f >= limit).any()):
            # recorded, not raised: the optimizer finishes the step on every rank, then raises
            self.exhausted.extend(b.block_id for b, n in zip(self.blocks, f.tolist()) if n >= limit)

    def _moments_and_graft(self, G: torch.Tensor, M: torch.Tensor, bc1: Optional[torch.Tensor], ctx: StepContext,
                           moments: dict[str, torch.Tensor],
                           direction: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Update the filtered gradient and the grafting state; the grafting direction ``M_hat /
        (sqrt(V_hat) + eps)`` (``M_hat`` for SGD/no grafting) if ``direction``, and its per-block norm.

        The denominator is written as ``sqrt(V) * a + c`` with per-block ``a = bc1 / sqrt(bc2)``,
        ``c = eps * bc1`` (``M_hat = M / bc1``). The direction never is a state tensor (the caller edits
        it in place): it lives in ``G``'s memory or is new.
        """
        hp, g = ctx.hp, self.config.grafting
        Mstate = moments.get("filtered_grad")
        beta3 = hp.beta3 if Mstate is not None and _separate_beta3(hp) else None
        if beta3 is not None:
            M = G         # where update_moments_ leaves beta3 M_old + (1 - beta3) G
        m_weight: Optional[torch.Tensor] = None
        if ctx.active is not None:
            _, w1 = ctx.coefficients(hp.beta1, 1.0 - hp.beta1)
            assert isinstance(w1, torch.Tensor)      # a masked step's coefficients are per-block tensors
            m_weight = per_block(w1, G.ndim)
        if not isinstance(g, STATEFUL_GRAFTING_TYPES):
            update_moments_(G, Mstate, None, hp.beta1, 1.0, 1.0, m_weight, beta3)
            # the norm only rescales a preconditioned direction: not needed when the direction is the graft
            norm = None if g is None or direction else block_norms(M) if bc1 is None else block_norms(M) / bc1.flatten()
            if not direction:
                return None, norm
            if bc1 is not None:
                return torch.div(M, bc1, out=G) if M is not G else G.div_(bc1), norm
            return (G.copy_(M) if M is not G else G), norm
        V = moments["grafting"]
        v_beta, v_weight = (1.0, 1.0) if isinstance(g, AdaGradGrafting) else (g.beta2, 1.0 - g.beta2)
        vb = per_block(ctx.coefficients(v_beta, v_weight)[0], G.ndim) if ctx.active is not None else v_beta
        one = torch.ones((), dtype=V.dtype, device=V.device)
        a = one.expand(self.step.shape[0]) if bc1 is None else bc1.flatten()
        if isinstance(g, AdamGrafting):
            a = a / ctx.bias_correction(g.beta2, always=True).sqrt()
        c = g.epsilon * (one.expand(a.shape) if bc1 is None else bc1.flatten())
        return moments_and_graft(G, Mstate, V, hp.beta1, vb, v_weight, per_block(a, G.ndim), per_block(c, G.ndim),
                                 direction, compiled=hp.elementwise is ElementwiseMode.COMPILE, norm=not direction,
                                 m_weight=m_weight, beta3=beta3)


def _separate_beta3(hp: BucketHyperparams) -> bool:
    """Whether the direction uses its own filtered gradient ``beta3 M_old + (1 - beta3) G`` (``beta3 != beta1``)."""
    return hp.beta3 is not None and hp.beta3 != hp.beta1


def _first_moment_correction(ctx: StepContext) -> torch.Tensor:
    """``1 - beta3 beta1^(t - 1)`` per block (the reference's; ``1 - beta1^t`` when ``beta3 == beta1``)."""
    hp = ctx.hp
    if not _separate_beta3(hp):
        return ctx.bias_correction(hp.beta1)
    assert hp.beta3 is not None
    return (1.0 - hp.beta3 * torch.pow(hp.beta1, (ctx.step - 1).to(torch.float64))).to(ctx.dtype)


def bucket_key(group_index: int, block: Block) -> tuple:
    """Blocks with equal keys are stacked into one bucket."""
    return (group_index, block.shape, block.exponents)


__all__ = ["BlockBucket", "BucketConfig", "BucketHyperparams", "BucketStep", "RootFailureError", "bucket_key"]
