"""Issue 16's Shampoo-family variants against a dense float64 reference written here from the math.

Eigendecomposed Shampoo (eigh and warm QR eigenpairs, the adaptive refresh ``tolerance``), trace
scaling, ``drop_weighting_factor_on_gsquare``, pseudo-inverse roots and ``beta3``, for root-inverse, KL-
(``KLShampoo`` inherits every option of root-inverse Shampoo), eigendecomposed and eigenvalue-corrected
Shampoo. The reference forms every inverse root ``Q diag(f(lambda)) Q^T`` explicitly and applies the
explicit Kronecker product ``vec(P) = (R_1 (x) R_2 (x) ...) vec(M_hat)``; the optimizer applies the eigendecomposed roots in the
eigenbasis and never forms them. One block per parameter (shapes that neither merge nor split);
blocking is covered by tests/test_dense_reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from tests.support.numerics import kron_all, step_in_lockstep
from sharded_shampoo import (AdaGradGrafting, EigendecomposedKLShampoo, EigendecomposedShampoo, EigenvalueCorrectedShampoo, EighRootConfig,
                             KLShampoo, PseudoInverse, QREigenbasisConfig, RootInverseShampoo, ShardedShampoo)

F64 = torch.float64
TOL = 1e-6


@dataclass
class Options:
    """The variant: kind ("root", "kl", "eig", "eigkl", "soap") and the family options, as the reference describes them."""

    kind: str = "root"
    tolerance: float = 0.0
    trace: Optional[float] = None
    drop: bool = False
    pinv: Optional[tuple[float, float]] = None      # (rank_atol, rank_rtol)
    qr_iterations: int = 0                          # eig: warm QR iterations instead of eigh (0: eigh)
    beta3: Optional[float] = None


def root_scales(L: torch.Tensor, e: float, eps: float, pinv: Optional[tuple[float, float]]) -> torch.Tensor:
    if pinv is not None:
        cutoff = max(pinv[1] * max(float(L.max()), 0.0), pinv[0])
        return torch.where(L <= cutoff, torch.zeros_like(L), L.pow(-e))
    if float(L.min()) < eps:
        L = L - L.min() + eps
    return L.pow(-e)


def qr_pairs(A: torch.Tensor, A_r: torch.Tensor, Q: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm subspace iterations: columns ordered by descending Rayleigh quotient, then Q = qr(A Q).Q;
    eigenvalues = diag(Q^T A_r Q). A basis that is still the identity gets a full eigh."""
    if torch.equal(Q, torch.eye(Q.shape[0], dtype=Q.dtype)):
        return torch.linalg.eigh(A_r)
    for _ in range(iterations):
        order = torch.argsort(torch.diagonal(Q.T @ A @ Q), descending=True)
        Q = torch.linalg.qr((A @ Q)[:, order]).Q
    return torch.diagonal(Q.T @ A_r @ Q), Q


@dataclass
class DenseFamily:
    """One parameter = one block, dense, float64."""

    p: torch.Tensor
    exps: tuple[float, ...]
    opt: Options
    lr: float
    beta1: float
    beta2: float
    eps: float
    freq: int
    start: int
    grafting: bool
    t: int = 0
    skipped: int = 0
    F: list = field(default_factory=list)
    mats: list = field(default_factory=list)      # roots (root) or eigenvectors (eig, soap)
    vals: list = field(default_factory=list)      # eigenvalues (eig)

    def __post_init__(self) -> None:
        self.p = self.p.detach().clone().to(F64)
        shape = self.p.shape
        self.F = [torch.zeros(d, d, dtype=F64) for d in shape]
        self.mats = [torch.eye(d, dtype=F64) for d in shape]
        self.vals = [torch.ones(d, dtype=F64) for d in shape]
        self.M = torch.zeros(shape, dtype=F64)
        self.V = torch.zeros(shape, dtype=F64)
        self.D = torch.zeros(shape, dtype=F64)

    def refresh(self, i: int, A: torch.Tensor) -> None:
        o = self.opt
        if o.trace is not None:
            A = A * max(float(torch.trace(A)), self.eps) ** (-o.trace)
        A_r = A + self.eps * torch.eye(A.shape[0], dtype=F64)
        if o.kind in ("root", "kl"):
            L, Q = torch.linalg.eigh(A_r)
            self.mats[i] = Q @ torch.diag(root_scales(L, self.exps[i], self.eps, o.pinv)) @ Q.T
            return
        Q = self.mats[i]
        if o.tolerance > 0:
            B = Q.T @ A_r @ Q
            if float(torch.linalg.norm(B - torch.diag(torch.diagonal(B)))) <= o.tolerance * float(torch.linalg.norm(B)):
                self.skipped += 1
                self.vals[i] = torch.diagonal(B).clone()
                return
        if o.qr_iterations:
            self.vals[i], self.mats[i] = qr_pairs(A, A_r, Q, o.qr_iterations)
        else:
            self.vals[i], self.mats[i] = torch.linalg.eigh(A_r)

    def roots(self) -> list[torch.Tensor]:
        """The current inverse roots: stored (root, kl) or formed ``Q diag(f(lambda)) Q^T`` (eig, eigkl)."""
        if self.opt.kind in ("root", "kl"):
            return self.mats
        return [Q @ torch.diag(root_scales(L, e, self.eps, self.opt.pinv)) @ Q.T
                for Q, L, e in zip(self.mats, self.vals, self.exps)]

    def statistic_input(self, G: torch.Tensor, i: int) -> torch.Tensor:
        """``G``, or for KL-Shampoo ``G`` preconditioned along every other dim with the roots before this step."""
        if self.opt.kind not in ("kl", "eigkl"):
            return G
        mats = [torch.eye(d, dtype=F64) if j == i else m for j, (d, m) in enumerate(zip(G.shape, self.roots()))]
        return (kron_all(mats) @ G.reshape(-1)).reshape(G.shape)

    def step(self, G: torch.Tensor) -> None:
        self.t += 1
        t, o, b1, b2 = self.t, self.opt, self.beta1, self.beta2
        w = 1.0 if o.drop or b2 == 1.0 else 1.0 - b2
        for i in range(G.ndim):
            Gi = self.statistic_input(G, i).movedim(i, 0).reshape(G.shape[i], -1)
            self.F[i] = b2 * self.F[i] + w * Gi @ Gi.T
        bc2 = 1.0 - b2 ** t if b2 < 1.0 and not o.drop else 1.0
        if t >= self.start and (t % self.freq == 0 or t == self.start):
            for i in range(G.ndim):
                self.refresh(i, self.F[i] / bc2)
        K = kron_all(self.mats)
        if o.kind == "soap":
            self.D = b2 * self.D + w * (K.T @ G.reshape(-1)).reshape(G.shape) ** 2
        b3 = b1 if o.beta3 is None else o.beta3
        filtered = b3 * self.M + (1 - b3) * G
        self.M = b1 * self.M + (1 - b1) * G
        M_hat = filtered / (1.0 - b3 * b1 ** (t - 1))
        self.V += G * G
        graft = M_hat / (self.V.sqrt() + 1e-8)
        if self.grafting and t < self.start:
            P = graft
        elif o.kind == "soap":
            P = (K @ ((K.T @ M_hat.reshape(-1)) / ((self.D.reshape(-1) / bc2) ** 0.5 + self.eps))).reshape(G.shape)
        else:
            P = (kron_all(self.roots()) @ M_hat.reshape(-1)).reshape(G.shape)
        if self.grafting and t >= self.start:       # every kind's direction takes the grafting norm
            P = P * (graft.norm() / P.norm())
        self.p = self.p - self.lr * P


def _config(o: Options) -> object:
    common = dict(factor_dtype=F64, trace_scaling_exponent=o.trace, drop_weighting_factor_on_gsquare=o.drop)
    eigh = EighRootConfig(rank_handling=None if o.pinv is None else PseudoInverse(*o.pinv))
    if o.kind in ("root", "kl"):
        return (KLShampoo if o.kind == "kl" else RootInverseShampoo)(root=eigh, **common)
    if o.kind == "soap":
        return EigenvalueCorrectedShampoo(tolerance=o.tolerance, **common)
    basis = QREigenbasisConfig(iterations=o.qr_iterations, fallback=eigh) if o.qr_iterations else eigh
    cls = EigendecomposedKLShampoo if o.kind == "eigkl" else EigendecomposedShampoo
    return cls(eigenbasis=basis, tolerance=o.tolerance, **common)


def run(shape: tuple[int, ...], o: Options, *, steps: int = 10, freq: int = 2, start: int = 3, lr: float = 0.02,
        beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-10, grafting: bool = True) -> ShardedShampoo:
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64))
    exps = (0.5,) * len(shape) if o.kind == "soap" else (1 / (2 * len(shape)),) * len(shape)
    opt = ShardedShampoo([("w", p)], lr=lr, betas=(beta1, beta2), beta3=o.beta3, epsilon=eps,
                         max_preconditioner_dim=8, precondition_frequency=freq, start_preconditioning_step=start,
                         grafting=AdaGradGrafting(epsilon=1e-8) if grafting else None, preconditioner=_config(o))
    assert [b.shape for b in opt.plan.blocks] == [shape]
    ref = DenseFamily(p, exps, o, lr, beta1, beta2, eps, freq, start, grafting)
    step_in_lockstep(opt, p, ref, steps, TOL)
    skipped = sum(b.refresh_counts.skipped for b in opt.runtime.buckets)
    assert skipped == ref.skipped, f"refreshes kept by the tolerance: ours {skipped}, reference {ref.skipped}"
    return opt


SHAPES = [(6, 5), (3, 4, 5), (7,)]


def _start(shape: tuple[int, ...]) -> int:
    """The first root once every factor is full rank (a 1-D block's factor gains rank 1 per step)."""
    return 8 if len(shape) == 1 else 3


@pytest.mark.parametrize("kind", ["eig", "eigkl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grafting", [True, False], ids=["adagrad", "nograft"])
def test_eigendecomposed_equals_the_explicit_roots(kind, shape, grafting):
    run(shape, Options(kind=kind), steps=12, start=_start(shape), grafting=grafting)


@pytest.mark.parametrize("kind", ["eig", "eigkl"])
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_eigendecomposed_qr_eigenpairs(kind, shape, iterations):
    run(shape, Options(kind=kind, qr_iterations=iterations), steps=12, start=_start(shape), freq=1)


@pytest.mark.parametrize("kind", ["eig", "eigkl", "soap"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
def test_tolerance_keeps_bases_that_still_diagonalise(kind, shape):
    """Every factor is checked at every refresh; some keep their basis (eigenvalues: the Rayleigh quotients)."""
    opt = run(shape, Options(kind=kind, tolerance=0.15), steps=14, freq=1, beta2=0.99,
              grafting=kind != "soap", eps=1e-8 if kind == "soap" else 1e-10)
    counts = opt.runtime.buckets[0].refresh_counts
    assert counts.checked == 12 * len(shape)        # refreshes at steps 3..14, every preconditioned dim
    assert 0 < counts.skipped < counts.checked, (counts.skipped, counts.checked)
    assert counts.skip_rate == counts.skipped / counts.checked


def test_qr_with_tolerance():
    opt = run((6, 5), Options(kind="eig", qr_iterations=1, tolerance=0.15), steps=14, freq=1, beta2=0.99)
    assert opt.runtime.buckets[0].refresh_counts.skipped > 0


@pytest.mark.parametrize("kind", ["root", "kl", "eig", "eigkl", "soap"])
@pytest.mark.parametrize("exponent", [0.5, 0.25])
def test_trace_scaling(kind, exponent):
    # without grafting: grafting would cancel the scalar the trace scaling changes
    run((6, 5), Options(kind=kind, trace=exponent), grafting=False, lr=0.005, eps=1e-8 if kind == "soap" else 1e-10)


@pytest.mark.parametrize("kind", ["root", "kl", "eig", "eigkl", "soap"])
def test_drop_weighting_factor_on_gsquare(kind):
    run((6, 5), Options(kind=kind, drop=True), grafting=False, lr=0.005, eps=1e-8 if kind == "soap" else 1e-10)


@pytest.mark.parametrize("kind", ["root", "eig", "eigkl"])
@pytest.mark.parametrize("pinv", [(0.0, 1e-8), (1e-6, 0.0)])
def test_pseudo_inverse_drops_the_null_space(kind, pinv):
    """A 7-vector's factor has rank 4 at the first root (step 4): its null space gets a zero root (no epsilon)."""
    opt = run((7,), Options(kind=kind, pinv=pinv), steps=6, freq=10, start=4, eps=0.0, grafting=False, lr=0.01)
    if kind != "root":
        state = opt.state[opt.param_groups[0]["params"][0]]["block_0"]
        scales = (state["eigenvalues_0"] > 1e-6 * state["eigenvalues_0"].max()).sum()
        assert int(scales) == 4


@pytest.mark.parametrize("kind", ["root", "kl", "eig", "eigkl", "soap"])
@pytest.mark.parametrize("beta3", [0.81, 0.99])
@pytest.mark.parametrize("grafting", [True, False], ids=["adagrad", "nograft"])
def test_beta3(kind, beta3, grafting):
    run((6, 5), Options(kind=kind, beta3=beta3), grafting=grafting, lr=0.01 if grafting else 0.003,
        eps=1e-8 if kind == "soap" else 1e-10)


def test_beta3_equal_to_beta1_is_the_default_path():
    """beta3 == beta1 takes the plain filtered-gradient path: bit for bit the run without beta3."""
    a = run((6, 5), Options(kind="root", beta3=0.9)).param_groups[0]["params"][0].detach()
    b = run((6, 5), Options(kind="root")).param_groups[0]["params"][0].detach()
    assert torch.equal(a, b)
