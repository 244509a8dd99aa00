"""Spectral and sign descent against a dense float64 reference written here, on tiny shapes.

The reference never uses the library's batched math: Newton-Schulz is the textbook polynomial on the
*row* side, ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` on the untransposed matrix (the library
iterates on the small side's Gram matrix ``X^T X`` of a tall matrix), the SVD direction is ``U V^T``
of a float64 ``torch.linalg.svd``, sign descent is ``sign(M_hat) * scale``. Blocks (2-D merges,
splits, experts) are written out per test, so a wrong merge or split shows up as a difference too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

from tests.support.numerics import block_boxes, step_in_lockstep
from sharded_shampoo import (SVD, AdaGradGrafting, AdamGrafting, BlockingConfig, NewtonSchulz, ShardedShampoo,
                             SignDescent, SpectralDescent)

F64 = torch.float64
TOL = 1e-9          # float64 on both sides: only the order of the arithmetic differs
MUON = (3.4445, -4.7750, 2.0315)


def ns_textbook(A: torch.Tensor, schedule: list[tuple[float, float, float]]) -> torch.Tensor:
    X = A / max(float(A.norm()), 1e-8)
    for a, b, c in schedule:
        S = X @ X.T
        X = a * X + b * S @ X + c * S @ S @ X
    return X


def svd_textbook(A: torch.Tensor, nuclear: bool) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh * (float(s.sum()) if nuclear else 1.0)


@dataclass
class DenseBlock:
    box: tuple[slice, ...]
    M: torch.Tensor
    V: torch.Tensor
    step: int = 0


class DenseDescent:
    """One parameter, dense, float64: ``P = direction(M_hat)`` per block (``merged``: the block view of the
    parameter, ``batch``: leading expert dims), grafting rescale, decoupled weight decay."""

    def __init__(self, p: torch.Tensor, merged: tuple[int, ...], max_dim: int, direction: Callable[[torch.Tensor],
                 torch.Tensor], *, lr: float, beta1: float, grafting: Any, bias_correction: bool = True,
                 wd: float = 0.0, use_direction: bool = True, boxes: Optional[list[tuple[slice, ...]]] = None) -> None:
        self.p = p.detach().clone().to(F64)
        self.merged, self.direction, self.use_direction = merged, direction, use_direction
        self.lr, self.beta1, self.grafting, self.bc, self.wd = lr, beta1, grafting, bias_correction, wd
        self.blocks = [DenseBlock(box, torch.zeros(self.shape_of(box), dtype=F64),
                                  torch.zeros(self.shape_of(box), dtype=F64))
                       for box in (boxes or block_boxes(merged, max_dim))]

    @staticmethod
    def shape_of(box: tuple[slice, ...]) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in box)

    def graft(self, b: DenseBlock, G: torch.Tensor, M_hat: torch.Tensor) -> torch.Tensor:
        g = self.grafting
        if g is None:
            return M_hat
        if isinstance(g, AdaGradGrafting):
            b.V += G * G
            return M_hat / (b.V.sqrt() + g.epsilon)
        b.V = g.beta2 * b.V + (1 - g.beta2) * G * G
        return M_hat / ((b.V / (1 - g.beta2 ** b.step)).sqrt() + g.epsilon)

    def step(self, grad: torch.Tensor) -> None:
        Gm = grad.to(F64).reshape(self.merged)
        out = torch.zeros(self.merged, dtype=F64)
        for b in self.blocks:
            b.step += 1
            G = Gm[b.box]
            if self.beta1 > 0:
                b.M = self.beta1 * b.M + (1 - self.beta1) * G
                M_hat = b.M / (1 - self.beta1 ** b.step if self.bc else 1.0)
            else:
                M_hat = G
            graft = self.graft(b, G, M_hat)
            if not self.use_direction:
                out[b.box] = graft
                continue
            P = self.direction(M_hat)
            if self.grafting is not None:
                P = P * (graft.norm() / P.norm())
            out[b.box] = P
        update = out.reshape(self.p.shape) + self.wd * self.p
        self.p = self.p - self.lr * update


def _run(shape: tuple[int, ...], merged: tuple[int, ...], max_dim: int, preconditioner: Any,
         direction: Callable[[torch.Tensor], torch.Tensor], *, steps: int = 6, lr: float = 0.02, beta1: float = 0.9,
         grafting: Any = None, bias_correction: bool = True, wd: float = 0.0, blocking: Optional[BlockingConfig] = None,
         use_direction: bool = True, expect_blocks: Optional[list[tuple[int, ...]]] = None,
         boxes: Optional[list[tuple[slice, ...]]] = None) -> ShardedShampoo:
    gen = torch.Generator().manual_seed(11)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    opt = ShardedShampoo([("w", p)], lr=lr, betas=(beta1, 0.999), max_preconditioner_dim=max_dim, grafting=grafting,
                         preconditioner=preconditioner, use_bias_correction=bias_correction, weight_decay=wd,
                         blocking=blocking or BlockingConfig())
    if expect_blocks is not None:
        assert [b.shape for b in opt.plan.blocks] == expect_blocks
    ref = DenseDescent(p, merged, max_dim, direction, lr=lr, beta1=beta1, grafting=grafting,
                       bias_correction=bias_correction, wd=wd, use_direction=use_direction, boxes=boxes)
    step_in_lockstep(opt, p, ref, steps, TOL)
    return opt


def _ns(**kw: Any) -> SpectralDescent:
    return SpectralDescent(NewtonSchulz(**{"matmul_dtype": F64, **kw}), factor_dtype=F64)


# ----------------------------------------------------------------------------- spectral descent


@pytest.mark.parametrize("shape", [(6, 5), (5, 8)], ids=["tall", "wide"])
@pytest.mark.parametrize("beta1,bias_correction", [(0.0, True), (0.9, True), (0.9, False)])
@pytest.mark.parametrize("grafting", [None, AdaGradGrafting(epsilon=1e-8), AdamGrafting(beta2=0.99, epsilon=1e-8)],
                         ids=["nograft", "adagrad", "adam"])
def test_newton_schulz(shape, beta1, bias_correction, grafting):
    # without grafting the direction's scale is that of orth(M_hat): bias correction must not divide it again
    _run(shape, shape, 8, _ns(), lambda M: ns_textbook(M, [MUON] * 5), beta1=beta1, bias_correction=bias_correction,
         grafting=grafting)


@pytest.mark.parametrize("scale,expected", [("muon", lambda i, o: max(1, o / i) ** 0.5),
                                            ("spectral_norm", lambda i, o: (o / i) ** 0.5),
                                            ("match_rms_adamw", lambda i, o: 0.2 * max(i, o) ** 0.5)])
@pytest.mark.parametrize("shape", [(8, 3), (3, 8)])
def test_scale_by_dims(scale, expected, shape):
    rows, cols = shape
    _run(shape, shape, 8, _ns(scale_by_dims_fn=scale), lambda M: ns_textbook(M, [MUON] * 5) * expected(cols, rows))


def test_per_iteration_coefficients():
    schedule = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037)]
    _run((7, 4), (7, 4), 8, _ns(num_iterations=3, coefficients=schedule), lambda M: ns_textbook(M, schedule))


@pytest.mark.parametrize("nuclear", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (4, 7)])
def test_svd(nuclear, shape):
    _run(shape, shape, 8, SpectralDescent(SVD(scale_by_nuclear_norm=nuclear), factor_dtype=F64),
         lambda M: svd_textbook(M, nuclear), lr=1e-3 if nuclear else 0.02)


def test_blocks_split_and_merged_to_2d():
    # (20, 6) at 8: blocks (8, 6), (8, 6), (4, 6) each orthogonalised alone
    _run((20, 6), (20, 6), 8, _ns(), lambda M: ns_textbook(M, [MUON] * 5), expect_blocks=[(8, 6), (8, 6), (4, 6)],
         grafting=AdaGradGrafting(epsilon=1e-8))
    # (4, 3, 5) at 16: merged toward 2-D only -> (4, 15) (Shampoo would also stop at (4, 15): 60 > 16)
    _run((4, 3, 5), (4, 15), 16, _ns(), lambda M: ns_textbook(M, [MUON] * 5), expect_blocks=[(4, 15)])
    # (2, 3, 4) at 64: Shampoo merges to (24,); spectral stops at 2 dims -> (2, 12)
    _run((2, 3, 4), (2, 12), 64, _ns(), lambda M: ns_textbook(M, [MUON] * 5), expect_blocks=[(2, 12)])


def test_experts_are_orthogonalised_one_by_one():
    # [E, d_in, d_out] with batch_dims=1: E blocks of (d_in, d_out), never the flattened tensor
    experts = [(slice(4 * e, 4 * e + 4), slice(0, 5)) for e in range(3)]
    _run((3, 4, 5), (12, 5), 8, _ns(), lambda M: ns_textbook(M, [MUON] * 5), blocking=BlockingConfig(batch_dims=1),
         expect_blocks=[(4, 5)] * 3, boxes=experts)


def test_weight_decay_is_decoupled_from_the_orthogonalised_direction():
    _run((6, 5), (6, 5), 8, _ns(scale_by_dims_fn="muon"), lambda M: ns_textbook(M, [MUON] * 5) * math.sqrt(6 / 5),
         wd=0.1)


def test_1d_blocks_use_the_grafting_direction_when_asked():
    opt = _run((7,), (7,), 8, _ns(), lambda M: M, blocking=BlockingConfig(precondition_1d=False),
               grafting=AdamGrafting(beta2=0.99, epsilon=1e-8), use_direction=False, expect_blocks=[(7,)])
    assert opt.runtime.buckets[0].kind.preconditions is False


# ----------------------------------------------------------------------------- sign descent


@pytest.mark.parametrize("shape,merged", [((6, 5), (30,)), ((4, 3, 5), (4, 15)), ((7,), (7,))])
@pytest.mark.parametrize("beta1,bias_correction", [(0.0, True), (0.9, True), (0.9, False)])
def test_sign_descent(shape, merged, beta1, bias_correction):
    _run(shape, merged, 16 if len(shape) == 3 else 32, SignDescent(factor_dtype=F64), torch.sign, beta1=beta1,
         bias_correction=bias_correction, lr=0.01)


def test_sign_descent_l1_scale_and_grafting():
    def l1(M: torch.Tensor) -> torch.Tensor:
        return torch.sign(M) * M.abs().sum()
    _run((6, 5), (6, 5), 5, SignDescent(scale_fn="l1_norm", factor_dtype=F64), l1, lr=1e-3)
    _run((6, 5), (6, 5), 5, SignDescent(factor_dtype=F64), torch.sign, grafting=AdaGradGrafting(epsilon=1e-8))


def test_sign_descent_1d_blocks_use_the_grafting_direction_when_asked():
    opt = _run((7,), (7,), 8, SignDescent(factor_dtype=F64), torch.sign, blocking=BlockingConfig(precondition_1d=False),
               grafting=AdaGradGrafting(epsilon=1e-8), use_direction=False, expect_blocks=[(7,)])
    assert opt.runtime.buckets[0].kind.preconditions is False
