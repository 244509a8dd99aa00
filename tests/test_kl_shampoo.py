"""KLShampoo against a dense float64 implementation of its math written here, and its own invariants.

The dense reference is :class:`tests.test_dense_reference.DenseShampoo` with the factor statistic of
KL-Shampoo: ``H_i = (R_1 (x) ... I_i ... (x) R_k) vec(G)`` with explicit Kronecker products of the
stored roots (identity before the first refresh and for unpreconditioned dims), ``O_i = H_(i) H_(i)^T``.
Preconditioning starts once every factor is full rank (the well-conditioned regime), so ours and the
reference agree to round-off.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.numerics import grad_for, kron_all, max_rel_diff
from tests.support.dist_scenarios import owned_state_bytes
from tests.test_dense_reference import Q2, Q3, DenseShampoo, RefBlock, _run
from tests.test_low_precision import _train as train_model
from sharded_shampoo import (AdaGradGrafting, AdamGrafting, CoupledNewtonConfig, KLShampoo, RootInverseShampoo,
                             ShardedShampoo, WarmStartRootConfig)
from sharded_shampoo.compute import low_precision

F64 = torch.float64
BF16 = torch.bfloat16
TOL = 1e-9


class DenseKLShampoo(DenseShampoo):
    """KL-Shampoo's statistic: the gradient preconditioned along every other dim with the current roots."""

    def statistic(self, b: RefBlock, G: torch.Tensor, i: int) -> torch.Tensor:
        mats = [torch.eye(d, dtype=F64) if j == i or m is None else m for j, (d, m) in enumerate(zip(b.shape, b.mats))]
        H = (kron_all(mats) @ G.reshape(-1)).reshape(b.shape)
        Hi = H.movedim(i, 0).reshape(b.shape[i], -1)
        return Hi @ Hi.T


def kl(**kw) -> KLShampoo:
    return KLShampoo(factor_dtype=F64, **kw)


# ----------------------------------------------------------------------------- against the dense reference


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("beta1,beta2", [(0.0, 1.0), (0.9, 0.95)])
@pytest.mark.parametrize("grafting", [None, AdaGradGrafting(epsilon=1e-8)], ids=["nograft", "adagrad"])
def test_2d(freq, beta1, beta2, grafting):
    # (6, 5): every factor is full rank from step 2; the first root at step 3
    _run((6, 5), (6, 5), 8, (Q2, Q2), steps=9, freq=freq, start=3, beta1=beta1, beta2=beta2, grafting=grafting,
         lr=0.01 if grafting is None else 0.05, eps=1e-6, precond=kl(), dense=DenseKLShampoo, tol=TOL)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_3d(packing, beta2):
    # 3*4 > 8, 4*5 > 8: an order-3 block, exponents 1/6; every factor of (3, 4, 5) is full rank from step 1
    _run((3, 4, 5), (3, 4, 5), 8, (Q3, Q3, Q3), steps=8, freq=2, start=2, beta2=beta2, lr=0.01, eps=1e-6,
         precond=kl(symmetric_packing=packing), dense=DenseKLShampoo, tol=TOL)


def test_blocked_parameter_with_adam_grafting():
    # (10, 6) with max 4: six blocks of four shapes, among them (2, 4) and (2, 2) (full rank from step 2)
    opt = _run((10, 6), (10, 6), 4, (Q2, Q2), steps=8, freq=2, start=2, beta1=0.9, beta2=0.95, lr=0.02, eps=1e-6,
               grafting=AdamGrafting(beta2=0.99, epsilon=1e-8), precond=kl(), dense=DenseKLShampoo, tol=TOL)
    assert len(opt.runtime.buckets) == 4


@pytest.mark.parametrize("override,exps", [({2: 0.5}, (0.5, 0.5)), ({2: {1: 0.5}}, (Q2, 0.5))])
def test_exponent_override(override, exps):
    """``{2: 0.5}``: the paper's form, each factor sees the full inverse of the other."""
    _run((6, 5), (6, 5), 8, exps, steps=8, freq=2, start=2, beta2=0.95, lr=0.005, eps=1e-6,
         precond=kl(inverse_exponent_override=override), dense=DenseKLShampoo, tol=TOL)


def test_weight_decay_l2_enters_the_statistic():
    _run((6, 5), (6, 5), 8, (Q2, Q2), steps=8, freq=2, start=2, beta2=0.95, lr=0.02, eps=1e-6, wd=0.1,
         decoupled=False, grafting=AdaGradGrafting(epsilon=1e-8), precond=kl(), dense=DenseKLShampoo, tol=TOL)


@pytest.mark.parametrize("root,tol", [(CoupledNewtonConfig(tolerance=1e-12, max_iterations=200), 1e-7),
                                      (WarmStartRootConfig(tolerance=1e-6), 1e-5)])
def test_other_root_methods(root, tol):
    """Coupled Newton and warm-started roots approximate the eigh roots of the dense reference."""
    _run((6, 5), (6, 5), 8, (Q2, Q2), steps=9, freq=2, start=3, beta2=0.95, lr=0.01, eps=1e-3,
         precond=kl(root=root), dense=DenseKLShampoo, tol=tol, grafting=AdaGradGrafting(epsilon=1e-8))


# ----------------------------------------------------------------------------- where it is Shampoo


def _train(pre, shapes, steps=6, dtype=F64, start=3, **kw):
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype)) for s in shapes]
    opt = ShardedShampoo([(f"p{i}", p) for i, p in enumerate(params)], lr=0.01, betas=(0.9, 0.95), epsilon=1e-6,
                         max_preconditioner_dim=8, precondition_frequency=2, start_preconditioning_step=start,
                         grafting=AdaGradGrafting(epsilon=1e-8), preconditioner=pre, **kw)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = grad_for(p, i, t)
        opt.step()
    return params, opt


def test_equals_shampoo_before_the_first_refresh_and_on_blocks_with_one_factor():
    """Identity roots until the first refresh: the factors are Shampoo's; a 1-D block and a block with one
    preconditioned dim have no other dim to precondition with, so they follow Shampoo throughout."""
    shapes = [(6, 5), (7,)]
    override = {2: {0: 0.0}}
    for steps, same_2d in ((3, True), (6, False)):
        ours, opt = _train(kl(), shapes, steps)
        shampoo, ref = _train(RootInverseShampoo(factor_dtype=F64), shapes, steps)
        diff = max_rel_diff(opt.state[ours[0]]["block_0"]["factor_0"], ref.state[shampoo[0]]["block_0"]["factor_0"])
        assert (diff == 0.0) if same_2d else diff > 1e-3, (steps, diff)
        assert torch.equal(ours[1], shampoo[1])
    ours, _ = _train(kl(inverse_exponent_override=override), shapes[:1])
    shampoo, _ = _train(RootInverseShampoo(factor_dtype=F64, inverse_exponent_override=override), shapes[:1])
    assert torch.equal(ours[0], shampoo[0])


# ----------------------------------------------------------------------------- storage and chunking


SHAPES = [(6, 5), (3, 4, 5), (8, 3), (7,)] + [(6, 5)] * 4


def test_packed_equals_full_matrices():
    packed, opt = _train(kl(), SHAPES)
    full, _ = _train(kl(symmetric_packing=False), SHAPES)
    for a, b in zip(packed, full):
        assert max_rel_diff(a, b) < 1e-12


@pytest.mark.parametrize("storage", [None, BF16])
def test_chunked_update_equals_one_chunk(monkeypatch, storage):
    """The KL update processes a bucket a chunk of blocks at a time: the same numbers for any chunk size."""
    pre = kl(factor_storage_dtype=storage, root_storage_dtype=storage)
    one, _ = _train(pre, SHAPES)
    monkeypatch.setattr(low_precision, "CHUNK_BYTES", 1)          # one block per chunk, everywhere
    chunked, _ = _train(pre, SHAPES)
    for a, b in zip(one, chunked):
        assert max_rel_diff(a, b) < (1e-12 if storage is None else 1e-9)


@pytest.mark.parametrize("factors,roots", [(None, BF16), (BF16, BF16)])
def test_bf16_storage_trains_like_fp32(factors, roots):
    """bf16 roots (products with bf16 operands) and bf16 factors (stochastically rounded EMAs): the loss of
    test_low_precision.py's regression stays near the fp32 run's (bounds as for Shampoo: 1% / 15%), planned bytes
    equal allocated ones."""
    loss32 = train_model(KLShampoo())[0]
    loss, opt, _ = train_model(KLShampoo(factor_storage_dtype=factors, root_storage_dtype=roots))
    assert opt.runtime.buckets[0].state["root_0"].dtype == BF16
    assert opt.plan.ranks[0].optimizer_state_bytes == owned_state_bytes(opt)
    assert abs(loss - loss32) / loss32 < (0.01 if factors is None else 0.15), (loss, loss32)


# ----------------------------------------------------------------------------- planner


def test_costs_add_the_extra_mode_products():
    """Same state and refresh as Shampoo; each step adds, per factor, one mode product per other dim."""
    from sharded_shampoo.planning.costs import (block_amortized_flops, block_amortized_workspace_bytes,
                                                block_state_bytes, block_step_flops)
    from sharded_shampoo.planning.blocking import plan_blocks

    shampoo, ours = RootInverseShampoo(), KLShampoo()
    for shape, extra in (((512, 256), 2 * 512 * 256 * (512 + 256)),
                         ((32, 16, 8), 2 * 32 * 16 * 8 * 2 * (32 + 16 + 8)),
                         ((300,), 0)):
        (b,) = plan_blocks([("w", shape)], max(shape), ours)      # (32, 16, 8) stays 3-D at 32
        assert b.shape == shape
        assert block_state_bytes(b, ours, AdaGradGrafting(), 0.9) == block_state_bytes(b, shampoo, AdaGradGrafting(),
                                                                                         0.9)
        assert block_amortized_flops(b, ours) == block_amortized_flops(b, shampoo)
        for grafting in (None, AdamGrafting()):
            assert block_step_flops(b, ours, grafting, 0.9) - block_step_flops(b, shampoo, grafting, 0.9) == extra
    (b,) = plan_blocks([("w", (512, 256))], 1024, ours)      # the refresh's eigh (fp64 retry) dominates
    assert block_amortized_workspace_bytes(b, ours) == block_amortized_workspace_bytes(b, shampoo)
    (b,) = plan_blocks([("w", (64, 64, 64))], 64, ours)    # the update's products dominate: roots + 4 products
    assert block_amortized_workspace_bytes(b, ours) == 3 * 64 * 64 * 4 + 4 * 64 ** 3 * 4
    assert block_amortized_workspace_bytes(b, KLShampoo(symmetric_packing=False)) == 4 * 64 ** 3 * 4


def test_plan_command(tmp_path, capsys):
    """``sharded-shampoo plan --preconditioner kl-shampoo``: Shampoo's bytes, more step FLOPs."""
    import json

    from sharded_shampoo.dryrun.cli import main

    out = {}
    for name in ("shampoo", "kl-shampoo"):
        path = tmp_path / f"{name}.json"
        assert main(["plan", "--model", "llama-tiny", "--mesh", "2", "--preconditioner", name, "--json",
                     str(path)]) == 0
        out[name] = json.loads(path.read_text())
    assert "| KLShampoo" in capsys.readouterr().out
    kl_ranks, ranks = out["kl-shampoo"]["ranks"], out["shampoo"]["ranks"]
    assert [r["optimizer_state_bytes"] for r in kl_ranks] == [r["optimizer_state_bytes"] for r in ranks]
    extra = sum(2 * math.prod(b["shape"]) * sum(b["shape"]) for b in out["kl-shampoo"]["blocks"]
                if len(b["factor_dims"]) == 2)
    assert extra > 0
    for b, c in zip(out["kl-shampoo"]["blocks"], out["shampoo"]["blocks"]):
        assert b["state_bytes"] == c["state_bytes"] and b["amortized_flops"] == c["amortized_flops"]
    assert sum(r["step_flops"] for r in kl_ranks) - sum(r["step_flops"] for r in ranks) == pytest.approx(extra)


# ----------------------------------------------------------------------------- configs, errors, state


@pytest.mark.parametrize("kwargs,match", [
    (dict(root="eigh"), r"KLShampoo\.root must be"),
    (dict(root=CoupledNewtonConfig(), inverse_exponent_override={2: 0.3}),
     r"KLShampoo\.inverse_exponent_override\[2\] = 0.3 needs 1/0.3 to be an integer"),
    (dict(factor_dtype=torch.float16), r"KLShampoo\.factor_dtype must be"),
    (dict(symmetric_packing=1), r"KLShampoo\.symmetric_packing must be True"),
    (dict(root_storage_dtype=torch.int8), r"KLShampoo\.root_storage_dtype must be"),
    (dict(max_consecutive_root_failures=0), r"KLShampoo\.max_consecutive_root_failures"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLShampoo(**kwargs)


def test_config_identity_and_round_trip():
    """Never equal to the root-inverse config of the same fields (a checkpoint of one does not load into
    the other); restored by name from a state dict; storage-only fields compare neutral."""
    from sharded_shampoo.config import config_from_dict, config_to_dict, storage_neutral

    pre = KLShampoo(root=CoupledNewtonConfig(), root_storage_dtype=BF16, inverse_exponent_override={2: 0.5})
    assert pre != RootInverseShampoo() and RootInverseShampoo() != KLShampoo() and KLShampoo() == KLShampoo()
    assert hash(KLShampoo()) != hash(RootInverseShampoo())
    assert config_from_dict(config_to_dict(pre)) == pre
    assert type(config_from_dict(config_to_dict(pre))) is KLShampoo
    assert storage_neutral(KLShampoo(symmetric_packing=False)) == KLShampoo()
    assert len({KLShampoo(), KLShampoo(), RootInverseShampoo()}) == 2


def test_shampoo_state_does_not_load_into_kl_shampoo_and_changes_nothing():
    _, shampoo = _train(RootInverseShampoo(factor_dtype=F64), SHAPES[:2], steps=4)
    _, opt = _train(kl(), SHAPES[:2], steps=4)
    before = [t.clone() for s in opt.state.values() for t in s["block_0"].values()]
    with pytest.raises(ValueError, match="preconditioner differs"):
        opt.load_state_dict(shampoo.state_dict())
    after = [t for s in opt.state.values() for t in s["block_0"].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_state_dict_resumes_exactly_across_packing():
    """A packed KLShampoo state dict loads into a full-matrix one and both continue the same run."""
    straight, _ = _train(kl(), SHAPES, steps=8)
    params, opt = _train(kl(), SHAPES, steps=5)
    sd = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ShardedShampoo([(f"p{i}", p) for i, p in enumerate(resumed)], lr=0.01, betas=(0.9, 0.95), epsilon=1e-6,
                          max_preconditioner_dim=8, precondition_frequency=2, start_preconditioning_step=3,
                          grafting=AdaGradGrafting(epsilon=1e-8), preconditioner=kl(symmetric_packing=False))
    opt2.load_state_dict(sd)
    assert opt2.state[resumed[0]]["block_0"]["root_0"].shape == (6, 6)
    for t in range(5, 8):
        for i, p in enumerate(resumed):
            p.grad = grad_for(p, i, t)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert max_rel_diff(a, b) < 1e-12
