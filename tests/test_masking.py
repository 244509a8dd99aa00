"""The masked bucket step: a device mask, never read on the host on a plain step; inactive blocks change
nothing, bit for bit, whatever their gradient rows hold; active blocks step as if alone."""

from __future__ import annotations

import pytest
import torch

from tests.support.host_reads import count_host_reads
from tests.support.numerics import max_rel_diff
from sharded_shampoo import KLShampoo
from sharded_shampoo.compute.preconditioner import BlockBucket, BucketConfig, BucketHyperparams, BucketStep
from sharded_shampoo.compute.kinds.eigendecomposed import EigendecomposedShampoo
from sharded_shampoo.compute.kinds.eigendecomposed_kl import EigendecomposedKLShampoo
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                                    EighRootConfig, ElementwiseMode, PseudoInverse, QREigenbasisConfig,
                                    RMSpropGrafting, RootInverseShampoo, SGDGrafting, WarmStartRootConfig)
from sharded_shampoo import SVD, NewtonSchulz, SignDescent, SpectralDescent
from sharded_shampoo.planning.blocking import Block

BF16 = torch.bfloat16
B = 7
SHAPE = (6, 5)
EXPONENTS = (0.25, 0.25)

#: (preconditioner, grafting, beta1, beta2, use_bias_correction)
CONFIGS = {
    "root-packed-adagrad": (RootInverseShampoo(), AdaGradGrafting(), 0.9, 0.999, True),
    "root-full-adam": (RootInverseShampoo(symmetric_packing=False), AdamGrafting(), 0.9, 0.99, True),
    "root-packed-bf16-rmsprop": (RootInverseShampoo(factor_storage_dtype=BF16, root_storage_dtype=BF16),
                                 RMSpropGrafting(), 0.0, 0.99, False),
    "root-full-bf16-sgd": (RootInverseShampoo(symmetric_packing=False, factor_storage_dtype=BF16), SGDGrafting(),
                           0.9, 1.0, True),
    "root-warm-none": (RootInverseShampoo(root=WarmStartRootConfig()), None, 0.9, 0.95, True),
    "eigen-packed": (EigenvalueCorrectedShampoo(), None, 0.9, 0.95, True),
    "eigen-qr-full-adagrad": (EigenvalueCorrectedShampoo(eigenbasis=QREigenbasisConfig(), symmetric_packing=False),
                              AdaGradGrafting(), 0.0, 0.95, True),
    "root-drop-weighting-like": (RootInverseShampoo(), AdamGrafting(), 0.5, 0.9, False),
    "kl-packed-adagrad": (KLShampoo(), AdaGradGrafting(), 0.9, 0.999, True),
    "kl-full-bf16-newton": (KLShampoo(root=CoupledNewtonConfig(), symmetric_packing=False, factor_storage_dtype=BF16,
                                      root_storage_dtype=BF16), None, 0.9, 0.95, True),
    "spectral-ns-adagrad": (SpectralDescent(), AdaGradGrafting(), 0.9, 0.999, True),
    "spectral-ns-bf16-muon": (SpectralDescent(NewtonSchulz(matmul_dtype=BF16, scale_by_dims_fn="muon")), None,
                              0.95, 0.999, False),
    "spectral-svd-nuclear": (SpectralDescent(SVD(scale_by_nuclear_norm=True)), None, 0.0, 0.999, True),
    "sign-l1-rmsprop": (SignDescent(scale_fn="l1_norm"), RMSpropGrafting(), 0.9, 0.99, True),
    # issue 16's Shampoo-family variants; a sixth entry: hyperparameters besides (beta1, beta2, bias correction)
    "eigendecomposed-packed-adagrad": (EigendecomposedShampoo(), AdaGradGrafting(), 0.9, 0.999, True),
    "eigendecomposed-qr-full-tol": (EigendecomposedShampoo(eigenbasis=QREigenbasisConfig(), tolerance=0.3,
                                                           symmetric_packing=False), None, 0.9, 0.95, True),
    "eigendecomposed-pinv-trace-bf16": (EigendecomposedShampoo(eigenbasis=EighRootConfig(rank_handling=PseudoInverse(
        rank_rtol=1e-6)), trace_scaling_exponent=0.5, root_storage_dtype=BF16), RMSpropGrafting(), 0.9, 0.99, True,
        dict(epsilon=0.0)),
    "eigendecomposed-kl-packed-tol-adagrad": (EigendecomposedKLShampoo(tolerance=0.3), AdaGradGrafting(), 0.9, 0.999,
                                              True),
    "eigendecomposed-kl-qr-full-bf16": (EigendecomposedKLShampoo(eigenbasis=QREigenbasisConfig(), symmetric_packing=False,
                                                                 factor_storage_dtype=BF16, root_storage_dtype=BF16),
                                        None, 0.9, 0.95, True),
    "eigen-tol-drop-weighting": (EigenvalueCorrectedShampoo(tolerance=0.3, drop_weighting_factor_on_gsquare=True),
                                 AdamGrafting(), 0.9, 0.95, True),
    "root-beta3-adagrad": (RootInverseShampoo(), AdaGradGrafting(), 0.9, 0.999, True, dict(beta3=0.81)),
    "root-beta3-trace-none": (RootInverseShampoo(trace_scaling_exponent=0.25), None, 0.9, 0.99, False,
                              dict(beta3=0.95)),
    "root-pinv-beta3-sgd": (RootInverseShampoo(root=EighRootConfig(rank_handling=PseudoInverse())),
                                     SGDGrafting(), 0.9, 0.99, True, dict(beta3=0.5, epsilon=0.0)),
    "root-beta3-adam-compiled": (RootInverseShampoo(), AdamGrafting(), 0.8, 0.99, True,
                                 dict(beta3=0.6, elementwise=ElementwiseMode.COMPILE)),
}


def _bucket(name: str, ids: range = range(B)) -> tuple[BlockBucket, BucketHyperparams]:
    pre, grafting, beta1, beta2, bc, *extra = CONFIGS[name]
    blocks = [Block(block_id=f"p{i}.block_0", param_name=f"p{i}", param_shape=SHAPE, merged_shape=SHAPE,
                    ranges=tuple((0, d) for d in SHAPE), exponents=EXPONENTS) for i in ids]
    bucket = BlockBucket(blocks, BucketConfig(pre, grafting, beta1 > 0), torch.device("cpu"))
    settings = {"epsilon": 1e-6, **(extra[0] if extra else {})}
    return bucket, BucketHyperparams(beta1=beta1, beta2=beta2, use_bias_correction=bc, **settings)


def _grads(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *SHAPE, generator=g) * torch.logspace(-1, 1, B).view(B, 1, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_step_reads_nothing_on_the_host(name):
    bucket, hp = _bucket(name)
    gen = torch.Generator().manual_seed(1)
    # a refresh first (it may read the host), so the plain steps precondition with real roots
    bucket.step_blocks(_grads(0), BucketStep(hp, refresh_roots=True, precondition=True))
    with count_host_reads() as counts:
        for t in range(1, 4):
            active = torch.rand(B, generator=gen) < 0.6
            bucket.step_blocks(_grads(t), BucketStep(hp, refresh_roots=False, precondition=True, active=active))
            bucket.step_blocks(_grads(t + 10), BucketStep(hp, refresh_roots=False, precondition=t > 1))
    assert not counts, f"host reads on a plain step: {dict(counts)}"


def _snapshot(bucket: BlockBucket, j: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bucket.state_views(j).items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inactive_blocks_change_nothing_and_active_ones_step_as_if_alone(name):
    bucket, hp = _bucket(name)
    alone = [_bucket(name, range(j, j + 1))[0] for j in range(B)]      # same block ids: same rounding bits
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 9):
        active = torch.rand(B, generator=gen) < 0.5
        active[t % B], active[(t + 3) % B] = True, False
        G = _grads(t)
        G[~active] = torch.tensor(float("nan"))      # garbage in inactive rows must not leak anywhere
        G[(t + 3) % B, 0, 0] = float("inf")
        before = [_snapshot(bucket, j) for j in range(B)]
        step = BucketStep(hp, refresh_roots=t % 3 == 0, precondition=t >= 3, active=active)
        P = bucket.step_blocks(G.clone(), step)
        for j in range(B):
            if not bool(active[j]):
                assert torch.equal(P[j], torch.zeros_like(P[j])), f"step {t}: inactive block {j} got a direction"
                after = _snapshot(bucket, j)
                for k in before[j]:
                    assert torch.equal(after[k], before[j][k]), f"step {t}: inactive block {j} changed {k}"
            else:
                Pj = alone[j].step_blocks(G[j:j + 1].clone(), BucketStep(hp, step.refresh_roots, step.precondition))
                assert max_rel_diff(P[j], Pj[0]) <= 1e-5, f"step {t}: block {j}"
    for j in range(B):
        assert int(bucket.step[j]) == int(alone[j].step[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_all_active_mask_equals_no_mask(name):
    masked, hp = _bucket(name)
    plain, _ = _bucket(name)
    everything = torch.ones(B, dtype=torch.bool)
    for t in range(1, 7):
        kw = dict(refresh_roots=t % 3 == 0, precondition=t >= 3)
        P = masked.step_blocks(_grads(t), BucketStep(hp, active=everything, **kw))
        Q = plain.step_blocks(_grads(t), BucketStep(hp, **kw))
        assert max_rel_diff(P, Q) <= 1e-6, f"step {t}"
