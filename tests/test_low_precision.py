"""Low-precision (bfloat16) storage of factors and roots: rounding, exact planned bytes, loss, resume."""

from __future__ import annotations

import pytest
import torch

from tests.support.dist_scenarios import owned_state_bytes
from sharded_shampoo import AdamGrafting, EigenvalueCorrectedShampoo, RootInverseShampoo, ShardedShampoo
from sharded_shampoo.compute.low_precision import ema_round_, rounding_seed, stochastic_round_
from sharded_shampoo.compute.preconditioner import BlockBucket, BucketConfig, BucketHyperparams, BucketStep
from sharded_shampoo.planning.blocking import plan_blocks

BF16 = torch.bfloat16


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each fp32 value (by magnitude)."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32)
    high = ((bits & -65536) + 65536).view(torch.float32)
    return low, high


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.linspace(1.0, 2.0, 257)[1:-1] * torch.tensor([1.0, -1.0]).repeat(128)[:255]
    low, high = neighbours(x.clone())
    total = torch.zeros_like(x, dtype=torch.float64)
    n = 4000
    for t in range(n):
        out = torch.empty_like(x, dtype=BF16)
        stochastic_round_(out.view(1, -1), x.clone().view(1, -1), [rounding_seed(7, t, 0)])
        o = out.float()
        assert bool(((o == low) | (o == high)).all())           # always one of the two neighbours
        total += o.double()
    mean = total / n
    ulp = (high - low).abs().double()
    # unbiased: the mean is within 4 standard errors (ulp / (2 sqrt(n))) of the value, per entry
    assert float(((mean - x.double()).abs() / ulp).max()) < 4 * 0.5 / n ** 0.5
    # same seeds, same bits; another seed, other bits
    a, b, c = (torch.empty(1, 255, dtype=BF16) for _ in range(3))
    stochastic_round_(a, x.clone().view(1, -1), [rounding_seed(3, 5, 0)])
    stochastic_round_(b, x.clone().view(1, -1), [rounding_seed(3, 5, 0)])
    stochastic_round_(c, x.clone().view(1, -1), [rounding_seed(3, 6, 0)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_ema_tracks_fp32_with_beta2_0999():
    """Nearest rounding freezes an EMA whose increments are below half an ulp; stochastic rounding
    tracks the fp32 average (within bf16's noise)."""
    g = torch.Generator().manual_seed(0)
    d, steps, beta = 8, 3000, 0.999
    F32 = torch.zeros(1, d, d)
    Fsr = torch.zeros(1, d, d, dtype=BF16)
    Fnear = torch.zeros(1, d, d, dtype=BF16)
    for t in range(steps):
        X = torch.randn(1, d, 4, generator=g) * (1.0 + 0.5 * (t > steps // 2))
        GG = X @ X.mT
        F32.mul_(beta).add_(GG, alpha=1 - beta)
        ema_round_(Fsr, GG.to(BF16), beta, 1 - beta, [rounding_seed(1, t, 0)])
        Fnear.copy_((Fnear.float() * beta + (1 - beta) * GG))
    rel = lambda F: float((F.float() - F32).norm() / F32.norm())  # noqa: E731
    assert rel(Fsr) < 0.03            # measured 2.0%
    assert rel(Fnear) > 5 * rel(Fsr)  # measured 19.9%: frozen at the level before the gradients grew


def _buckets_with(block_lists: list[list], storage: torch.dtype):
    pre = RootInverseShampoo(factor_storage_dtype=storage)
    config = BucketConfig(preconditioner=pre, grafting=None, has_filtered_grad=False)
    return [BlockBucket(blocks, config, torch.device("cpu")) for blocks in block_lists]


PLAIN = BucketStep(BucketHyperparams(beta1=0.0, beta2=0.999, epsilon=1e-6, use_bias_correction=True),
                   refresh_roots=False, precondition=False)


def test_rounding_of_a_block_does_not_depend_on_its_bucket():
    """A block's bits come from its id and step, so 1 rank and N ranks (other bucket mates) agree."""
    pre = RootInverseShampoo(factor_storage_dtype=BF16)
    blocks = plan_blocks([("a", (6, 5)), ("b", (6, 5)), ("c", (6, 5))], 5, pre)[::2]   # three (5, 5) blocks
    assert [b.shape for b in blocks] == [(5, 5)] * 3
    alone, together = _buckets_with([[blocks[1]], blocks], BF16)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        G = torch.randn(3, 5, 5, generator=g)
        alone.step_blocks(G[1:2].clone(), PLAIN)
        together.step_blocks(G.clone(), PLAIN)
    for n in range(2):
        assert torch.equal(alone.state[f"factor_{n}"][0], together.state[f"factor_{n}"][1])


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32))


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    return X, X @ torch.randn(64, 32, generator=g) + 0.1 * torch.randn(512, 32, generator=g)


def _train(pre, steps: int = 60, model=None, opt=None) -> tuple[float, ShardedShampoo, torch.nn.Module]:
    X, Y = _data()
    model = model or _model()
    opt = opt or ShardedShampoo(model.named_parameters(), lr=1e-2, betas=(0.9, 0.999), epsilon=1e-8,
                                precondition_frequency=5, grafting=AdamGrafting(), preconditioner=pre)
    for _ in range(steps):
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach()), opt, model


@pytest.fixture(scope="module")
def fp32_run():
    return _train(RootInverseShampoo())


@pytest.mark.parametrize("factors,roots,loss_bound", [(None, BF16, 0.01), (BF16, BF16, 0.15), (BF16, None, 0.15)])
def test_bf16_state_bytes_and_loss(fp32_run, factors, roots, loss_bound):
    """Planned bytes equal allocated bytes; the loss stays near fp32's: bf16 roots within 1% (measured
    0.1%), bf16 factors within 15% (measured 8-10%: a factor's small eigenvalues are below bf16's
    resolution of its large ones -- see docs/benchmarks.md)."""
    loss32, opt32, _ = fp32_run
    pre = RootInverseShampoo(factor_storage_dtype=factors, root_storage_dtype=roots)
    loss, opt, _ = _train(pre)
    bucket = opt.runtime.buckets[0]
    assert bucket.state["factor_0"].dtype == (factors or torch.float32)
    assert bucket.state["root_0"].dtype == (roots or torch.float32)
    planned = opt.plan.ranks[0].optimizer_state_bytes
    assert planned == owned_state_bytes(opt)
    square = sum(d * (d + 1) // 2 for b in opt.plan.blocks for d in b.factor_dims)     # packed (the default)
    saved = 2 * square * ((factors is not None) + (roots is not None))
    assert opt32.plan.ranks[0].optimizer_state_bytes - planned == saved
    assert abs(loss - loss32) / loss32 < loss_bound


def test_bf16_factors_resume_bit_exactly():
    pre = RootInverseShampoo(factor_storage_dtype=BF16, root_storage_dtype=BF16)
    straight = _train(pre, steps=12)[2]
    _, opt, model = _train(pre, steps=7)
    state = opt.state_dict()
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = ShardedShampoo(model2.named_parameters(), lr=1e-2, betas=(0.9, 0.999), epsilon=1e-8,
                          precondition_frequency=5, grafting=AdamGrafting(), preconditioner=pre)
    opt2.load_state_dict(state)
    _train(pre, steps=5, model=model2, opt=opt2)
    for a, b in zip(straight.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_storage_dtype_is_structural():
    _, opt, _ = _train(RootInverseShampoo(), steps=1)
    model = _model()
    other = ShardedShampoo(model.named_parameters(), lr=1e-2, betas=(0.9, 0.999), epsilon=1e-8,
                           precondition_frequency=5, grafting=AdamGrafting(),
                           preconditioner=RootInverseShampoo(root_storage_dtype=BF16))
    with pytest.raises(ValueError, match="preconditioner differs"):
        other.load_state_dict(opt.state_dict())


def test_eigenvalue_corrected_bf16_bases():
    loss32 = _train(EigenvalueCorrectedShampoo(), steps=30)[0]
    loss, opt, _ = _train(EigenvalueCorrectedShampoo(root_storage_dtype=BF16), steps=30)
    assert opt.runtime.buckets[0].state["eigenbasis_0"].dtype == BF16
    assert opt.plan.ranks[0].optimizer_state_bytes == owned_state_bytes(opt)
    assert abs(loss - loss32) / loss32 < 0.05


# ----------------------------------------------------------------------------- bf16 moments (the lean setting)

LEAN = RootInverseShampoo(root_storage_dtype=BF16, moment_storage_dtype=BF16)


def test_lean_setting_bytes_and_loss(fp32_run):
    """bf16 roots + bf16 filtered gradient and grafting state (stochastically rounded), fp32 packed factors:
    planned bytes == allocated bytes, and the loss within 1% of fp32's (measured in docs/benchmarks.md)."""
    loss32, opt32, _ = fp32_run
    loss, opt, _ = _train(LEAN)
    bucket = opt.runtime.buckets[0]
    assert bucket.state["filtered_grad"].dtype == BF16 and bucket.state["grafting"].dtype == BF16
    assert bucket.state["factor_0"].dtype == torch.float32
    assert opt.plan.ranks[0].optimizer_state_bytes == owned_state_bytes(opt)
    numel = sum(b.numel for b in opt.plan.blocks)
    square = sum(d * (d + 1) // 2 for b in opt.plan.blocks for d in b.factor_dims)
    assert opt32.plan.ranks[0].optimizer_state_bytes - opt.plan.ranks[0].optimizer_state_bytes == \
        2 * square + 2 * 2 * numel                  # roots, filtered gradient and grafting state: 4 -> 2 bytes
    assert abs(loss - loss32) / loss32 < 0.01


def test_bf16_moments_resume_bit_exactly_and_skip_inactive_blocks():
    straight = _train(LEAN, steps=12)[2]
    _, opt, model = _train(LEAN, steps=7)
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = ShardedShampoo(model2.named_parameters(), lr=1e-2, betas=(0.9, 0.999), epsilon=1e-8,
                          precondition_frequency=5, grafting=AdamGrafting(), preconditioner=LEAN)
    opt2.load_state_dict(opt.state_dict())
    _train(LEAN, steps=5, model=model2, opt=opt2)
    for a, b in zip(straight.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # a parameter without a gradient: its bf16 moments stay bit-identical through the rounding
    def blocks_of(p: torch.Tensor) -> dict:
        return {k: {f: t.clone() for f, t in v.items()} for k, v in opt2.state[p].items() if isinstance(v, dict)}

    frozen, moving = blocks_of(model2[2].weight), blocks_of(model2[0].weight)
    model2[0].weight.grad = torch.randn_like(model2[0].weight)
    opt2.step()
    after_frozen, after_moving = blocks_of(model2[2].weight), blocks_of(model2[0].weight)
    assert frozen and all(torch.equal(t, after_frozen[k][f]) for k, v in frozen.items() for f, t in v.items())
    assert all(not torch.equal(v["filtered_grad"], after_moving[k]["filtered_grad"]) for k, v in moving.items())
    assert all(v["filtered_grad"].dtype == BF16 for v in after_frozen.values())


def test_bf16_moments_in_eigenvalue_corrected_mode():
    loss32 = _train(EigenvalueCorrectedShampoo(), steps=30)[0]
    loss, opt, _ = _train(EigenvalueCorrectedShampoo(moment_storage_dtype=BF16), steps=30)
    assert opt.runtime.buckets[0].state["grafting"].dtype == BF16
    assert opt.plan.ranks[0].optimizer_state_bytes == owned_state_bytes(opt)
    assert abs(loss - loss32) / loss32 < 0.05


def test_bad_moment_storage_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match="RootInverseShampoo.moment_storage_dtype must be"):
        RootInverseShampoo(moment_storage_dtype=torch.float16)
