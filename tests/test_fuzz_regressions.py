"""Regression tests for the defects the randomized multi-rank fuzzer found (docs/testing.md).

Each test reproduces one defect in one process, in milliseconds. The multi-rank form stays covered
by ``test_fuzz.py``'s fixed seeds: with one fix reverted, seed 2072 (overflow), 2434 (bf16 L2
fold) or 1306 (bf16 momentum) fails there. The seed numbers in the comments below are those of
the generator version that found each defect (the generator has grown since).
"""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import NonFiniteGradientError, RootInverseShampoo, ShardedShampoo, unpack_symmetric


def _block_state(opt: ShardedShampoo, p: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in opt.state[p]["block_0"].values()]


# ----------------------------------------------------------------------------- overflow detection
# Found by fuzz seeds 8 and 32 (an fp64 parameter, fp32 statistics) and 55 (a 1-element parameter):
# a finite gradient whose squares overflow the fp32 statistics was not detected, so the factors
# became inf silently and the run diverged from the 1-process run by 0.1-0.4, on every policy.


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("dtype,shape", [(torch.float64, (7, 4)), (torch.float32, (1,)), (torch.bfloat16, (1,))])
def test_gradient_overflowing_fp32_statistics_follows_the_policy(policy, dtype, shape):
    """fp64 gradients get fp64 norms (1e30 is finite there), and torch's fp32 norm of one element is
    |x| (1e30, finite): neither overflows, yet 1e30 squared is inf in the fp32 factors."""
    p = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
    opt = ShardedShampoo([("p", p)], lr=0.1, precondition_frequency=1, nonfinite_grads=policy)
    before, state = p.detach().clone(), _block_state(opt, p)
    g = torch.zeros(shape, dtype=dtype)
    g.view(-1)[0] = 1e30
    p.grad = g
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="overflow"):
            opt.step()
    else:
        opt.step()
        assert opt.last_step_skipped
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(a, b) for a, b in zip(state, _block_state(opt, p)))
    p.grad = torch.ones(shape, dtype=dtype)      # training goes on, with finite statistics
    opt.step()
    assert all(bool(torch.isfinite(t).all()) for t in _block_state(opt, p))


def test_fp64_statistics_still_take_what_they_can_represent():
    """1e30 squared is 1e60: representable in fp64 factors, so it is a (legitimate) gradient there."""
    p = torch.nn.Parameter(torch.ones(7, 4, dtype=torch.float64))
    opt = ShardedShampoo([("p", p)], lr=0.1, precondition_frequency=1,
                         preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    g = torch.zeros(7, 4, dtype=torch.float64)
    g[0, 0] = 1e30
    p.grad = g
    opt.step()
    assert not opt.last_step_skipped and float(opt.state[p]["block_0"]["factor_0"].max()) > 1e56


# ----------------------------------------------------------------------------- L2 weight decay of bf16 gradients
# Found by fuzz seed 2 (bf16 expert weights, L2 weight decay, FSDP over 4 ranks): g + wd * p was
# computed in bf16, and torch's bf16 ``a + alpha * b`` rounds differently in its vector body and its
# scalar tail, so the folded gradient depended on how the parameter was sharded (1 bf16 ulp, which
# moved the run by 1e-3 from the 1-process run) -- and lost precision on one process too.


def test_l2_weight_decay_of_bf16_gradients_folds_in_fp32():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 37).bfloat16())
    g = torch.randn(5, 37).bfloat16()
    wd, beta2 = 0.05, 0.5
    opt = ShardedShampoo([("p", p)], lr=0.1, betas=(0.0, beta2), weight_decay=wd, use_decoupled_weight_decay=False,
                         max_preconditioner_dim=64, precondition_frequency=1)
    G = g.float() + wd * p.detach().float()          # the L2-decayed gradient, rounded once (to fp32)
    p.grad = g
    opt.step()
    factor = unpack_symmetric(opt.state[p]["block_0"]["factor_0"])
    expected = (1 - beta2) * (G.double() @ G.double().T)
    rel = float((factor.double() - expected).abs().max() / expected.abs().max())
    assert rel < 1e-6, f"the factor was built from a gradient rounded to bf16 (relative error {rel:.2g})"



# ----------------------------------------------------------------------------- momentum of bf16 parameters
# Found by fuzz seeds 0, 99 and 115 (bf16 parameters with momentum under FSDP / EP): the update
# p <- p - lr * m added a bf16 momentum buffer to a bf16 parameter with torch's bf16 a + alpha * b
# kernel (see above), so parameters differed from the 1-process run by 1 bf16 ulp where the shard
# boundaries moved an element between the kernel's vector body and its tail.


def test_momentum_update_of_bf16_parameters_rounds_once():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 37).bfloat16())
    lr = 0.1
    opt = ShardedShampoo([("p", p)], lr=lr, momentum=0.9, max_preconditioner_dim=64, precondition_frequency=1)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(5, 37).bfloat16()
        opt.step()
        m = opt.state[p]["momentum"]
        expected = (before.float() - lr * m.float()).bfloat16()     # computed in fp32, rounded once
        assert torch.equal(p.detach(), expected), f"step {step}: {(p.detach() != expected).sum()} elements differ"
