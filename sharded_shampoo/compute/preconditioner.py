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
from typing import Optional

import torch

from ..planning.blocking import Block
from ..config import (STATEFUL_GRAFTING_TYPES, AdaGradGrafting, AdamGrafting, CoupledNewtonConfig,
                      EigenvalueCorrectedShampoo, GraftingConfig, PreconditionerConfig, SGDGrafting)
from .matrix_functions import eigenbasis, inverse_root_eigh, inverse_root_newton


@dataclass(frozen=True)
class BucketHyperparams:
    """The per-group settings a bucket's math needs on every step (floats may change per step)."""

    beta1: float
    beta2: float
    epsilon: float
    use_bias_correction: bool
    grafting: Optional[GraftingConfig]
    preconditioner: PreconditionerConfig


class RootFailureError(RuntimeError):
    """Raised when a block's inverse root failed too many consecutive times."""


def _unfold(X: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B, d_0, ..., d_{k-1}]`` -> ``[B, d_dim, rest]`` (mode-``dim`` unfolding, batched)."""
    if dim == 0:
        return X.reshape(X.shape[0], X.shape[1], -1)
    return X.movedim(dim + 1, 1).reshape(X.shape[0], X.shape[dim + 1], -1)


def apply_kronecker(X: torch.Tensor, mats: list[Optional[torch.Tensor]], transpose: bool = False) -> torch.Tensor:
    """``X x_1 A_1 ... x_k A_k`` for a stack ``X: [B, d_1..d_k]``, ``A_i: [B, d_i, d_i]`` or None.

    Each round contracts the leading dim with ``A`` (``A X`` along that dim, ``A^T X`` when
    ``transpose``) and moves it to the end in one ``bmm`` (``[B, d, rest]^T @ A^T -> [B, rest, d]``),
    so after k rounds the dims are back in their original order and no permute copy is needed.
    """
    B = X.shape[0]
    for A in mats:
        X3 = X.reshape(B, X.shape[1], -1)
        Y = X3.mT if A is None else torch.bmm(X3.mT, A if transpose else A.mT)
        X = Y.reshape(B, *X.shape[2:], X.shape[1])
    return X


class BlockBucket:
    """Stacked state and batched step for blocks of equal shape/exponents in one param group."""

    def __init__(self, blocks: list[Block], hp: BucketHyperparams, device: torch.device) -> None:
        self.blocks = blocks
        self.shape = blocks[0].shape
        self.exponents = blocks[0].exponents
        self.hp = hp
        self.device = device
        dtype = hp.preconditioner.factor_dtype
        self.dtype = dtype
        B = len(blocks)
        self.factor_dims = [i for i, e in enumerate(self.exponents) if e != 0]
        self.is_eigen = isinstance(hp.preconditioner, EigenvalueCorrectedShampoo)
        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.factors = [zeros(B, self.shape[i], self.shape[i]) for i in self.factor_dims]
        # inverse roots and eigenbases both start as the identity (as in the reference), so a block
        # whose first root is not available yet preconditions with the identity
        self.roots = [torch.eye(self.shape[i], dtype=dtype, device=device).repeat(B, 1, 1) for i in self.factor_dims]
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
        self.factors = list(stacks[:n])
        self.roots = list(stacks[n:2 * n])
        (self.eigenvalues, self.grafting_state, self.filtered_grad, self.step, self.failures) = stacks[2 * n:]

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
                dst.index_copy_(0, idx, src)
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
        beta2 = hp.beta2
        w = 1.0 - beta2 if beta2 < 1.0 else 1.0
        for F, i in zip(self.factors, self.factor_dims):
            X = _unfold(G, i)
            F.baddbmm_(X, X.mT, beta=beta2, alpha=w)
        bc2 = self._bias_correction(beta2)
        if amortized and self.factor_dims:
            self._amortized(bc2)
        if self.is_eigen and self.factor_dims:
            # D accumulates on every step, also before start_preconditioning_step: its bias
            # correction 1 - beta2^t counts every step of the block.
            self._update_corrected_eigenvalues(G)

        # Filtered gradient. M_hat = M / bc1 is never materialised: the per-block scale 1/bc1 is
        # folded into the grafting denominator and into the final per-block rescale, saving
        # parameter-sized passes (the preconditioner is linear in M).
        if self.filtered_grad is not None:
            self.filtered_grad.lerp_(G, 1.0 - hp.beta1)
            M = self.filtered_grad
            bc1 = self._bias_correction(hp.beta1) if hp.use_bias_correction else None
        else:
            M, bc1 = G, None

        graft = self._grafting_direction(G, M, bc1)
        if not precondition or not self.factor_dims:
            return graft

        if self.is_eigen:
            P = self._eigen_corrected_direction(G, M, bc2)
        else:
            P = apply_kronecker(M, self._kron_list(self.roots))
        if hp.grafting is not None:
            # per-block rescale to the grafting direction's norm (+1e-16 as in the reference)
            p_norm = P.flatten(1).norm(dim=1).add_(1e-16)
            P.mul_((graft.flatten(1).norm(dim=1) / p_norm).view((-1,) + (1,) * len(self.shape)))
        elif bc1 is not None:
            P.div_(bc1)
        return P

    def _kron_list(self, mats: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        out: list[Optional[torch.Tensor]] = [None] * len(self.shape)
        for m, i in zip(mats, self.factor_dims):
            out[i] = m
        return out

    def _grafting_direction(self, G: torch.Tensor, M: torch.Tensor, bc1: Optional[torch.Tensor]) -> torch.Tensor:
        """``M_hat / (sqrt(V_hat) + eps)`` (``M_hat`` for SGD/no grafting), with ``M_hat = M / bc1``.

        Written as ``M / (sqrt(V) * a + c)`` with per-block ``a = bc1 / sqrt(bc2)``, ``c = eps * bc1``:
        three parameter-sized passes instead of five.
        """
        g = self.hp.grafting
        if g is None or isinstance(g, SGDGrafting):
            if bc1 is not None:
                return M / bc1
            # the direction must never be a state tensor: the caller edits it in place
            return M if M is G else M.clone()
        V = self.grafting_state
        if isinstance(g, AdaGradGrafting):
            V.addcmul_(G, G)
        else:
            V.mul_(g.beta2).addcmul_(G, G, value=1.0 - g.beta2)
        a = torch.ones((), dtype=V.dtype, device=V.device) if bc1 is None else bc1
        if isinstance(g, AdamGrafting):
            a = a / self._bias_correction(g.beta2, always=True).sqrt()
        c = g.epsilon if bc1 is None else bc1 * g.epsilon
        return M / torch.addcmul(torch.as_tensor(c, dtype=V.dtype, device=V.device), V.sqrt(), a)

    def _amortized(self, bc2: torch.Tensor) -> None:
        hp = self.hp
        # sized by the (possibly masked, see step_blocks) stacks, not by the whole bucket
        all_ok = torch.ones(self.failures.shape[0], dtype=torch.bool, device=self.device)
        for n, i in enumerate(self.factor_dims):
            F_hat = self.factors[n] / bc2.view(-1, 1, 1)
            if self.is_eigen:
                new, ok = eigenbasis(F_hat, hp.epsilon)
            elif isinstance(hp.preconditioner.root, CoupledNewtonConfig):
                new, ok = inverse_root_newton(F_hat, self.exponents[i], hp.epsilon, hp.preconditioner.root)
            else:
                new, ok = inverse_root_eigh(F_hat, self.exponents[i], hp.epsilon, hp.preconditioner.root)
            self.roots[n].copy_(torch.where(ok.view(-1, 1, 1), new.to(self.dtype), self.roots[n]))
            all_ok &= ok
        self.failures.copy_(torch.where(all_ok, torch.zeros_like(self.failures), self.failures + 1))
        limit = hp.preconditioner.max_consecutive_root_failures
        if bool((self.failures >= limit).any()):
            # recorded, not raised: the optimizer finishes the step on every rank, then raises
            rows = self._active_index if self._active_index is not None else range(len(self.blocks))
            self.exhausted.extend(self.blocks[r].block_id for r, f in zip(rows, self.failures.tolist()) if f >= limit)

    def _update_corrected_eigenvalues(self, G: torch.Tensor) -> None:
        """D <- beta2 D + (1 - beta2) (G rotated into the current eigenbasis)^2 (sum when beta2 == 1)."""
        G_rot = apply_kronecker(G, self._kron_list(self.roots), transpose=True)
        beta2 = self.hp.beta2
        if beta2 < 1.0:
            self.eigenvalues.mul_(beta2).addcmul_(G_rot, G_rot, value=1.0 - beta2)
        else:
            self.eigenvalues.addcmul_(G_rot, G_rot)

    def _eigen_corrected_direction(self, G: torch.Tensor, M: torch.Tensor, bc2: torch.Tensor) -> torch.Tensor:
        """Direction for the un-bias-corrected ``M`` (the caller applies ``1 / bc1``)."""
        hp = self.hp
        Qs = self._kron_list(self.roots)
        exponent = next(e for e in self.exponents if e != 0)
        M_rot = apply_kronecker(M, Qs, transpose=True)
        # the root before epsilon, as in the reference (and torch Adam): (D_hat^e + eps)
        denom = (self.eigenvalues / bc2).pow_(exponent).add_(hp.epsilon)
        return apply_kronecker(M_rot.div_(denom), Qs)


def bucket_key(group_index: int, block: Block) -> tuple:
    """Blocks with equal keys are stacked into one bucket."""
    return (group_index, block.shape, block.exponents)

