"""Spectral and sign descent: the batched orthogonalisation, configs and their errors, named scale functions,
the 2-D blocking and its errors, the start step, serialisation and the planner's numbers."""

from __future__ import annotations

import io

import pytest
import torch

from sharded_shampoo import (SVD, AdaGradGrafting, BlockingConfig, NewtonSchulz, RootInverseShampoo, ShardedShampoo,
                             SignDescent, SpectralDescent, plan_blocks, register_scale_by_dims_fn,
                             register_sign_scale_fn)
from sharded_shampoo.compute.orthogonalize import newton_schulz_, svd_polar_
from sharded_shampoo.compute.workspace import Workspace
from sharded_shampoo.config import config_from_dict, config_to_dict
from sharded_shampoo.planning.blocking import merged_shape
from sharded_shampoo.planning.costs import block_cost, param_state_bytes
from sharded_shampoo.root_schedule import start_of

F64 = torch.float64
MUON = (3.4445, -4.7750, 2.0315)


def _stack(B: int, m: int, n: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _ns(A: torch.Tensor, schedule: list, dtype: torch.dtype) -> torch.Tensor:
    return newton_schulz_(A, torch.empty_like(A), schedule, dtype, Workspace(A.device))


def _polar(A: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh


# ----------------------------------------------------------------------------- the batched math


@pytest.mark.parametrize("m,n", [(9, 4), (4, 9), (6, 6), (1, 7)])
def test_newton_schulz_on_the_gram_side_is_the_textbook_polynomial(m, n):
    A = _stack(5, m, n)
    X = A / A.flatten(1).norm(dim=1).view(-1, 1, 1)
    for a, b, c in [MUON] * 5:
        S = X @ X.mT
        X = a * X + b * S @ X + c * S @ S @ X
    assert torch.allclose(_ns(A.clone(), [MUON] * 5, F64), X, rtol=0, atol=1e-12)


def test_convergent_newton_schulz_reaches_the_polar_factor_and_muon_coefficients_do_not():
    A = _stack(4, 10, 6)
    cubic = _ns(A.clone(), [(1.5, -0.5, 0.0)] * 60, F64)        # X <- 1.5 X - 0.5 X X^T X converges to U V^T
    assert float((cubic - _polar(A)).abs().max()) < 1e-10
    muon = _ns(A.clone(), [MUON] * 5, F64)
    s = torch.linalg.svdvals(muon)
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25 and float((s - 1).abs().max()) > 0.05


def test_newton_schulz_in_fp32_and_bf16_against_fp64():
    A = _stack(6, 12, 7)
    exact = _ns(A.clone(), [MUON] * 5, F64)
    fp32 = _ns(A.float(), [MUON] * 5, torch.float32)
    bf16 = _ns(A.float(), [MUON] * 5, torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32        # the output keeps the math dtype
    assert float((fp32.double() - exact).abs().max()) < 1e-5
    err = float((bf16.double() - exact).norm() / exact.norm())
    assert 1e-4 < err < 5e-2, err      # bf16 GEMMs: about 2-3 significant digits


def test_zero_matrices_give_zero_directions():
    A = torch.zeros(3, 5, 4, dtype=F64)
    assert torch.equal(_ns(A.clone(), [MUON] * 5, F64), A)
    assert torch.equal(svd_polar_(A.clone(), torch.empty_like(A), False), A)


def test_svd_keeps_the_numerical_rank_only():
    U, _ = torch.linalg.qr(_stack(1, 8, 3)[0])
    V, _ = torch.linalg.qr(_stack(1, 5, 3, seed=1)[0])
    A = (U * torch.tensor([3.0, 1.0, 0.0], dtype=F64)) @ V.T       # rank 2
    P = svd_polar_(A[None].clone(), torch.empty(1, 8, 5, dtype=F64), False)[0]
    assert float((P - U[:, :2] @ V[:, :2].T).abs().max()) < 1e-12
    full = _stack(2, 8, 5)
    nuclear = svd_polar_(full.clone(), torch.empty_like(full), True)
    expected = _polar(full) * torch.linalg.svdvals(full).sum(-1).view(-1, 1, 1)
    assert float((nuclear - expected).abs().max()) < 1e-10


# ----------------------------------------------------------------------------- configs and their errors


def _not_registered(d_in: int, d_out: int) -> float:
    return 1.0


@pytest.mark.parametrize("make,match", [
    (lambda: NewtonSchulz(num_iterations=0), "NewtonSchulz.num_iterations"),
    (lambda: NewtonSchulz(coefficients=(1.0, 2.0)), "NewtonSchulz.coefficients"),
    (lambda: NewtonSchulz(coefficients=(1.0, float("nan"), 0.0)), "NewtonSchulz.coefficients"),
    (lambda: NewtonSchulz(num_iterations=2, coefficients=(MUON, MUON, MUON)), "3 triples for num_iterations=2"),
    (lambda: NewtonSchulz(matmul_dtype=torch.float16), "NewtonSchulz.matmul_dtype"),
    (lambda: NewtonSchulz(scale_by_dims_fn="nope"), "NewtonSchulz.scale_by_dims_fn .*register_scale_by_dims_fn"),
    (lambda: NewtonSchulz(scale_by_dims_fn=_not_registered), "not_registered.*register_scale_by_dims_fn"),
    (lambda: SVD(scale_by_nuclear_norm=1), "SVD.scale_by_nuclear_norm"),
    (lambda: SVD(scale_by_dims_fn=lambda i, o: 1.0), "SVD.scale_by_dims_fn"),
    (lambda: SpectralDescent(orthogonalization="ns"), "SpectralDescent.orthogonalization"),
    (lambda: SpectralDescent(factor_dtype=torch.bfloat16), "SpectralDescent.factor_dtype"),
    (lambda: SignDescent(scale_fn=lambda g: g.abs().sum()), "SignDescent.scale_fn .*register_sign_scale_fn"),
    (lambda: SignDescent(factor_dtype=torch.float16), "SignDescent.factor_dtype"),
    (lambda: register_scale_by_dims_fn("muon", _not_registered), "already registered"),
    (lambda: register_sign_scale_fn("", lambda g: 1.0), "non-empty string name"),
])
def test_bad_values_name_the_field_and_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _quarter(d_in: int, d_out: int) -> float:
    return 0.25


def _zero(d_in: int, d_out: int) -> float:
    return 0.0


def _per_row(G: torch.Tensor) -> torch.Tensor:
    return G.abs().flatten(1)         # [B, numel]: not one number per block


def _shape_dependent(G: torch.Tensor) -> torch.Tensor:
    return G.abs().flatten(1).sum(1) if G.shape[-1] == 4 else G.abs().flatten(1)     # passes the probe only


register_scale_by_dims_fn("test_quarter", _quarter)
register_sign_scale_fn("test_shape_dependent", _shape_dependent)
register_scale_by_dims_fn("test_zero", _zero)


def test_a_registered_callable_is_stored_by_name_and_the_name_round_trips():
    register_scale_by_dims_fn("test_quarter", _quarter)           # the same function again: a no-op
    config = SpectralDescent(NewtonSchulz(scale_by_dims_fn=_quarter, coefficients=[list(MUON)] * 5))
    assert config.orthogonalization.scale_by_dims_fn == "test_quarter"
    assert config == SpectralDescent(NewtonSchulz(scale_by_dims_fn="test_quarter", coefficients=(MUON,) * 5))
    data = config_to_dict(config)
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    back = config_from_dict(torch.load(buf, weights_only=True))     # a checkpoint holds no code
    assert back == config and hash(back) == hash(config)
    for other in (SpectralDescent(SVD(scale_by_nuclear_norm=True, scale_by_dims_fn="muon"), factor_dtype=F64),
                  SignDescent(scale_fn="l1_norm", factor_dtype=F64)):
        assert config_from_dict(config_to_dict(other)) == other and other != type(other)()


def test_loading_a_config_whose_function_is_not_registered_says_what_to_register():
    with pytest.raises(ValueError, match="'mine'.*register_sign_scale_fn"):
        config_from_dict({"__config__": "SignDescent", "scale_fn": "mine"})


def test_scale_functions_that_return_nonsense_are_named():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="scale_by_dims_fn 'test_zero' returned 0.0 for d_in=3, d_out=4"):
        ShardedShampoo([("w", w)], preconditioner=SpectralDescent(NewtonSchulz(scale_by_dims_fn="test_zero")))
    with pytest.raises(ValueError, match="'test_per_row' returned \\(2, 12\\) for a stack of 2 blocks.*flatten"):
        register_sign_scale_fn("test_per_row", _per_row)
    opt = ShardedShampoo([("w", w)], preconditioner=SignDescent(scale_fn="test_shape_dependent"), grafting=None)
    w.grad = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'test_shape_dependent' returned a tensor of shape \\(1, 12\\)"):
        opt.step()


# ----------------------------------------------------------------------------- blocking


def test_blocks_merge_toward_two_dims_only_for_spectral_descent():
    assert merged_shape((2, 3, 4), 64) == (24,) and merged_shape((2, 3, 4), 64, min_order=2) == (2, 12)
    assert merged_shape((5, 1, 3, 2), 64, min_order=2) == (5, 6)
    assert merged_shape((16, 8), 1024, min_order=2) == (16, 8)      # Shampoo: one 128 x 128 factor
    blocks = plan_blocks([("w", (16, 8)), ("c", (4, 2, 3, 5))], 1 << 20, SpectralDescent())
    assert [b.shape for b in blocks] == [(16, 8), (4, 30)]
    assert all(b.exponents == (0.25, 0.25) and b.preconditioned for b in blocks)
    assert [b.shape for b in plan_blocks([("w", (16, 8))], 1024, RootInverseShampoo())] == [(128,)]


@pytest.mark.parametrize("shape,kw,match", [
    ((16,), {}, "parameter 'p' of shape \\(16,\\) gives 1-D blocks.*precondition_1d=False"),
    ((1, 64), {}, "parameter 'p' of shape \\(1, 64\\) gives 1-D blocks.*size-1 dims"),
    ((), {}, "1-D blocks"),
    ((32, 16, 8), {"max_preconditioner_dim": 64}, "3-D blocks.*max_preconditioner_dim \\(now 64\\) to at least 128"),
    ((6, 4, 5), {"blocking": BlockingConfig(merge_dims=False)}, "3-D blocks.*BlockingConfig\\(merge_dims=True\\)"),
    ((3, 4, 5, 6), {"blocking": BlockingConfig(batch_dims=1), "max_preconditioner_dim": 8}, "at least 30"),
])
def test_blocks_spectral_descent_cannot_take_name_the_parameter_and_the_fix(shape, kw, match):
    p = torch.nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError, match=match):
        ShardedShampoo([("p", p)], preconditioner=SpectralDescent(), **kw)


def test_no_shared_config_object_is_changed():
    """The reference sets target_parameter_dimensionality = 2 on the config object it is given (S7); here a
    spectral optimizer leaves every default and shared object as it was."""
    blocking = BlockingConfig()
    before = (blocking, config_to_dict(blocking))
    w = torch.nn.Parameter(torch.randn(2, 3, 4))
    ShardedShampoo([("w", w)], preconditioner=SpectralDescent(), blocking=blocking, max_preconditioner_dim=64)
    assert (blocking, config_to_dict(blocking)) == before and BlockingConfig() == blocking
    later = ShardedShampoo([("w", torch.nn.Parameter(torch.randn(2, 3, 4)))], max_preconditioner_dim=64)
    assert [b.shape for b in later.plan.blocks] == [(24,)]


def test_1d_blocks_may_fall_back_to_grafting_in_the_same_group():
    params = [("w", torch.nn.Parameter(torch.randn(6, 4))), ("b", torch.nn.Parameter(torch.randn(6)))]
    opt = ShardedShampoo(params, preconditioner=SpectralDescent(), blocking=BlockingConfig(precondition_1d=False))
    kinds = {b.shape: b.kind.preconditions for b in opt.runtime.buckets}
    assert kinds == {(6, 4): True, (6,): False}


# ----------------------------------------------------------------------------- schedule, state, costs


def test_preconditioning_starts_at_step_1_without_a_refresh_to_wait_for():
    group = {"start_preconditioning_step": None, "precondition_frequency": 100}
    assert start_of({**group, "preconditioner": SpectralDescent()}) == 1
    assert start_of({**group, "preconditioner": SignDescent()}) == 1
    assert start_of({**group, "preconditioner": RootInverseShampoo()}) == 100
    assert start_of({**group, "start_preconditioning_step": 7, "preconditioner": SpectralDescent()}) == 7


def test_an_explicit_start_uses_the_grafting_direction_before_it():
    def run(start):
        w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
        opt = ShardedShampoo([("w", w)], lr=0.1, preconditioner=SpectralDescent(), grafting=AdaGradGrafting(),
                             start_preconditioning_step=start)
        out = []
        for t in range(3):
            w.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(t + 1))
            opt.step()
            out.append(w.detach().clone())
        return out

    spectral, late = run(None), run(3)
    adagrad = []
    w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    ref = torch.optim.Adagrad([w], lr=0.1, eps=1e-10)
    for t in range(2):
        w.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(t + 1)) * 0.1   # (1 - beta1) M_hat = g
        ref.step()
        adagrad.append(w.detach().clone())
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(spectral[:2], late[:2]))
    assert float((late[0] - adagrad[0]).abs().max()) < 1e-6 and float((late[2] - late[1]).abs().max()) > 1e-3


def test_no_state_beyond_the_common_fields_and_planner_bytes_are_allocated_bytes():
    params = [("w", torch.nn.Parameter(torch.randn(40, 12))), ("c", torch.nn.Parameter(torch.randn(3, 4, 5)))]
    for pre in (SpectralDescent(), SpectralDescent(SVD()), SignDescent(scale_fn="l1_norm")):
        opt = ShardedShampoo(params, preconditioner=pre, max_preconditioner_dim=16, grafting=None)
        for p in opt.state:
            for block in opt.state[p].values():
                assert set(block) == {"step", "root_failures", "filtered_grad"}
        allocated = sum(t.numel() * t.element_size() for b in opt.runtime.buckets for t in b.state.values())
        assert allocated == opt.plan.ranks[0].optimizer_state_bytes
        for b in opt.plan.blocks:
            largest, total, count = param_state_bytes(b.param_shape, 16, pre, None, 0.9)
            assert total == sum(block_cost(x, pre, None, 0.9).total_state_bytes for x in opt.plan.blocks
                                if x.param_name == b.param_name)


def test_modeled_flops_and_workspace():
    b = plan_blocks([("w", (64, 16))], 1 << 20, SpectralDescent())[0]
    ns = block_cost(b, SpectralDescent(NewtonSchulz(num_iterations=5)), None, 0.0)
    assert ns.step_flops == 5 * (4 * 64 * 16 ** 2 + 2 * 16 ** 3) + 4 * 64 * 16
    assert ns.amortized_flops == 0 and ns.amortized_workspace_bytes == (2 * 64 * 16 + 2 * 16 * 16) * 4
    bf16 = block_cost(b, SpectralDescent(NewtonSchulz(matmul_dtype=torch.bfloat16)), None, 0.0)
    assert bf16.amortized_workspace_bytes == ns.amortized_workspace_bytes // 2
    svd = block_cost(b, SpectralDescent(SVD()), None, 0.0)
    assert svd.step_flops == 6 * 64 * 16 ** 2 + 20 * 16 ** 3 + 2 * 64 * 16 * 16 + 4 * 64 * 16
    sign = block_cost(b, SignDescent(scale_fn="l1_norm"), None, 0.9)
    assert sign.step_flops == (2 + 2 + 3) * 64 * 16 and sign.total_state_bytes == 16 + 64 * 16 * 4
