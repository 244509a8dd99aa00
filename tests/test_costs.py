"""Cost model: exact state bytes by kind, modeled FLOPs and workspace, by config and dtype."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo.planning.blocking import plan_blocks
from sharded_shampoo.config import (
    AdaGradGrafting,
    AdamGrafting,
    BlockingConfig,
    CoupledNewtonConfig,
    EigenvalueCorrectedShampoo,
    EighRootConfig,
    RMSpropGrafting,
    RootInverseShampoo,
    SGDGrafting,
)
from sharded_shampoo.planning.costs import (
    BLOCK_STATE_KINDS,
    CostModel,
    block_amortized_flops,
    block_amortized_workspace_bytes,
    block_cost,
    block_state_bytes,
    block_step_flops,
)

SHAMPOO = RootInverseShampoo()


def one_block(shape, pre=SHAMPOO, max_dim=1024, blocking=BlockingConfig()):
    blocks = plan_blocks([("w", shape)], max_dim, pre, blocking)
    assert len(blocks) == 1
    return blocks[0]


def stored(d: int, packed: bool) -> int:
    """Numbers stored for a symmetric d x d matrix: its upper triangle when packed."""
    return d * (d + 1) // 2 if packed else d * d


@pytest.mark.parametrize("packed", [True, False])
def test_state_bytes_root_inverse_fp32(packed):
    pre = RootInverseShampoo(symmetric_packing=packed)
    b = one_block((512, 256), pre)
    got = block_state_bytes(b, pre, AdaGradGrafting(), beta1=0.9)
    square = (stored(512, packed) + stored(256, packed)) * 4
    assert got == {"factors": square, "roots": square, "eigenvalues": 0, "grafting": 512 * 256 * 4,
                   "filtered_grad": 512 * 256 * 4, "counters": 16}
    assert tuple(got) == BLOCK_STATE_KINDS


@pytest.mark.parametrize("packed", [True, False])
def test_state_bytes_fp64_factors_and_no_optional_state(packed):
    pre = RootInverseShampoo(factor_dtype=torch.float64, symmetric_packing=packed)
    b = one_block((100, 30), pre)
    got = block_state_bytes(b, pre, None, beta1=0.0)
    square = (stored(100, packed) + stored(30, packed)) * 8
    assert got == {"factors": square, "roots": square, "eigenvalues": 0, "grafting": 0, "filtered_grad": 0,
                   "counters": 16}
    assert block_state_bytes(b, pre, SGDGrafting(), beta1=0.0)["grafting"] == 0
    for g in (AdaGradGrafting(), RMSpropGrafting(), AdamGrafting()):
        assert block_state_bytes(b, pre, g, beta1=0.0)["grafting"] == 3000 * 8


@pytest.mark.parametrize("packed", [True, False])
def test_state_bytes_eigenvalue_corrected(packed):
    pre = EigenvalueCorrectedShampoo(symmetric_packing=packed)
    b = one_block((64, 48), pre)
    got = block_state_bytes(b, pre, AdamGrafting(), beta1=0.5)
    assert got["factors"] == (stored(64, packed) + stored(48, packed)) * 4
    assert got["roots"] == (64 * 64 + 48 * 48) * 4        # eigenbases are not symmetric: never packed
    assert got["eigenvalues"] == 64 * 48 * 4
    assert sum(got.values()) == got["factors"] + got["roots"] + 3 * 64 * 48 * 4 + 16


def test_unpreconditioned_1d_block_has_only_diagonal_state():
    b = one_block((300,), blocking=BlockingConfig(precondition_1d=False))
    assert b.factor_dims == ()
    got = block_state_bytes(b, SHAMPOO, AdaGradGrafting(), beta1=0.9)
    assert got["factors"] == got["roots"] == 0
    assert got["grafting"] == got["filtered_grad"] == 1200
    assert block_amortized_flops(b, SHAMPOO) == 0
    assert block_amortized_workspace_bytes(b, SHAMPOO) == 0
    # only elementwise work: filtered grad (3) + AdaGrad (5) per element, no rescale (not preconditioned)
    assert block_step_flops(b, SHAMPOO, AdaGradGrafting(), 0.9) == 300 * 8


def test_exponent_zero_dim_has_no_factor():
    pre = RootInverseShampoo(inverse_exponent_override={2: {0: 0.0}})
    b = one_block((40, 20), pre, max_dim=64)
    assert b.factor_dims == (20,)
    assert block_state_bytes(b, pre, None, 0.0)["factors"] == 20 * 21 // 2 * 4
    assert block_amortized_flops(b, pre) == 11 * 20 ** 3


def test_step_flops_match_design_floor():
    # The design's physical floor of a non-amortized m x n step: 4 m n (m + n).
    b = one_block((1024, 512))
    assert block_step_flops(b, SHAMPOO, None, beta1=0.0) == 4 * 1024 * 512 * (1024 + 512)
    numel = 1024 * 512
    # + filtered gradient (3) + AdaGrad (5) + grafting rescale (5) per element
    assert block_step_flops(b, SHAMPOO, AdaGradGrafting(), beta1=0.9) == 4 * numel * 1536 + 13 * numel
    assert block_step_flops(b, SHAMPOO, AdamGrafting(), beta1=0.9) == 4 * numel * 1536 + 15 * numel
    assert block_step_flops(b, SHAMPOO, SGDGrafting(), beta1=0.0) == 4 * numel * 1536 + 5 * numel


def test_step_flops_eigenvalue_corrected():
    pre = EigenvalueCorrectedShampoo()
    b = one_block((256, 128), pre)
    numel = 256 * 128
    # factor update 2 n d + rotate in and out 4 n d per dim, + 6 per element eigenvalue correction
    assert block_step_flops(b, pre, None, beta1=0.0) == 6 * numel * (256 + 128) + 6 * numel


def test_amortized_flops_by_root_method():
    b = one_block((512, 256))
    assert block_amortized_flops(b, SHAMPOO) == 11 * (512 ** 3 + 256 ** 3)
    newton = RootInverseShampoo(root=CoupledNewtonConfig(max_iterations=100))
    # order 2 -> exponent 1/4 -> p = 4: 20 iterations x (p + 1) GEMMs x 2 d^3
    assert block_amortized_flops(b, newton) == 20 * 5 * 2 * (512 ** 3 + 256 ** 3)
    few = RootInverseShampoo(root=CoupledNewtonConfig(max_iterations=7))
    assert block_amortized_flops(b, few) == 7 * 5 * 2 * (512 ** 3 + 256 ** 3)
    assert block_amortized_flops(b, EigenvalueCorrectedShampoo()) == 9 * (512 ** 3 + 256 ** 3)
    calibrated = CostModel(eigh_flops_per_d3=30.0)
    assert block_amortized_flops(b, SHAMPOO, calibrated) == 32 * (512 ** 3 + 256 ** 3)


def test_amortized_workspace():
    b = one_block((512, 256))
    d = 512
    assert block_amortized_workspace_bytes(b, SHAMPOO) == (3 * d * d + d) * 8      # fp64 retry counted
    no_retry = RootInverseShampoo(root=EighRootConfig(retry_in_float64=False))
    assert block_amortized_workspace_bytes(b, no_retry) == (3 * d * d + d) * 4
    newton = RootInverseShampoo(root=CoupledNewtonConfig())
    assert block_amortized_workspace_bytes(b, newton) == 4 * d * d * 4
    # the eigenbasis's eigh is retried in fp64 too (EighRootConfig(retry_in_float64=True), the default)
    assert block_amortized_workspace_bytes(b, EigenvalueCorrectedShampoo()) == (3 * d * d + d) * 8
    no_retry = EigenvalueCorrectedShampoo(eigenbasis=EighRootConfig(retry_in_float64=False))
    assert block_amortized_workspace_bytes(b, no_retry) == (3 * d * d + d) * 4


def test_block_cost_and_balance_weight():
    b = one_block((512, 256))
    c = block_cost(b, SHAMPOO, AdaGradGrafting(), 0.9)
    assert c.total_state_bytes == sum(block_state_bytes(b, SHAMPOO, AdaGradGrafting(), 0.9).values())
    assert c.balance_cost(100) == c.step_flops + c.amortized_flops / 100
    assert c.balance_cost(1) == c.step_flops + c.amortized_flops


@pytest.mark.parametrize("field,value", [("eigh_flops_per_d3", -1.0), ("newton_iterations", 0),
                                         ("adam_elementwise_flops", "x")])
def test_cost_model_validation(field, value):
    with pytest.raises(ValueError, match=f"CostModel.{field}"):
        CostModel(**{field: value})


def test_param_state_bytes_matches_summing_blocks():
    import random

    from sharded_shampoo.planning.costs import param_state_bytes

    rng = random.Random(0)
    checked = 0
    configs = [RootInverseShampoo(), EigenvalueCorrectedShampoo(factor_dtype=torch.float64),
               RootInverseShampoo(inverse_exponent_override={2: {0: 0.0}}),
               RootInverseShampoo(symmetric_packing=False, root_storage_dtype=torch.bfloat16)]
    for _ in range(300):
        shape = tuple(rng.choice([1, 2, 3, 7, 16, 33, 100, 257, 1000]) for _ in range(rng.randint(0, 4)))
        max_dim = rng.choice([1, 2, 5, 16, 64, 100, 1024])
        pre = rng.choice(configs)
        grafting = rng.choice([None, AdaGradGrafting(), SGDGrafting()])
        beta1 = rng.choice([0.0, 0.9])
        blocking = rng.choice([BlockingConfig(), BlockingConfig(precondition_1d=False, merge_dims=False)])
        got = param_state_bytes(shape, max_dim, pre, grafting, beta1, blocking)
        if got[2] > 5000:              # too many blocks to list (the count itself is checked below)
            continue
        blocks = plan_blocks([("w", shape)], max_dim, pre, blocking)
        per_block = [sum(block_state_bytes(b, pre, grafting, beta1).values()) for b in blocks]
        assert got == (max(per_block), sum(per_block), len(blocks))
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("packed", [True, False])
def test_eigendecomposed_state_flops_and_workspace(packed):
    """Eigendecomposed Shampoo: factors (packed or not) + full eigenvectors + one eigenvalue per row of each
    factor; per step the factor update (2 n d), the rotation in and out (4 n d) per dim and one scale per
    element and dim; per refresh eigh 9 d^3 (no root formed), QR ``iterations (2 + 8/3) + 0.1 x 9`` plus 2 for
    the Rayleigh quotients, and with a tolerance the 4 d^3 check plus ``1 - refresh_skip_rate`` of the method."""
    from sharded_shampoo import EigendecomposedShampoo, QREigenbasisConfig

    pre = EigendecomposedShampoo(symmetric_packing=packed)
    b = one_block((256, 128), pre)
    numel, d3 = 256 * 128, 256 ** 3 + 128 ** 3
    got = block_state_bytes(b, pre, None, beta1=0.0)
    assert got["factors"] == (stored(256, packed) + stored(128, packed)) * 4
    assert got["roots"] == (256 * 256 + 128 * 128) * 4
    assert got["eigenvalues"] == (256 + 128) * 4
    assert block_step_flops(b, pre, None, beta1=0.0) == 6 * numel * (256 + 128) + 2 * numel
    assert block_amortized_flops(b, pre) == 9 * d3
    qr = EigendecomposedShampoo(eigenbasis=QREigenbasisConfig(iterations=2))
    assert block_amortized_flops(b, qr) == pytest.approx((2 * (2 + 8 / 3) + 0.1 * 9 + 2) * d3, rel=1e-12)
    tol = EigendecomposedShampoo(tolerance=0.1)
    assert block_amortized_flops(b, tol) == (4 + 9) * d3
    assert block_amortized_flops(b, tol, CostModel(refresh_skip_rate=0.75)) == (4 + 0.25 * 9) * d3
    soap_tol = EigenvalueCorrectedShampoo(tolerance=0.1)
    assert block_amortized_flops(b, soap_tol, CostModel(refresh_skip_rate=1.0)) == 4 * d3
    # eigh of the largest factor, its fp64 retry counted (as root-inverse Shampoo's)
    assert block_amortized_workspace_bytes(b, pre) == (3 * 256 * 256 + 256) * 8
    no_retry = EigendecomposedShampoo(eigenbasis=EighRootConfig(retry_in_float64=False))
    assert block_amortized_workspace_bytes(b, no_retry) == (3 * 256 * 256 + 256) * 4
