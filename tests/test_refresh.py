"""Cheap root refreshes: warm-started inverse roots and QR eigenbases, their accuracy and fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from sharded_shampoo.compute.matrix_functions import eigenbasis, inverse_root_eigh
from sharded_shampoo.compute.refresh import RefreshCounts, permute_along, refresh_factor
from sharded_shampoo.compute.warm_refresh import (binomial_coefficients, eigenbasis_qr, eigenbasis_residual,
                                                  frame_distance, inverse_root_warm, series_order,
                                                  whitening_residual)
from sharded_shampoo.config import (EigenvalueCorrectedShampoo, EighRootConfig, QREigenbasisConfig,
                                    RootInverseShampoo, WarmStartRootConfig)


def wishart(B: int, d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(B, d, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return G @ G.mT


def exact_root(A: torch.Tensor, exponent: float) -> torch.Tensor:
    L, Q = torch.linalg.eigh(A.double())
    return (Q * L.pow(-exponent).unsqueeze(-2)) @ Q.mT


def rel(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (X.double() - Y).flatten(1).norm(dim=1) / Y.flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def drifted():
    """A well-conditioned factor, its root, and the factor 1% later (an EMA step with a fresh sample)."""
    A0 = wishart(3, 48, 4 * 48, 0)
    A1 = 0.99 * A0 + 0.01 * wishart(3, 48, 48, 1)
    return A0.float(), A1.float()


def test_binomial_series_matches_power():
    x = torch.linspace(-0.4, 0.4, 9, dtype=torch.float64)
    for e in (0.25, 0.5, 1.0 / 6):
        c = binomial_coefficients(e, 30)
        series = sum(ck * x ** k for k, ck in enumerate(c))
        assert torch.allclose(series, (1 + x) ** -e, rtol=0, atol=1e-12)
    # the order meets its truncation bound, and is capped
    K = series_order(0.1, 0.25, 1e-8, 20)
    assert abs(binomial_coefficients(0.25, K + 1)[K + 1]) * 0.1 ** (K + 1) / 0.9 <= 1e-8
    assert series_order(0.1, 0.25, 1e-8, 3) == 3 and series_order(1.5, 0.25, 1e-3, 5) == 5


def test_whitening_residual_estimates_rms_eigenvalue_error():
    A = wishart(4, 64, 256, 2)
    X = exact_root(A, 0.25)
    assert float(whitening_residual(X, A, 2, 8).max()) < 1e-10
    # a root off by a known factor (1 + t): X^2 A X^2 = (1 + t)^4 I
    est = whitening_residual(1.01 * X, A, 2, 32)
    assert torch.allclose(est, torch.full_like(est, 1.01 ** 4 - 1), rtol=1e-6)


def test_warm_root_is_accurate_on_a_drifted_factor(drifted):
    A0, A1 = drifted
    eps = 1e-6
    R0, _ = inverse_root_eigh(A0, 0.25, eps)
    X, ok, report = inverse_root_warm(A1, R0, 0.25, eps, WarmStartRootConfig(tolerance=1e-3))
    assert bool(ok.all()) and not bool(report.fell_back.any())
    assert 1 <= report.order <= 6
    truth = exact_root(A1.double() + eps * torch.eye(48, dtype=torch.float64), 0.25)
    assert float(rel(X, truth).max()) < 2e-4
    assert float(report.residual.max()) <= 1e-3
    # the estimate is the real whitening residual of the result (fp64 check, many probes)
    real = whitening_residual(X.double(), A1.double() + eps * torch.eye(48, dtype=torch.float64), 2, 64)
    assert torch.allclose(report.residual, real.float(), rtol=0.6)


def test_warm_root_falls_back_to_eigh_exactly():
    A = wishart(4, 32, 64, 3).float()
    eye = torch.eye(32).repeat(4, 1, 1)
    far = inverse_root_eigh(wishart(4, 32, 64, 9).float(), 0.25, 1e-6)[0]
    expected, _ = inverse_root_eigh(A, 0.25, 1e-6)
    for prev in (eye, far):                       # first refresh; a previous root of another matrix
        X, ok, report = inverse_root_warm(A, prev, 0.25, 1e-6)
        assert bool(report.fell_back.all()) and bool(ok.all())
        assert torch.equal(X, expected)
    # a residual above the tolerance falls back too
    R = inverse_root_eigh(A, 0.25, 1e-6)[0]
    X, ok, report = inverse_root_warm(A * 1.3, R, 0.25, 1e-6, WarmStartRootConfig(tolerance=1e-12, max_order=1))
    assert bool(report.fell_back.all())
    assert torch.equal(X, inverse_root_eigh(A * 1.3, 0.25, 1e-6)[0])


def test_warm_root_flags_non_finite_and_checks_exponent(drifted):
    A0, A1 = drifted
    R0, _ = inverse_root_eigh(A0, 0.5, 1e-6)
    A = A1.clone()
    A[1, 0, 0] = math.nan
    X, ok, _ = inverse_root_warm(A, R0, 0.5, 1e-6)
    assert ok.tolist() == [True, False, True]
    assert bool(torch.isfinite(X[0]).all()) and bool(torch.isfinite(X[2]).all())
    with pytest.raises(ValueError, match="1/\\(2q\\)"):
        inverse_root_warm(A1, R0, 0.3, 1e-6)


def test_frame_distance_screens(drifted):
    A0, A1 = drifted
    R0, _ = inverse_root_eigh(A0, 0.25, 1e-6)
    near = frame_distance(R0, A1 + 1e-6 * torch.eye(48), 2, 8)
    other = torch.diag(torch.logspace(-2, 2, 48)).repeat(3, 1, 1)     # the root of a very different factor
    far = frame_distance(other, A1, 2, 8)
    assert float(near.max()) < 0.1 and float(far.min()) > 0.5


def test_qr_eigenbasis_refresh(drifted):
    A0, A1 = drifted
    Q0, _ = eigenbasis(A0)
    Q, ok, order, report = eigenbasis_qr(A1, Q0, 0.0, QREigenbasisConfig(iterations=1))
    assert bool(ok.all()) and not bool(report.fell_back.any())
    # a valid permutation per matrix; Q orthonormal; nearly diagonalises the new factor
    assert torch.equal(order.sort(dim=-1).values, torch.arange(48).expand(3, 48))
    assert torch.allclose(Q.mT @ Q, torch.eye(48).expand(3, 48, 48), atol=1e-5)
    before = eigenbasis_residual(A1, Q0)
    after = eigenbasis_residual(A1, Q)
    exact = eigenbasis_residual(A1, eigenbasis(A1)[0])
    # (subspace iteration converges slowly where eigenvalues are close, as in a Wishart matrix)
    assert bool((after < 0.8 * before).all()) and float(after.max()) < 0.01 and float(exact.max()) < 1e-5
    # columns are in descending order of the estimated eigenvalues
    est = (Q * (A1 @ Q)).sum(-2)
    assert bool((est[:, :-1] >= est[:, 1:] - 1e-6 * est[:, :1]).all())
    # more iterations get closer
    Q3, *_ = eigenbasis_qr(A1, Q0, 0.0, QREigenbasisConfig(iterations=3))
    assert bool((eigenbasis_residual(A1, Q3) < after).all())


def test_qr_eigenbasis_first_refresh_is_eigh(drifted):
    _, A1 = drifted
    Q, ok, order, report = eigenbasis_qr(A1, torch.eye(48).repeat(3, 1, 1), 1e-6)
    assert bool(report.fell_back.all()) and bool(ok.all())
    assert torch.equal(Q, eigenbasis(A1, 1e-6)[0])
    assert torch.equal(order, torch.arange(48).expand(3, 48))


@pytest.mark.parametrize("d", [5, 6, 7, 48, 257])
def test_identity_basis_detected_for_every_size(d):
    """The never-refreshed basis is recognised at every size (``matrix_norm(I) ** 2`` is not ``d`` in fp32 for
    ``d = 6, 7``), so a first QR refresh is an exact eigh for every size."""
    A = wishart(2, d, 3 * d, seed=d).float()
    Q, ok, order, report = eigenbasis_qr(A, torch.eye(d).repeat(2, 1, 1), 1e-6)
    assert bool(report.fell_back.all()) and torch.equal(Q, eigenbasis(A, 1e-6)[0])


def test_refresh_dispatch_counts(drifted):
    A0, A1 = drifted
    counts = RefreshCounts()
    R0 = refresh_factor(A0, torch.eye(48).repeat(3, 1, 1), 0.25, 1e-6, RootInverseShampoo(root=WarmStartRootConfig()),
                        counts).matrices
    assert (counts.warm, counts.fallback, counts.full) == (0, 3, 0)
    refresh_factor(A1, R0, 0.25, 1e-6, RootInverseShampoo(root=WarmStartRootConfig()), counts)
    assert (counts.warm, counts.fallback) == (3, 3) and len(counts.residuals) == 3
    refresh_factor(A1, R0, 0.25, 1e-6, RootInverseShampoo(root=EighRootConfig()), counts)
    assert counts.full == 3
    res = refresh_factor(A1, torch.eye(48).repeat(3, 1, 1), 0.5, 1e-6,
                         EigenvalueCorrectedShampoo(eigenbasis=QREigenbasisConfig()), counts)
    assert res.permutation is not None and counts.fallback == 6


def test_permute_along():
    X = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    perm = torch.tensor([[2, 0, 1], [0, 1, 2]])
    out = permute_along(X, 0, perm)
    assert torch.equal(out[0], X[0][[2, 0, 1]]) and torch.equal(out[1], X[1])
    perm = torch.tensor([[3, 2, 1, 0], [1, 0, 3, 2]])
    out = permute_along(X, 1, perm)
    assert torch.equal(out[0], X[0][:, [3, 2, 1, 0]]) and torch.equal(out[1], X[1][:, [1, 0, 3, 2]])


# ----------------------------------------------------------------------------- in the optimizer


def _train_small(pre, steps: int, epsilon: float = 1e-4, seed: int = 0):
    from sharded_shampoo import AdamGrafting, ShardedShampoo

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 24, generator=g)
    Y = X @ torch.randn(24, 8, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    opt = ShardedShampoo(model.named_parameters(), lr=3e-3, betas=(0.9, 0.999), epsilon=epsilon,
                         max_preconditioner_dim=32, precondition_frequency=4, grafting=AdamGrafting(),
                         preconditioner=pre)
    for _ in range(steps):
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach()), opt, model


def test_warm_roots_in_the_optimizer_track_eigh():
    """Accepted warm roots are within the tolerance of eigh's, so training follows the eigh run closely."""
    loss_e, _, model_e = _train_small(RootInverseShampoo(), 40)
    loss_w, opt, model_w = _train_small(RootInverseShampoo(root=WarmStartRootConfig(tolerance=1e-2)), 40)
    counts = [b.refresh_counts for b in opt.runtime.buckets]
    assert sum(c.warm for c in counts) > 0 and sum(c.fallback for c in counts) > 0
    assert max(r for c in counts for r in c.residuals) <= 1e-2
    assert abs(loss_w - loss_e) / loss_e < 0.01
    for a, b in zip(model_w.parameters(), model_e.parameters()):
        assert float((a - b).norm() / b.norm()) < 0.02


def test_qr_eigenbases_in_the_optimizer():
    """QR refreshes keep the corrected eigenvalues aligned (permuted in place, the state views stay live)
    and train like eigh refreshes."""
    loss_e, _, _ = _train_small(EigenvalueCorrectedShampoo(), 40)
    loss_q, opt, model = _train_small(EigenvalueCorrectedShampoo(eigenbasis=QREigenbasisConfig()), 40)
    bucket = opt.runtime.buckets[0]
    assert bucket.refresh_counts.warm > 0
    state = opt.state[next(iter(model.parameters()))]["block_0"]
    assert state["eigenvalues"].data_ptr() == bucket.state["eigenvalues"][0].data_ptr()
    assert abs(loss_q - loss_e) / loss_e < 0.05


def test_warm_backoff_skips_after_failed_attempts():
    from sharded_shampoo.compute.refresh import WarmBackoff

    b = WarmBackoff(2)
    pattern = []
    for _ in range(20):
        attempted = b.attempt([0, 1])
        pattern.append(attempted[0])
        b.record([0, 1], attempted, [True, False])      # block 0 always fails, block 1 always succeeds
    # block 0 tries at refreshes 0, 2, 5, 10, 19 (waits 1, 2, 4, 8); block 1 every time
    assert [i for i, a in enumerate(pattern) if a] == [0, 2, 5, 10, 19]
    assert b.attempt([1]) == [True]
    b.record([0], [True], [False])
    assert b.wait[0] == 0 and b.span[0] == 0
