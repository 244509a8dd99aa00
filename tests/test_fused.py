"""Fewer passes, same math: tiled factor updates, out=/scratch products, fused (compiled) element-wise kernels."""

from __future__ import annotations

import warnings

import pytest
import torch

import sharded_shampoo.compute.elementwise as ew
from sharded_shampoo import AdamGrafting, ShardedShampoo
from sharded_shampoo.compute.kron import apply_kronecker, gram, gram_scratch_numel, gram_update_


@pytest.fixture(autouse=True)
def fresh_compiled_kernels():
    """Each test starts with empty compile caches and kernel state: dynamo's recompile limit counts every
    signature that earlier tests of this process compiled, and a kernel that hits it runs eagerly from then on
    (the tests that check the compiled path would then compare eager with eager, or fail their compiled check)."""
    torch.compiler.reset()
    for kernel in (ew.FUSED_MOMENTS_GRAFT, ew.FUSED_RESCALE):
        kernel.compiled, kernel.failed, kernel.signatures, kernel.eager_calls = None, None, set(), 0
    yield


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d,r,tile", [(48, 30, 16), (50, 7, 16), (31, 64, 16), (20, 20, 16)])
def test_gram_update_equals_baddbmm(d, r, tile):
    X = rand(3, d, r)
    F0 = rand(3, d, d, seed=1)
    F0 = F0 + F0.mT
    expected = F0.clone().baddbmm_(X, X.mT, beta=0.9, alpha=0.1)
    for scratch in (None, torch.empty(gram_scratch_numel(3, d, tile))):
        F = F0.clone()
        gram_update_(F, X, beta=0.9, alpha=0.1, tile=tile, scratch=scratch)
        assert torch.allclose(F, expected, rtol=1e-6, atol=1e-6)
        # the tiles below the diagonal are exact mirrors of the computed ones
        if d >= 2 * tile:
            assert torch.equal(F[:, tile:, :tile], F[:, :tile, tile:].mT)
    # beta = 0 ignores the old values, NaN included
    F = torch.full((3, d, d), float("nan"))
    gram_update_(F, X, beta=0.0, alpha=2.0, tile=tile)
    assert torch.allclose(F, 2 * X @ X.mT, rtol=1e-6, atol=1e-5)
    # bfloat16 operands: within bf16 rounding of the fp32 product
    G = gram(X, torch.bfloat16, tile=tile)
    assert G.dtype == torch.bfloat16
    assert float((G.float() - X @ X.mT).abs().max() / (X @ X.mT).abs().max()) < 2e-2


@pytest.mark.parametrize("order", [1, 2, 3])
def test_apply_kronecker_out_and_scratch(order):
    shape = (4, 5, 3)[:order]
    X = rand(2, *shape)
    mats = [rand(2, d, d, seed=10 + i) for i, d in enumerate(shape)]
    expected = apply_kronecker(X, mats)
    out = torch.empty_like(X)
    got = apply_kronecker(X, mats, out=out, scratch=torch.empty(X.numel()))
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert got.data_ptr() == out.data_ptr()               # the last product went into out
    # out aliasing the input: a single product cannot write into its own input, so a new tensor comes back
    Y = X.clone()
    got = apply_kronecker(Y, mats, out=Y, scratch=torch.empty(X.numel()))
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    if order == 1:
        assert got.data_ptr() != Y.data_ptr()


def _graft_inputs(seed: int = 0):
    G, M, V = rand(3, 8, 6, seed=seed), rand(3, 8, 6, seed=seed + 1), rand(3, 8, 6, seed=seed + 2).abs()
    a, c = rand(3, 1, 1, seed=seed + 3).abs() + 0.5, torch.full((3, 1, 1), 1e-8)
    return G, M, V, a, c


def test_graft_eager_matches_formula():
    G, M, V, a, c = _graft_inputs()
    Mx = M + 0.1 * (G - M)
    Vx = 0.9 * V + 0.1 * G * G
    D = Mx / (Vx.sqrt() * a + c)
    for direction in (False, True):
        G1, M1, V1 = G.clone(), M.clone(), V.clone()
        out, norm = ew.moments_and_graft(G1, M1, V1, 0.9, 0.9, 0.1, a, c, direction, compiled=False)
        assert torch.allclose(M1, Mx, rtol=1e-6) and torch.allclose(V1, Vx, rtol=1e-6)
        assert torch.allclose(norm, D.flatten(1).norm(dim=1), rtol=1e-6)
        if direction:
            assert torch.allclose(out, D, rtol=1e-6) and out.data_ptr() == G1.data_ptr()
    # beta1 = 0: M is G, and G keeps its values when only the norm is needed
    G1, V1 = G.clone(), V.clone()
    _, norm = ew.moments_and_graft(G1, None, V1, 0.0, 0.9, 0.1, a, c, False, compiled=False)
    assert torch.equal(G1, G)
    assert torch.allclose(norm, (G / ((0.9 * V + 0.1 * G * G).sqrt() * a + c)).flatten(1).norm(dim=1), rtol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_beta3_filtered_gradient_matches_formula(compiled, masked):
    """beta3: M <- lerp(M, G, 1 - beta1) as before, and the direction comes from beta3 M_old + (1 - beta3) G
    (left in G when only the norm is needed); a masked step's inactive block keeps M and V bit for bit."""
    for direction in (False, True):
        G, M, V, a, c = _graft_inputs(seed=11)
        m_weight = v_beta = None
        if masked:
            G[1] = 0.0                                   # the bucket zeroes an inactive block's rows first
            m_weight = torch.tensor([0.1, 0.0, 0.1]).view(3, 1, 1)
            v_beta = torch.tensor([0.9, 1.0, 0.9]).view(3, 1, 1)
        Mx = M + 0.1 * (G - M) if not masked else M + m_weight * (G - M)
        filtered = 0.7 * M + 0.3 * G
        Vx = 0.9 * V + 0.1 * G * G if not masked else v_beta * V + 0.1 * G * G
        D = filtered / (Vx.sqrt() * a + c)
        G1, M1, V1 = G.clone(), M.clone(), V.clone()
        out, norm = ew.moments_and_graft(G1, M1, V1, 0.9, 0.9 if v_beta is None else v_beta, 0.1, a, c, direction,
                                         compiled=compiled, m_weight=m_weight, beta3=0.7)
        assert torch.allclose(M1, Mx, rtol=1e-6, atol=1e-7) and torch.allclose(V1, Vx, rtol=1e-6, atol=1e-7)
        if masked:
            assert torch.equal(M1[1], M[1]) and torch.equal(V1[1], V[1])
        active = [0, 2] if masked else [0, 1, 2]
        assert torch.allclose(norm[active], D.flatten(1).norm(dim=1)[active], rtol=1e-6)
        assert torch.allclose(G1[active], (D if direction else filtered)[active], rtol=1e-6, atol=1e-7)
        assert direction or out is None
    if compiled:
        assert ew.FUSED_MOMENTS_GRAFT.failed is None, ew.FUSED_MOMENTS_GRAFT.failed


def test_compiled_kernels_match_eager():
    """The torch.compile kernels give the eager results within 1e-6 (relative) -- float rounding only."""
    for direction in (False, True):
        G, M, V, a, c = _graft_inputs(seed=5)
        Ge, Me, Ve = G.clone(), M.clone(), V.clone()
        out_e, norm_e = ew.moments_and_graft(Ge, Me, Ve, 0.9, 0.99, 0.01, a, c, direction, compiled=False)
        out_c, norm_c = ew.moments_and_graft(G, M, V, 0.9, 0.99, 0.01, a, c, direction, compiled=True)
        assert ew.FUSED_MOMENTS_GRAFT.failed is None, ew.FUSED_MOMENTS_GRAFT.failed
        assert torch.allclose(M, Me, rtol=1e-6, atol=1e-7) and torch.allclose(V, Ve, rtol=1e-6, atol=1e-7)
        assert torch.allclose(norm_c, norm_e, rtol=1e-6)
        if direction:
            assert torch.allclose(out_c, out_e, rtol=1e-6, atol=1e-7)
    P, target = rand(3, 8, 6, seed=9), torch.tensor([1.0, 2.0, 0.5])
    eager = ew.rescale(P.clone(), target, torch.empty_like(P), compiled=False)
    fused = ew.rescale(P.clone(), target, torch.empty_like(P), compiled=True)
    assert ew.FUSED_RESCALE.failed is None
    assert torch.allclose(fused, eager, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fused.flatten(1).norm(dim=1), target, rtol=1e-6)


def test_compiled_optimizer_matches_eager():
    """One step: the same parameters to 1e-7. Over steps rounding differences are amplified by the
    inverse roots like any others (by ~1e4 per step with epsilon = 1e-8 on these rank-deficient
    factors), so the 5-step bound uses a well-conditioned epsilon."""
    def run(mode: str, steps: int, epsilon: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
        opt = ShardedShampoo(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99), epsilon=epsilon,
                             precondition_frequency=2, grafting=AdamGrafting(), elementwise=mode)
        x = rand(32, 12, seed=3)
        for _ in range(steps):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for steps, epsilon, bound in ((1, 1e-8, 1e-7), (5, 1e-4, 1e-5)):
        for a, b in zip(run("eager", steps, epsilon), run("compile", steps, epsilon)):
            assert float((a - b).norm() / b.norm()) < bound


def test_compiled_spectral_and_sign_descent_match_eager():
    """The kinds whose direction is not linear in M (M_hat goes in, the direction comes out as it is) take the
    same compiled element-wise path: 4 steps with Adam grafting, 1-D blocks on grafting, to float32 round-off."""
    from sharded_shampoo import BlockingConfig, SignDescent, SpectralDescent

    def run(pre: object, mode: str) -> list[torch.Tensor]:
        params = [("w", torch.nn.Parameter(rand(12, 8, seed=0))), ("b", torch.nn.Parameter(rand(12, seed=1)))]
        opt = ShardedShampoo(params, lr=1e-2, preconditioner=pre, grafting=AdamGrafting(), elementwise=mode,
                             blocking=BlockingConfig(precondition_1d=False))
        for t in range(4):
            for i, (_, p) in enumerate(params):
                p.grad = rand(*p.shape, seed=10 * t + i + 2)
            opt.step()
        return [p.detach().clone() for _, p in params]

    for pre in (SpectralDescent(), SignDescent(scale_fn="l1_norm")):
        for a, b in zip(run(pre, "eager"), run(pre, "compile")):
            assert float((a - b).norm() / b.norm()) < 1e-6, type(pre).__name__
    # the compiled kernels really ran (a compile failure would fall back to eager and prove nothing)
    assert ew.FUSED_MOMENTS_GRAFT.failed is None and ew.FUSED_RESCALE.failed is None


def test_compile_failure_falls_back_once(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    kernel = ew.CompiledKernel(lambda x: x * 2)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
        assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))
    assert kernel.failed is not None and "no C++ compiler" in kernel.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no second warning
        assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))
    assert kernel.eager_calls == 2


def test_compiled_signatures_are_bounded(monkeypatch):
    compiled_calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: compiled_calls.append(1) or fn(*a)))
    kernel = ew.CompiledKernel(lambda x: x + 1, max_signatures=2)
    for n in (1, 2, 1, 3, 4, 2):
        assert torch.equal(kernel(torch.zeros(n)), torch.ones(n))
    assert len(kernel.signatures) == 2 and kernel.eager_calls == 2 and len(compiled_calls) == 4


def test_elementwise_setting_is_validated():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="elementwise must be one of"):
        ShardedShampoo([p], elementwise="fast")
