"""ShardedShampoo against a dense reference written here, on tiny shapes, in float64.

The reference never uses the library's batched math: each block's preconditioner is the
explicit Kronecker product ``vec(P) = (R_1 (x) R_2 (x) ...) vec(M_hat)`` (row-major vec), with
every ``R_i`` from ``torch.linalg.eigh`` in float64, and the eigenvalue-corrected mode rotates
with the explicit ``Q_1 (x) Q_2 (x) ...``. Blocking (squeeze, merge, split) is recomputed here
from the shapes, so a wrong merge or split also shows up as a trajectory difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from tests.support.numerics import block_boxes, grad_for, kron_all, max_rel_diff, step_in_lockstep
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                                    EighRootConfig, RMSpropGrafting, RootInverseShampoo, SGDGrafting)
from sharded_shampoo.compute.matrix_functions import inverse_root_eigh, inverse_root_newton

F64 = torch.float64
TOL = 1e-5


# ----------------------------------------------------------------------------- the reference


def ref_root(F_hat: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    L, Q = torch.linalg.eigh(F_hat)
    L = L - min(float(L.min()), 0.0) + eps
    return Q @ torch.diag(L.pow(-exponent)) @ Q.T


@dataclass
class RefBlock:
    box: tuple[slice, ...]
    shape: tuple[int, ...]
    exponents: tuple[float, ...]
    factors: list[Optional[torch.Tensor]] = field(default_factory=list)
    mats: list[Optional[torch.Tensor]] = field(default_factory=list)  # roots, or eigenbases Q_i
    M: Optional[torch.Tensor] = None
    graft: Optional[torch.Tensor] = None
    D: Optional[torch.Tensor] = None
    step: int = 0


class DenseShampoo:
    """One parameter, dense, float64, straight from the math in the brief."""

    def __init__(self, p: torch.Tensor, merged: tuple[int, ...], max_dim: int, exponents: tuple[float, ...], *,
                 lr: float, beta1: float, beta2: float, eps: float, grafting, freq: int,
                 start: Optional[int] = None, wd: float = 0.0, decoupled: bool = True,
                 eigen: bool = False, bias_correction: bool = True) -> None:
        self.p = p.detach().clone().to(F64)
        self.merged = merged
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.grafting, self.freq, self.start = grafting, freq, start or freq
        self.wd, self.decoupled, self.eigen, self.bc = wd, decoupled, eigen, bias_correction
        self.t = 0
        self.blocks = []
        for box in block_boxes(merged, max_dim):
            shape = tuple(s.stop - s.start for s in box)
            b = RefBlock(box, shape, exponents)
            for d, e in zip(shape, exponents):
                b.factors.append(torch.zeros(d, d, dtype=F64) if e != 0 else None)
                b.mats.append(torch.eye(d, dtype=F64) if e != 0 and eigen else None)
            b.M = torch.zeros(shape, dtype=F64)
            b.graft = torch.zeros(shape, dtype=F64)
            b.D = torch.zeros(shape, dtype=F64)
            self.blocks.append(b)

    def _bc(self, beta: float, t: int) -> float:
        return 1.0 - beta ** t if self.bc and beta < 1.0 else 1.0

    def _graft_dir(self, b: RefBlock, G: torch.Tensor, M_hat: torch.Tensor) -> torch.Tensor:
        g = self.grafting
        if g is None or isinstance(g, SGDGrafting):
            return M_hat
        if isinstance(g, AdaGradGrafting):
            b.graft += G * G
            return M_hat / (b.graft.sqrt() + g.epsilon)
        b.graft = g.beta2 * b.graft + (1 - g.beta2) * G * G
        V = b.graft / self._bc(g.beta2, b.step) if isinstance(g, AdamGrafting) else b.graft
        return M_hat / (V.sqrt() + g.epsilon)

    def statistic(self, b: RefBlock, G: torch.Tensor, i: int) -> torch.Tensor:
        """What factor ``i`` accumulates: ``G_(i) G_(i)^T`` (variants override this)."""
        Gi = G.movedim(i, 0).reshape(b.shape[i], -1)
        return Gi @ Gi.T

    def step(self, grad: torch.Tensor) -> None:
        self.t += 1
        t = self.t
        grad = grad.to(F64)
        if self.wd and not self.decoupled:
            grad = grad + self.wd * self.p
        Gm = grad.reshape(self.merged)
        direction = torch.zeros(self.merged, dtype=F64)
        amortized = t >= self.start and (t % self.freq == 0 or t == self.start)
        for b in self.blocks:
            b.step += 1
            G = Gm[b.box]
            k = len(b.shape)
            w = 1.0 - self.beta2 if self.beta2 < 1.0 else 1.0
            for i in range(k):
                if b.factors[i] is not None:
                    b.factors[i] = self.beta2 * b.factors[i] + w * self.statistic(b, G, i)
            bc2 = self._bc(self.beta2, b.step)
            if self.beta1 > 0:
                b.M = self.beta1 * b.M + (1 - self.beta1) * G
                M_hat = b.M / self._bc(self.beta1, b.step)
            else:
                M_hat = G
            if amortized:
                for i in range(k):
                    if b.factors[i] is not None:
                        F_hat = b.factors[i] / bc2
                        if self.eigen:
                            b.mats[i] = torch.linalg.eigh(F_hat)[1]
                        else:
                            b.mats[i] = ref_root(F_hat, b.exponents[i], self.eps)
            graft = self._graft_dir(b, G, M_hat)
            eyes = [torch.eye(d, dtype=F64) if m is None else m for d, m in zip(b.shape, b.mats)]
            K = kron_all(eyes)
            if self.eigen:
                # D accumulates every step (the brief: "every step D = ..."), with the current Q.
                G_rot = (K.T @ G.reshape(-1))
                b.D = self.beta2 * b.D + (1 - self.beta2) * G_rot.reshape(b.shape) ** 2 if self.beta2 < 1 \
                    else b.D + G_rot.reshape(b.shape) ** 2
            if t < self.start and (self.grafting is not None or not self.eigen):
                P = graft         # without grafting, SOAP's own direction from step 1 (Adam in the initial basis)
            elif self.eigen:
                e = next(x for x in b.exponents if x != 0)
                M_rot = K.T @ M_hat.reshape(-1)
                # the root before epsilon (as the reference implementation and torch Adam do)
                scaled = M_rot / ((b.D.reshape(-1) / bc2).pow(e) + self.eps)
                P = (K @ scaled).reshape(b.shape)
            else:
                P = (K @ M_hat.reshape(-1)).reshape(b.shape)
            if t >= self.start and self.grafting is not None:
                P = P * (graft.norm() / P.norm())
            direction[b.box] = P
        direction = direction.reshape(self.p.shape)
        if self.wd and self.decoupled:
            direction = direction + self.wd * self.p
        self.p = self.p - self.lr * direction


def _run(shape, merged, max_dim, exponents, *, steps=7, precond=None, lr=0.05, beta1=0.0, beta2=1.0,
         eps=1e-10, grafting=None, freq=1, start=None, wd=0.0, decoupled=True, eigen=False, tol=TOL,
         bias_correction=True, dense=DenseShampoo, **extra):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    if precond is None:
        precond = (EigenvalueCorrectedShampoo(factor_dtype=F64) if eigen
                   else RootInverseShampoo(factor_dtype=F64))
    opt = ShardedShampoo([("w", p)], lr=lr, betas=(beta1, beta2), epsilon=eps, max_preconditioner_dim=max_dim,
                         precondition_frequency=freq, start_preconditioning_step=start, grafting=grafting,
                         preconditioner=precond, weight_decay=wd, use_decoupled_weight_decay=decoupled,
                         use_bias_correction=bias_correction, **extra)
    assert [b.merged_shape for b in opt.plan.blocks][0] == merged
    assert [b.exponents for b in opt.plan.blocks][0] == tuple(exponents)
    ref = dense(p, merged, max_dim, exponents, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                grafting=grafting, freq=freq, start=start, wd=wd, decoupled=decoupled, eigen=eigen,
                bias_correction=bias_correction)
    assert len(opt.plan.blocks) == len(ref.blocks)
    step_in_lockstep(opt, p, ref, steps, tol)
    return opt


Q2 = 0.25  # 1/(2k) for k = 2
Q3 = 1 / 6


# ----------------------------------------------------------------------------- root-inverse Shampoo


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("beta1,beta2", [(0.0, 1.0), (0.9, 0.95)])
@pytest.mark.parametrize("grafting", [None, AdaGradGrafting(epsilon=1e-8)], ids=["nograft", "adagrad"])
def test_2d(freq, beta1, beta2, grafting):
    _run((6, 5), (6, 5), 8, (Q2, Q2), freq=freq, beta1=beta1, beta2=beta2, grafting=grafting,
         lr=0.01 if grafting is None else 0.05)


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("beta2", [1.0, 0.9])
@pytest.mark.parametrize("grafting", [None, RMSpropGrafting(beta2=0.9, epsilon=1e-8)], ids=["nograft", "rmsprop"])
def test_3d(freq, beta2, grafting):
    # 3*4 > 8, 4*5 > 8: stays a true order-3 block with exponents 1/6
    _run((3, 4, 5), (3, 4, 5), 8, (Q3, Q3, Q3), freq=freq, beta2=beta2, grafting=grafting, lr=0.01)


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("beta2", [1.0, 0.99])
@pytest.mark.parametrize("grafting", [None, AdamGrafting(beta2=0.99, epsilon=1e-8)], ids=["nograft", "adam"])
def test_merged_dims(freq, beta2, grafting):
    # (4, 3, 5) with max 12: 4*3 = 12 merges, 12*5 > 12 does not -> (12, 5)
    _run((4, 3, 5), (12, 5), 12, (Q2, Q2), freq=freq, beta1=0.9, beta2=beta2, grafting=grafting, lr=0.01)


def test_squeezed_and_merged_4d():
    # (2, 1, 3, 4) squeezes to (2, 3, 4) then merges 2*3=6 <= 6, 6*4 > 6 -> (6, 4)
    _run((2, 1, 3, 4), (6, 4), 6, (Q2, Q2), freq=2, beta2=0.99, grafting=AdaGradGrafting(epsilon=1e-8))


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("grafting", [None, AdaGradGrafting(epsilon=1e-8)], ids=["nograft", "adagrad"])
def test_blocked_parameter(freq, grafting):
    # (10, 6) with max 4 -> rows 4,4,2 x cols 4,2: six independent blocks of four shapes
    opt = _run((10, 6), (10, 6), 4, (Q2, Q2), freq=freq, beta2=0.95, grafting=grafting, lr=0.01)
    assert [b.shape for b in opt.plan.blocks] == [(4, 4), (4, 2), (4, 4), (4, 2), (2, 4), (2, 2)]
    assert [b.block_id for b in opt.plan.blocks] == [f"w.block_{i}" for i in range(6)]


def test_1d_parameter_gets_full_factor():
    _run((7,), (7,), 8, (0.5,), freq=2, beta2=0.99, grafting=AdaGradGrafting(epsilon=1e-8), lr=0.01)


def test_weight_decay_decoupled_and_l2():
    _run((6, 5), (6, 5), 8, (Q2, Q2), freq=2, beta2=0.99, grafting=AdaGradGrafting(epsilon=1e-8),
         wd=0.1, decoupled=True, lr=0.02)
    _run((6, 5), (6, 5), 8, (Q2, Q2), freq=2, beta2=0.99, grafting=AdaGradGrafting(epsilon=1e-8),
         wd=0.1, decoupled=False, lr=0.02)


def test_start_preconditioning_step_later_than_frequency():
    # grafting until step 4, first root at step 4 (t == start), then every 3 steps (6, 9)
    _run((6, 5), (6, 5), 8, (Q2, Q2), steps=10, freq=3, start=4, beta2=0.99,
         grafting=AdaGradGrafting(epsilon=1e-8), lr=0.02)


def test_no_bias_correction():
    _run((6, 5), (6, 5), 8, (Q2, Q2), freq=2, beta1=0.9, beta2=0.9, bias_correction=False,
         grafting=AdaGradGrafting(epsilon=1e-8), lr=0.02)


def test_exponent_override_disabled_dim():
    pc = RootInverseShampoo(factor_dtype=F64, inverse_exponent_override={2: {0: 0.0}})
    opt = _run((6, 5), (6, 5), 8, (0.0, Q2), precond=pc, freq=2, beta2=0.99,
               grafting=AdaGradGrafting(epsilon=1e-8), lr=0.02)
    state = opt.state[opt.param_groups[0]["params"][0]]["block_0"]
    assert "factor_0" not in state and "root_0" not in state and state["factor_1"].shape == (5 * 6 // 2,)


@pytest.mark.parametrize("override,exps", [({2: {1: 0.5}}, (Q2, 0.5)), ({2: 0.3}, (0.3, 0.3)),
                                           ({3: 0.25}, (0.25, 0.25, 0.25))])
def test_exponent_override_custom(override, exps):
    pc = RootInverseShampoo(factor_dtype=F64, inverse_exponent_override=override)
    shape = (6, 5) if len(exps) == 2 else (3, 4, 5)
    _run(shape, shape, 8, exps, precond=pc, freq=2, beta2=0.99, grafting=None, lr=0.005)


def test_float32_factors_close_to_float64_reference():
    """Default fp32 factors: same math to fp32 accuracy (a looser, relative bound)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=F64))
    opt = ShardedShampoo([("w", p)], lr=0.02, betas=(0.0, 0.99), epsilon=1e-6, max_preconditioner_dim=8,
                         precondition_frequency=1, grafting=AdaGradGrafting(epsilon=1e-8))
    ref = DenseShampoo(p, (6, 5), 8, (Q2, Q2), lr=0.02, beta1=0.0, beta2=0.99, eps=1e-6,
                       grafting=AdaGradGrafting(epsilon=1e-8), freq=1)
    for t in range(6):
        p.grad = grad_for(p, 0, t)
        opt.step()
        ref.step(grad_for(ref.p, 0, t))
        assert max_rel_diff(p, ref.p) < 1e-4


# ----------------------------------------------------------------------------- eigenvalue-corrected


@pytest.mark.parametrize("beta2", [0.95, 1.0])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize("grafting", [None, AdaGradGrafting(epsilon=1e-8)], ids=["nograft", "adagrad"])
def test_eigenvalue_corrected_every_step(beta2, shape, grafting):
    # Shapes whose factors have distinct eigenvalues from step 1, so eigenvectors are unique up to
    # sign (which the rotate / rotate-back pair cancels).
    _run(shape, shape, 8, (0.5,) * len(shape), eigen=True, freq=1, beta1=0.9, beta2=beta2, grafting=grafting,
         lr=0.01, eps=1e-8)


@pytest.mark.parametrize("beta2", [0.95, 1.0])
def test_eigenvalue_corrected_amortized(beta2):
    """Eigenbasis refreshed every 3 steps; D keeps accumulating every step, from step 1."""
    _run((6, 5), (6, 5), 8, (0.5, 0.5), eigen=True, steps=8, freq=3, beta1=0.9, beta2=beta2, lr=0.01,
         eps=1e-8)


def test_eigenvalue_corrected_epsilon_is_added_after_the_root():
    # a large epsilon makes (D^e + eps) and (D + eps)^e clearly different
    _run((6, 5), (6, 5), 8, (0.5, 0.5), eigen=True, steps=6, freq=2, beta1=0.9, beta2=0.95, lr=0.01, eps=1e-2)


def test_eigenvalue_corrected_skipped_dim():
    pc = EigenvalueCorrectedShampoo(factor_dtype=F64, inverse_exponent_override={2: {1: 0.0}})
    _run((6, 5), (6, 5), 8, (0.5, 0.0), precond=pc, eigen=True, freq=1, beta2=0.95, lr=0.01, eps=1e-8)


# ----------------------------------------------------------------------------- coupled Newton roots


def _spd(B: int, d: int, cond: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, d, d, generator=gen, dtype=F64))
    L = torch.logspace(0, math.log10(cond), d, dtype=F64).expand(B, d) * torch.rand(B, 1, generator=gen,
                                                                                       dtype=F64).add(0.5)
    return (Q * L.unsqueeze(-2)) @ Q.mT


@pytest.mark.parametrize("exponent", [0.5, 0.25, 1 / 6, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coupled_newton_matches_eigh(exponent, dtype):
    A = _spd(6, 7, cond=50.0, seed=1).to(dtype)
    newton, ok_n = inverse_root_newton(A, exponent, 1e-6, CoupledNewtonConfig(max_iterations=200, tolerance=1e-5
                                                                              if dtype == torch.float32 else 1e-10))
    eig, ok_e = inverse_root_eigh(A, exponent, 1e-6, EighRootConfig())
    assert bool(ok_n.all()) and bool(ok_e.all())
    rel = float((newton.double() - eig.double()).norm() / eig.double().norm())
    assert rel < 1e-4, rel
    # and both against an fp64 eigh computed here
    L, Q = torch.linalg.eigh(A.double())
    exact = (Q * (L + 1e-6).pow(-exponent).unsqueeze(-2)) @ Q.mT
    assert float((eig.double() - exact).norm() / exact.norm()) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_coupled_newton_in_the_optimizer_matches_eigh():
    def run(root):
        gen = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=F64))
        opt = ShardedShampoo([("w", p)], lr=0.01, betas=(0.0, 0.9), epsilon=1e-3, max_preconditioner_dim=8,
                             precondition_frequency=2, grafting=AdaGradGrafting(epsilon=1e-8),
                             preconditioner=RootInverseShampoo(root=root, factor_dtype=F64))
        for t in range(6):
            p.grad = grad_for(p, 0, t) + 0.3 * torch.eye(6, 5, dtype=F64)  # keep factors well conditioned
            opt.step()
        return p.detach(), opt.state[p]["block_0"]["root_0"].clone()

    p_n, r_n = run(CoupledNewtonConfig(tolerance=1e-10, max_iterations=200))
    p_e, r_e = run(EighRootConfig())
    assert float((r_n - r_e).norm() / r_e.norm()) < 1e-4
    assert max_rel_diff(p_n, p_e) < 1e-5
