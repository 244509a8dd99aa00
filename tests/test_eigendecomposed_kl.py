"""EigendecomposedKLShampoo: its config (validation, identity, serialisation) and the math it shares.

The update itself is checked against a dense float64 implementation in tests/test_dense_family.py
(kind "eigkl"); here: with ``tolerance=0`` and eigh it is root-inverse KL-Shampoo stored as eigenpairs
(same numbers to round-off), and it is not eigendecomposed Shampoo (the factors differ after the first
refresh).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.numerics import max_rel_diff
from tests.test_kl_shampoo import _train
from sharded_shampoo import (EigendecomposedKLShampoo, EigendecomposedShampoo, KLShampoo, QREigenbasisConfig,
                             RootInverseShampoo)
from sharded_shampoo.config import config_from_dict, config_to_dict

F64 = torch.float64
SHAPES = [(6, 5), (3, 4, 5), (7,)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(tolerance=1.5), "EigendecomposedKLShampoo.tolerance must be a finite number in [0.0, 1.0]"),
    (dict(tolerance=-0.1), "EigendecomposedKLShampoo.tolerance must be a finite number in [0.0, 1.0]"),
    (dict(symmetric_packing=1), "EigendecomposedKLShampoo.symmetric_packing must be True"),
    (dict(trace_scaling_exponent=2.0), "EigendecomposedKLShampoo.trace_scaling_exponent"),
    (dict(eigenbasis=RootInverseShampoo()), "EigendecomposedKLShampoo.eigenbasis must be EighRootConfig()"),
    (dict(factor_dtype=torch.float16), "EigendecomposedKLShampoo.factor_dtype must be torch.float32 or"),
    (dict(inverse_exponent_override={2: -1.0}), "EigendecomposedKLShampoo.inverse_exponent_override"),
])
def test_bad_fields_name_the_class_and_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        EigendecomposedKLShampoo(**kwargs)
    assert message in str(err.value)


def test_identity_and_serialisation():
    """Never equal to EigendecomposedShampoo of the same fields (a different optimizer); restored by name."""
    cfg = EigendecomposedKLShampoo(tolerance=0.05, eigenbasis=QREigenbasisConfig(), symmetric_packing=False)
    assert cfg != EigendecomposedShampoo(tolerance=0.05, eigenbasis=QREigenbasisConfig(), symmetric_packing=False)
    assert EigendecomposedShampoo() != EigendecomposedKLShampoo()
    assert cfg == EigendecomposedKLShampoo(tolerance=0.05, eigenbasis=QREigenbasisConfig(), symmetric_packing=False)
    assert hash(cfg) == hash(EigendecomposedKLShampoo(tolerance=0.05, eigenbasis=QREigenbasisConfig(),
                                                      symmetric_packing=False))
    back = config_from_dict(config_to_dict(cfg))
    assert type(back) is EigendecomposedKLShampoo and back == cfg


@pytest.mark.parametrize("packing", [True, False])
def test_equals_kl_shampoo_with_eigh_roots_and_differs_from_eigendecomposed_shampoo(packing):
    ours, _ = _train(EigendecomposedKLShampoo(factor_dtype=F64, symmetric_packing=packing), SHAPES, steps=8)
    kl, _ = _train(KLShampoo(factor_dtype=F64, symmetric_packing=packing), SHAPES, steps=8)
    eig, _ = _train(EigendecomposedShampoo(factor_dtype=F64, symmetric_packing=packing), SHAPES, steps=8)
    for a, b in zip(ours, kl):
        assert max_rel_diff(a, b) < 1e-9
    assert max_rel_diff(ours[0], eig[0]) > 1e-4 and max_rel_diff(ours[1], eig[1]) > 1e-4
    assert torch.equal(ours[2], eig[2])           # a 1-D block has no other dim: Shampoo's update


def test_bf16_eigenvectors_follow_the_float32_run():
    """Low-precision eigenvector storage: the roots are formed in bf16 (as the direction's rotation runs)."""
    full, _ = _train(EigendecomposedKLShampoo(), SHAPES, steps=8, dtype=torch.float32)
    bf16_roots, _ = _train(EigendecomposedKLShampoo(root_storage_dtype=torch.bfloat16), SHAPES, steps=8,
                     dtype=torch.float32)
    for a, b in zip(full, bf16_roots):
        assert torch.isfinite(b).all() and max_rel_diff(a, b) < 5e-2


def test_checkpoint_fingerprint_tells_it_from_eigendecomposed_shampoo():
    """Same state keys and shapes as EigendecomposedShampoo, another statistic: a checkpoint of one never
    resumes the other (the fingerprint differs, so the loader raises "preconditioner differs")."""
    from sharded_shampoo.checkpointing import describe

    _, eig = _train(EigendecomposedShampoo(factor_dtype=F64), SHAPES, steps=0)
    _, ours = _train(EigendecomposedKLShampoo(factor_dtype=F64), SHAPES, steps=0)
    assert set(eig.state_dict()["state"]) == set(ours.state_dict()["state"])
    assert describe(eig)["fingerprint"] != describe(ours)["fingerprint"]
