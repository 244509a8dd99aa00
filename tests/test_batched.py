"""The batched (stacked) math equals the per-block math; masks and ``apply_kronecker`` are exact.

``BlockBucket`` processes every same-shape block of a group in one stack. Stacking must not
change any block's numbers: a bucket of many blocks has to agree with one single-block bucket
per block, including the amortized roots (batched eigh / Newton) and the inactive-mask path.
"""

from __future__ import annotations

import dataclasses
import string

import pytest
import torch

from tests.support.numerics import grad_for, make_params, max_rel_diff, set_grads
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.planning.blocking import Block
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                                    RMSpropGrafting, RootInverseShampoo, SGDGrafting)
from sharded_shampoo.compute.kron import apply_kronecker
from sharded_shampoo.compute.preconditioner import BlockBucket, BucketConfig, BucketHyperparams, BucketStep

B = 9
# float64 factors: stacking must be exact up to round-off (1e-6 is loose there); float32 factors:
# batched and single LAPACK/BLAS calls round differently, so a looser bound.
TOLS = {torch.float64: 1e-6, torch.float32: 1e-4}
TOL = 1e-6


def _blocks(shape: tuple[int, ...], exponents: tuple[float, ...], n: int) -> list[Block]:
    return [Block(block_id=f"p{i}.block_0", param_name=f"p{i}", param_shape=shape, merged_shape=shape,
                  ranges=tuple((0, d) for d in shape), exponents=exponents) for i in range(n)]


def _grads(shape, steps, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # different scales per block so a mix-up between blocks cannot go unnoticed
    scale = torch.logspace(-1, 1, n, dtype=torch.float64).view(n, *([1] * len(shape)))
    return [(torch.randn(n, *shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(steps)]


def _hp(case: str, dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[float, ...], BucketConfig, BucketHyperparams]:
    shape, exps, precond, grafting, beta1, beta2 = CASES[case]
    precond = dataclasses.replace(precond, factor_dtype=dtype)
    config = BucketConfig(preconditioner=precond, grafting=grafting, has_filtered_grad=beta1 > 0)
    hp = BucketHyperparams(beta1=beta1, beta2=beta2, epsilon=1e-6, use_bias_correction=True)
    return shape, exps, config, hp


def _state(bucket: BlockBucket, j: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bucket.state_views(j).items()}


def _assert_state_close(a: dict, b: dict, tol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            d = max_rel_diff(a[k], b[k])
            assert d <= tol, f"{what}: state {k} differs by {d:.3e}"
        else:
            assert torch.equal(a[k], b[k]), f"{what}: state {k} {a[k]} != {b[k]}"


CASES = {
    "eigh-adagrad-2d": ((6, 5), (0.25, 0.25), RootInverseShampoo(), AdaGradGrafting(), 0.9, 0.999),
    "eigh-adam-3d": ((3, 4, 5), (1 / 6,) * 3, RootInverseShampoo(), AdamGrafting(), 0.9, 0.99),
    "eigh-rmsprop-skipdim": ((6, 5), (0.0, 0.25), RootInverseShampoo(), RMSpropGrafting(), 0.0, 1.0),
    "newton-sgd-2d": ((4, 4), (0.25, 0.25), RootInverseShampoo(root=CoupledNewtonConfig()), SGDGrafting(), 0.0, 0.9),
    "eigen-corrected-2d": ((6, 5), (0.5, 0.5), EigenvalueCorrectedShampoo(), None, 0.9, 0.95),
    # (eigen-corrected shapes keep every factor's eigenvalues distinct: a degenerate eigenspace has
    #  no unique basis, and D accumulated in two different bases legitimately differs)
    "eigen-corrected-3d": ((3, 4, 5), (0.5,) * 3, EigenvalueCorrectedShampoo(), AdaGradGrafting(), 0.0, 0.95),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_bucket_equals_single_block_buckets(case, dtype):
    shape, exps, config, hp = _hp(case, dtype)
    tol = TOLS[dtype]
    blocks = _blocks(shape, exps, B)
    big = BlockBucket(blocks, config, torch.device("cpu"))
    singles = [BlockBucket([b], config, torch.device("cpu")) for b in blocks]
    steps = 7
    for t, G in enumerate(_grads(shape, steps, B, dtype=dtype), start=1):
        amortized = t >= 2 and (t % 2 == 0 or t == 2)
        P = big.step_blocks(G.clone(), BucketStep(hp, amortized, precondition=t >= 2))
        for j, s in enumerate(singles):
            Pj = s.step_blocks(G[j:j + 1].clone(), BucketStep(hp, amortized, precondition=t >= 2))
            d = max_rel_diff(P[j], Pj[0])
            assert d <= tol, f"{case} step {t} block {j}: direction differs by {d:.3e}"
    for j, s in enumerate(singles):
        _assert_state_close(_state(big, j), _state(s, 0), tol, f"{case} block {j}")
    assert int(big.step[0]) == steps


@pytest.mark.parametrize("case", ["eigh-adagrad-2d", "eigen-corrected-2d", "newton-sgd-2d"])
def test_inactive_mask_leaves_state_untouched(case):
    shape, exps, config, hp = _hp(case, torch.float64)
    blocks = _blocks(shape, exps, B)
    big = BlockBucket(blocks, config, torch.device("cpu"))
    singles = [BlockBucket([b], config, torch.device("cpu")) for b in blocks]
    gen = torch.Generator().manual_seed(7)
    for t, G in enumerate(_grads(shape, 6, B, seed=1, dtype=torch.float64), start=1):
        active = torch.rand(B, generator=gen) < 0.6
        active[t % B] = True  # at least one active
        active[(t + 1) % B] = False  # at least one inactive
        before = [_state(big, j) for j in range(B)]
        amortized = t % 2 == 0
        P = big.step_blocks(G.clone(), BucketStep(hp, amortized, precondition=t >= 2, active=active))
        for j in range(B):
            if not bool(active[j]):
                assert torch.equal(P[j], torch.zeros_like(P[j])), "inactive block got a direction"
                _assert_state_close(_state(big, j), before[j], 0.0, f"inactive block {j} at step {t}")
            else:
                Pj = singles[j].step_blocks(G[j:j + 1].clone(), BucketStep(hp, amortized, precondition=t >= 2))
                d = max_rel_diff(P[j], Pj[0])
                assert d <= TOL, f"step {t} block {j}: {d:.3e}"
    for j in range(B):
        _assert_state_close(_state(big, j), _state(singles[j], 0), TOL, f"block {j}")
        assert int(big.step[j]) == int(singles[j].step[0])
    assert len(set(big.step.tolist())) > 1, "the test should leave blocks at different step counts"


def test_optimizer_param_without_grad_is_untouched():
    """Two same-shape params share a bucket; the one without a gradient keeps state and values."""
    shapes = {"a": (6, 5), "b": (6, 5), "c": (3,)}
    params = make_params(torch.float64, shapes=shapes)
    kw = dict(lr=0.01, betas=(0.9, 0.99), precondition_frequency=2, weight_decay=0.1, momentum=0.5, epsilon=1e-8,
              grafting=AdamGrafting(), max_preconditioner_dim=8,
              preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    opt = ShardedShampoo(list(params.items()), **kw)
    assert len(opt.runtime.buckets[0].blocks) == 2  # a and b stacked together
    a, b, c = params.values()
    alone = make_params(torch.float64, shapes={"a": (6, 5)})
    opt_alone = ShardedShampoo(list(alone.items()), **kw)
    skip_b = {1, 2, 4}
    for t in range(6):
        set_grads(params.values(), t, skip=(1,) if t in skip_b else ())
        alone["a"].grad = grad_for(alone["a"], 0, t)
        b_before = b.detach().clone()
        b_state = {k: (v.clone() if isinstance(v, torch.Tensor) else {kk: vv.clone() for kk, vv in v.items()})
                   for k, v in opt.state[b].items()}
        opt.step()
        opt_alone.step()
        if t in skip_b:
            assert torch.equal(b, b_before), f"step {t}: parameter without gradient moved"
            for k, v in opt.state[b].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, b_state[k]), k
                else:
                    for kk, vv in v.items():
                        assert torch.equal(vv, b_state[k][kk]), f"step {t}: state {k}.{kk} changed"
        # "a" is unaffected by "b" sharing its bucket: identical to an optimizer of "a" alone
        assert max_rel_diff(a, alone["a"]) <= TOL, f"step {t}"
    assert int(opt.state[a]["block_0"]["step"]) == 6
    assert int(opt.state[b]["block_0"]["step"]) == 6 - len(skip_b)
    assert int(opt.state[c]["block_0"]["step"]) == 6
    assert opt.param_groups[0]["step"] == 6


# ----------------------------------------------------------------------------- apply_kronecker


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("skip", [(), (0,), "last", "alternate"])
def test_apply_kronecker_matches_einsum(order, transpose, skip):
    shape = (3, 4, 2, 5)[:order]
    Bn = 3
    gen = torch.Generator().manual_seed(order)
    X = torch.randn(Bn, *shape, generator=gen, dtype=torch.float64)
    if skip == "last":
        skip = (order - 1,)
    elif skip == "alternate":
        skip = tuple(range(0, order, 2))
    mats = [None if i in skip else torch.randn(Bn, d, d, generator=gen, dtype=torch.float64)
            for i, d in enumerate(shape)]
    got = apply_kronecker(X, mats, transpose=transpose)
    # explicit: Y[b, i_1..i_k] = sum_j A_1[i_1, j_1] ... A_k[i_k, j_k] X[b, j_1..j_k]  (A^T when transpose)
    letters = string.ascii_lowercase
    out_idx = list(letters[:order])
    in_idx = list(letters[10:10 + order])
    operands, specs = [X], ["z" + "".join(in_idx)]
    result = []
    for i, A in enumerate(mats):
        if A is None:
            result.append(in_idx[i])
            continue
        operands.append(A)
        specs.append("z" + (in_idx[i] + out_idx[i] if transpose else out_idx[i] + in_idx[i]))
        result.append(out_idx[i])
    expected = torch.einsum(",".join(specs) + "->z" + "".join(result), *operands)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_apply_kronecker_matches_explicit_kron():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 3, 4, 2, generator=gen, dtype=torch.float64)
    mats = [torch.randn(2, d, d, generator=gen, dtype=torch.float64) for d in (3, 4, 2)]
    got = apply_kronecker(X, mats)
    for b in range(2):
        K = torch.kron(torch.kron(mats[0][b], mats[1][b]), mats[2][b])
        torch.testing.assert_close(got[b].reshape(-1), K @ X[b].reshape(-1), rtol=1e-12, atol=1e-12)
