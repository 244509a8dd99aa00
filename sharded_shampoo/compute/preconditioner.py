"""Stacked per-block optimizer state and the batched math of one step.

A :class:`BlockBucket` holds every owned block of one param group that shares a shape and
exponents. Its state is stored *stacked* (``[B, ...]``), so factor updates, preconditioning and
the amortized roots are a handful of batched calls for the whole bucket, never a Python loop
over blocks. Per-block state entries in ``optimizer.state`` are views into these stacks.

Math (per block, step t of that block, see docs/math.md):
  F_i <- beta2 F_i + w G_(i) G_(i)^T          (w = 1 - beta2, or 1 when beta2 == 1)
  M   <- beta1 M + (1 - beta1) G,  M_hat = M / (1 - beta1^t)
  every precondition_frequency steps: R_i = (F_i / (1 - beta2^t) + eps I)^(-e_i)
  P   = M_hat x_1 R_1 ... x_k R_k, rescaled per block to the grafting direction's norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

import torch

from ..planning.blocking import Block
from ..config import (STATEFUL_GRAFTING_TYPES, AdaGradGrafting, AdamGrafting, EigenvalueCorrectedShampoo,
                      ElementwiseMode, GraftingConfig, PreconditionerConfig)
from .elementwise import block_norms, moments_and_graft, rescale, update_moments_
from .kron import apply_kronecker, gram, gram_scratch_numel, gram_update_, unfold
from .lowp import block_salt, chunk_slices, ema_round_, rounding_seed
from .refresh import RefreshCounts, WarmBackoff, permute_along, refresh_factor


@dataclass(frozen=True)
class BucketHyperparams:
    """The per-group settings a bucket's math needs on every step (floats may change per step)."""

    beta1: float
    beta2: float
    epsilon: float
    use_bias_correction: bool
    grafting: Optional[GraftingConfig]
    preconditioner: PreconditionerConfig
    elementwise: ElementwiseMode = ElementwiseMode.EAGER


class RootFailureError(RuntimeError):
    """Raised when a block's inverse root failed too many consecutive times."""


class BlockBucket:
    """Stacked state and batched step for blocks of equal shape/exponents in one param group."""

    def __init__(self, blocks: list[Block], hp: BucketHyperparams, device: torch.device) -> None:
        self.blocks = blocks
        self.shape = blocks[0].shape
        self.exponents = blocks[0].exponents
        self.hp = hp
        self.device = device
        dtype = hp.preconditioner.factor_dtype
        self.dtype = dtype          # the math (gathered gradients, moments, refresh) runs in this dtype
        factor_storage, root_storage = hp.preconditioner.storage_dtypes()
        B = len(blocks)
        self.factor_dims = [i for i, e in enumerate(self.exponents) if e != 0]
        self.is_eigen = isinstance(hp.preconditioner, EigenvalueCorrectedShampoo)
        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.factors = [torch.zeros(B, self.shape[i], self.shape[i], dtype=factor_storage, device=device)
                        for i in self.factor_dims]
        # inverse roots and eigenbases both start as the identity (as in the reference), so a block
        # whose first root is not available yet preconditions with the identity
        self.roots = [torch.eye(self.shape[i], dtype=root_storage, device=device).repeat(B, 1, 1)
                      for i in self.factor_dims]
        self.salts = [block_salt(b.block_id) for b in blocks]   # stochastic rounding of low-precision factors
        self.refresh_counts = RefreshCounts()
        self.warm_backoff = [WarmBackoff(B) for _ in self.factor_dims]
        self._scratch: dict[torch.dtype, torch.Tensor] = {}     # CPU only, see _workspace
        self.eigenvalues = zeros(B, *self.shape) if self.is_eigen and self.factor_dims else None
        g = hp.grafting
        self.grafting_state = zeros(B, *self.shape) if isinstance(g, STATEFUL_GRAFTING_TYPES) else None
        self.filtered_grad = zeros(B, *self.shape) if hp.beta1 > 0 else None
        self.step = torch.zeros(B, dtype=torch.int64, device=device)
        self.failures = torch.zeros(B, dtype=torch.int64, device=device)
        self._active_index: Optional[list[int]] = None  # bucket rows of the stacks during a masked step
        self.exhausted: list[str] = []  # blocks that reached max_consecutive_root_failures this step

    # ------------------------------------------------------------------ state views

    def state_views(self, j: int) -> dict[str, torch.Tensor]:
        """The state of block ``j`` as views into the stacks (what ``optimizer.state`` shows)."""
        out: dict[str, torch.Tensor] = {"step": self.step[j], "root_failures": self.failures[j]}
        for n, i in enumerate(self.factor_dims):
            out[f"factor_{i}"] = self.factors[n][j]
            out[f"{'eigenbasis' if self.is_eigen else 'root'}_{i}"] = self.roots[n][j]
        if self.eigenvalues is not None:
            out["eigenvalues"] = self.eigenvalues[j]
        if self.grafting_state is not None:
            out["grafting"] = self.grafting_state[j]
        if self.filtered_grad is not None:
            out["filtered_grad"] = self.filtered_grad[j]
        return out

    def _stacks(self) -> list[Optional[torch.Tensor]]:
        return [*self.factors, *self.roots, self.eigenvalues, self.grafting_state, self.filtered_grad,
                self.step, self.failures]

    def _set_stacks(self, stacks: list[Optional[torch.Tensor]]) -> None:
        n = len(self.factors)
        self.factors = cast(list[torch.Tensor], stacks[:n])
        self.roots = cast(list[torch.Tensor], stacks[n:2 * n])
        (self.eigenvalues, self.grafting_state, self.filtered_grad) = stacks[2 * n:2 * n + 3]
        self.step, self.failures = cast(list[torch.Tensor], stacks[2 * n + 3:])

    # ------------------------------------------------------------------ the step

    def step_blocks(self, G: torch.Tensor, active: Optional[torch.Tensor],
                    amortized: bool, precondition: bool) -> torch.Tensor:
        """Advance the state of the bucket with block gradients ``G: [B, *shape]``; return directions.

        ``active`` (bool ``[B]``) selects blocks that have a gradient this step; inactive blocks'
        state is untouched and their direction is zero. The result is ``G`` itself or a new tensor,
        never a state tensor, so the caller may edit it in place.
        """
        if active is None or bool(active.all()):
            return self._step_all(G, amortized, precondition)
        return self._step_masked(G, active, amortized, precondition)

    def _step_masked(self, G: torch.Tensor, active: torch.Tensor, amortized: bool,
                     precondition: bool) -> torch.Tensor:
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            return torch.zeros_like(G)
        full = self._stacks()
        self._set_stacks([None if s is None else s.index_select(0, idx) for s in full])
        self._active_index = idx.tolist()
        try:
            P_sub = self._step_all(G.index_select(0, idx), amortized, precondition)
            sub = self._stacks()
        finally:
            self._set_stacks(full)
            self._active_index = None
        for dst, src in zip(full, sub):
            if dst is not None:
                dst.index_copy_(0, idx, cast(torch.Tensor, src))    # the same stacks exist in both
        P = torch.zeros_like(G)
        P.index_copy_(0, idx, P_sub)
        return P

    def _bias_correction(self, beta: float, always: bool = False) -> torch.Tensor:
        """``1 - beta^t`` per block, shaped to broadcast (ones without bias correction or beta = 1).

        ``always``: ignore ``use_bias_correction`` (Adam grafting is always bias-corrected).
        """
        shape = (-1,) + (1,) * len(self.shape)
        if not (self.hp.use_bias_correction or always) or beta >= 1.0:
            return torch.ones(self.step.shape, dtype=self.dtype, device=self.device).view(shape)
        return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=self.device),
                                self.step.to(torch.float64))).to(self.dtype).view(shape)

    def _step_all(self, G: torch.Tensor, amortized: bool, precondition: bool) -> torch.Tensor:
        hp = self.hp
        self.step.add_(1)
        self._update_factors(G)
        bc2 = self._bias_correction(hp.beta2)
        if amortized and self.factor_dims:
            self._amortized(bc2)
        if self.is_eigen and self.factor_dims:
            # D accumulates on every step, also before start_preconditioning_step: its bias
            # correction 1 - beta2^t counts every step of the block.
            self._update_corrected_eigenvalues(G)
        # M_hat = M / bc1 is never materialised: the per-block scale 1/bc1 is folded into the
        # grafting denominator and into the final per-block rescale (the preconditioner is linear in M).
        M = self.filtered_grad if self.filtered_grad is not None else G
        bc1 = self._bias_correction(hp.beta1) if self.filtered_grad is not None and hp.use_bias_correction else None
        preconditioned = precondition and bool(self.factor_dims)
        graft, graft_norm = self._moments_and_graft(G, M, bc1, direction=not preconditioned)
        if not preconditioned:
            assert graft is not None                 # direction=True returns it
            return graft
        # G is dead from here on (factors, D and moments are updated): the direction is written into it
        if self.is_eigen:
            P = self._eigen_corrected_direction(M, bc2, out=G)
        else:
            P = apply_kronecker(M, self._kron_list(self.roots), out=G,
                                scratch=self._workspace(M.numel(), self.roots[0].dtype))
        if hp.grafting is not None:
            assert graft_norm is not None            # computed whenever there is a grafting method
            return rescale(P, graft_norm, out=G, compiled=hp.elementwise is ElementwiseMode.COMPILE)
        if bc1 is not None:
            return torch.div(P, bc1, out=G)
        return P if P.dtype == self.dtype else G.copy_(P)

    def _workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor for intermediate products (never state; contents undefined).

        On CPU it is kept between steps and grows once: a fresh multi-MiB tensor costs page faults on
        every step there. On accelerators the caching allocator already reuses memory, so a new tensor
        is allocated per use and nothing stays resident between steps.
        """
        if self.device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=self.device)
        ws = self._scratch.get(dtype)
        if ws is None or ws.numel() < numel:
            ws = self._scratch[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
        return ws

    def _kron_list(self, mats: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        out: list[Optional[torch.Tensor]] = [None] * len(self.shape)
        for m, i in zip(mats, self.factor_dims):
            out[i] = m
        return out

    # ------------------------------------------------------------------ per-step pieces

    def _update_factors(self, G: torch.Tensor) -> None:
        """``F_i <- beta2 F_i + w G_(i) G_(i)^T`` (``w = 1 - beta2``, or 1 when ``beta2 == 1``)."""
        beta2 = self.hp.beta2
        w = 1.0 - beta2 if beta2 < 1.0 else 1.0
        for n, i in enumerate(self.factor_dims):
            X = unfold(G, i)
            F = self.factors[n]
            if F.dtype == self.dtype:
                scratch = self._workspace(gram_scratch_numel(F.shape[0], F.shape[-1]), F.dtype)
                gram_update_(F, X, beta=beta2, alpha=w, scratch=scratch)
            else:
                self._update_low_precision_factor(n, X, beta2, w)

    def _update_low_precision_factor(self, n: int, X: torch.Tensor, beta2: float, w: float) -> None:
        """The same EMA for a factor stored in a narrower dtype: GEMM with operands in the storage dtype
        (fp32 accumulation inside the GEMM), the EMA in ``self.dtype`` one chunk of blocks at a time,
        then stochastic rounding back into storage (see ``lowp.py``)."""
        F = self.factors[n]
        rows = self._active_index if self._active_index is not None else range(len(self.blocks))
        seeds = [rounding_seed(self.salts[r], t, n) for r, t in zip(rows, self.step.tolist())]
        d = F.shape[-1]
        chunks = chunk_slices(F.shape[0], d * d * 4)
        scratch = self._workspace(2 * d * d * (chunks[0].stop - chunks[0].start), torch.float32)
        for s in chunks:
            ema_round_(F[s], gram(X[s], F.dtype), beta2, w, seeds[s], scratch)

    def _moments_and_graft(self, G: torch.Tensor, M: torch.Tensor, bc1: Optional[torch.Tensor],
                           direction: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Update the filtered gradient and the grafting state; the grafting direction ``M_hat /
        (sqrt(V_hat) + eps)`` (``M_hat`` for SGD/no grafting) if ``direction``, and its per-block norm.

        The denominator is written as ``sqrt(V) * a + c`` with per-block ``a = bc1 / sqrt(bc2)``,
        ``c = eps * bc1`` (``M_hat = M / bc1``). The direction never is a state tensor (the caller edits
        it in place): it lives in ``G``'s memory or is new.
        """
        hp, g = self.hp, self.hp.grafting
        Mstate = self.filtered_grad
        if not isinstance(g, STATEFUL_GRAFTING_TYPES):
            update_moments_(G, Mstate, None, hp.beta1, 1.0, 1.0)
            # the norm only rescales a preconditioned direction: not needed when the direction is the graft
            norm = None if g is None or direction else block_norms(M) if bc1 is None else block_norms(M) / bc1.flatten()
            if not direction:
                return None, norm
            if bc1 is not None:
                return torch.div(M, bc1, out=G) if M is not G else G.div_(bc1), norm
            return (G.copy_(M) if M is not G else G), norm
        V = self.grafting_state
        assert V is not None                         # stateful grafting (the caller checked)
        v_beta, v_weight = (1.0, 1.0) if isinstance(g, AdaGradGrafting) else (g.beta2, 1.0 - g.beta2)
        one = torch.ones((), dtype=V.dtype, device=V.device)
        a = one.expand(self.step.shape[0]) if bc1 is None else bc1.flatten()
        if isinstance(g, AdamGrafting):
            a = a / self._bias_correction(g.beta2, always=True).sqrt().flatten()
        c = g.epsilon * (one.expand(a.shape) if bc1 is None else bc1.flatten())
        shape = (-1,) + (1,) * len(self.shape)
        return moments_and_graft(G, Mstate, V, hp.beta1, v_beta, v_weight, a.reshape(shape), c.reshape(shape), direction,
                                 compiled=hp.elementwise is ElementwiseMode.COMPILE, norm=not direction)

    # ------------------------------------------------------------------ amortized refresh

    def _amortized(self, bc2: torch.Tensor) -> None:
        hp = self.hp
        # sized by the (possibly masked, see step_blocks) stacks, not by the whole bucket
        all_ok = torch.ones(self.failures.shape[0], dtype=torch.bool, device=self.device)
        rows = self._active_index if self._active_index is not None else list(range(len(self.blocks)))
        for n, i in enumerate(self.factor_dims):
            F_hat = self.factors[n].to(self.dtype) / bc2.view(-1, 1, 1)
            attempted = self.warm_backoff[n].attempt(rows)
            res = refresh_factor(F_hat, self.roots[n], self.exponents[i], hp.epsilon, hp.preconditioner,
                                 self.refresh_counts, torch.tensor(attempted, device=self.device))
            if res.fell_back is not None:
                self.warm_backoff[n].record(rows, attempted, res.fell_back.tolist())
            if res.permutation is not None and self.eigenvalues is not None:
                keep = torch.arange(res.permutation.shape[1], device=self.device).expand_as(res.permutation)
                perm = torch.where(res.ok[:, None], res.permutation, keep)
                # in place: optimizer.state holds views of this stack
                self.eigenvalues.copy_(permute_along(self.eigenvalues, i, perm))
            self.roots[n].copy_(torch.where(res.ok.view(-1, 1, 1), res.matrices.to(self.roots[n].dtype),
                                            self.roots[n]))
            all_ok &= res.ok
        self.failures.copy_(torch.where(all_ok, torch.zeros_like(self.failures), self.failures + 1))
        limit = hp.preconditioner.max_consecutive_root_failures
        if bool((self.failures >= limit).any()):
            # recorded, not raised: the optimizer finishes the step on every rank, then raises
            self.exhausted.extend(self.blocks[r].block_id for r, f in zip(rows, self.failures.tolist()) if f >= limit)

    # ------------------------------------------------------------------ eigenvalue-corrected mode

    def _update_corrected_eigenvalues(self, G: torch.Tensor) -> None:
        """D <- beta2 D + (1 - beta2) (G rotated into the current eigenbasis)^2 (sum when beta2 == 1)."""
        G_rot = apply_kronecker(G, self._kron_list(self.roots), transpose=True,
                                scratch=self._workspace(G.numel(), self.roots[0].dtype))
        beta2 = self.hp.beta2
        D = self.eigenvalues
        assert D is not None                         # eigenvalue-corrected buckets have it
        if beta2 < 1.0:
            D.mul_(beta2).addcmul_(G_rot, G_rot, value=1.0 - beta2)
        else:
            D.addcmul_(G_rot, G_rot)

    def _eigen_corrected_direction(self, M: torch.Tensor, bc2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Direction for the un-bias-corrected ``M`` (the caller applies ``1 / bc1``)."""
        hp = self.hp
        Qs = self._kron_list(self.roots)
        exponent = next(e for e in self.exponents if e != 0)
        scratch = self._workspace(M.numel(), self.roots[0].dtype)
        M_rot = apply_kronecker(M, Qs, transpose=True, scratch=scratch).to(self.dtype)
        # the root before epsilon, as in the reference (and torch Adam): (D_hat^e + eps)
        assert self.eigenvalues is not None
        denom = (self.eigenvalues / bc2).pow_(exponent).add_(hp.epsilon)
        return apply_kronecker(M_rot.div_(denom), Qs, out=out, scratch=scratch)


def bucket_key(group_index: int, block: Block) -> tuple:
    """Blocks with equal keys are stacked into one bucket."""
    return (group_index, block.shape, block.exponents)

