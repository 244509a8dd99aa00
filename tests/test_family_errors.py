"""Bad inputs of issue 16's Shampoo-family options (eigendecomposed Shampoo, the adaptive refresh
``tolerance``, ``trace_scaling_exponent``, ``drop_weighting_factor_on_gsquare``, ``PseudoInverse``,
``beta3``): each error names the argument and the fix, and a rejected call changes nothing."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tests.support.numerics import make_params, set_grads
from sharded_shampoo import (CoupledNewtonConfig, EigendecomposedShampoo, EigenvalueCorrectedShampoo, EighRootConfig,
                             PseudoInverse, QREigenbasisConfig, RootInverseShampoo, ShardedShampoo)
from sharded_shampoo.config import WarmStartRootConfig

SHAPES = {"w": (6, 5), "b": (5,)}
PINV = EighRootConfig(rank_handling=PseudoInverse())

BAD_CONFIGS = [
    (lambda: EigendecomposedShampoo(tolerance=-0.1), "EigendecomposedShampoo.tolerance"),
    (lambda: EigendecomposedShampoo(tolerance=1.5), "EigendecomposedShampoo.tolerance"),
    (lambda: EigendecomposedShampoo(tolerance=math.nan), "EigendecomposedShampoo.tolerance"),
    (lambda: EigendecomposedShampoo(tolerance="0.1"), "EigendecomposedShampoo.tolerance"),
    (lambda: EigenvalueCorrectedShampoo(tolerance=2.0), "EigenvalueCorrectedShampoo.tolerance"),
    (lambda: EigenvalueCorrectedShampoo(tolerance=-1e-3), "EigenvalueCorrectedShampoo.tolerance"),
    (lambda: RootInverseShampoo(trace_scaling_exponent=0.0), "RootInverseShampoo.trace_scaling_exponent"),
    (lambda: RootInverseShampoo(trace_scaling_exponent=1.5), "RootInverseShampoo.trace_scaling_exponent"),
    (lambda: EigendecomposedShampoo(trace_scaling_exponent=-0.5), "EigendecomposedShampoo.trace_scaling_exponent"),
    (lambda: EigenvalueCorrectedShampoo(trace_scaling_exponent=math.inf),
     "EigenvalueCorrectedShampoo.trace_scaling_exponent"),
    (lambda: RootInverseShampoo(drop_weighting_factor_on_gsquare=1),
     "RootInverseShampoo.drop_weighting_factor_on_gsquare"),
    (lambda: EigendecomposedShampoo(drop_weighting_factor_on_gsquare="yes"),
     "EigendecomposedShampoo.drop_weighting_factor_on_gsquare"),
    (lambda: PseudoInverse(rank_atol=-1.0), "PseudoInverse.rank_atol"),
    (lambda: PseudoInverse(rank_atol=math.nan), "PseudoInverse.rank_atol"),
    (lambda: PseudoInverse(rank_rtol=-1e-3), "PseudoInverse.rank_rtol"),
    (lambda: PseudoInverse(rank_rtol=math.inf), "PseudoInverse.rank_rtol"),
    (lambda: EighRootConfig(rank_handling=0.1), "EighRootConfig.rank_handling"),
    (lambda: EigendecomposedShampoo(eigenbasis=CoupledNewtonConfig()), "EigendecomposedShampoo.eigenbasis"),
    (lambda: EigendecomposedShampoo(eigenbasis=WarmStartRootConfig()), "EigendecomposedShampoo.eigenbasis"),
    (lambda: EigendecomposedShampoo(inverse_exponent_override={2: -1.0}),
     "EigendecomposedShampoo.inverse_exponent_override[2]"),
    (lambda: EigendecomposedShampoo(root_storage_dtype=torch.float16), "EigendecomposedShampoo.root_storage_dtype"),
    (lambda: EigendecomposedShampoo(max_consecutive_root_failures=0),
     "EigendecomposedShampoo.max_consecutive_root_failures"),
    (lambda: EigenvalueCorrectedShampoo(eigenbasis=PINV), "EigenvalueCorrectedShampoo does not take PseudoInverse"),
    (lambda: WarmStartRootConfig(fallback=PINV), "WarmStartRootConfig.fallback.rank_handling"),
]


@pytest.mark.parametrize("make,field", BAD_CONFIGS, ids=[f"{i}:{f}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_family_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


BAD_GROUPS = [
    (dict(beta3=1.0), "beta3"), (dict(beta3=-0.5), "beta3"), (dict(beta3=math.nan), "beta3"),
    (dict(betas=(0.0, 0.99), beta3=0.5), "set betas[0] > 0 or beta3=None"),
    (dict(epsilon=0.0, preconditioner=EigendecomposedShampoo()), "epsilon must be a finite number > 0"),
    (dict(epsilon=1e-6, preconditioner=EigendecomposedShampoo(eigenbasis=PINV)), "Set epsilon=0.0"),
    (dict(epsilon=1e-6, preconditioner=RootInverseShampoo(root=PINV)), "Set epsilon=0.0"),
    (dict(epsilon=1e-6, preconditioner=EigendecomposedShampoo(eigenbasis=QREigenbasisConfig(fallback=PINV))),
     "Set epsilon=0.0"),
]


@pytest.mark.parametrize("kwargs,message", BAD_GROUPS, ids=[m for _, m in BAD_GROUPS])
def test_bad_group_settings_name_the_argument(kwargs, message):
    params = make_params(torch.float32, shapes=SHAPES)
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardedShampoo(list(params.items()), max_preconditioner_dim=8, **{"epsilon": 1e-6, **kwargs})


def _state_copy(opt: ShardedShampoo) -> dict:
    return {id(p): {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in _flat(s)}
            for p, s in opt.state.items()}


def _flat(state: dict, prefix: str = ""):
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("key,value", [("beta3", 1.0), ("epsilon", 0.0)])
def test_bad_value_set_in_a_group_is_caught_at_step_and_changes_nothing(key, value):
    params = make_params(torch.float32, shapes=SHAPES)
    opt = ShardedShampoo(list(params.items()), max_preconditioner_dim=8, precondition_frequency=2, epsilon=1e-6,
                         preconditioner=EigendecomposedShampoo(tolerance=0.1))
    for t in range(3):
        set_grads(params.values(), t)
        opt.step()
    before = {n: p.detach().clone() for n, p in params.items()}, _state_copy(opt)
    opt.param_groups[0][key] = value
    set_grads(params.values(), 3)
    with pytest.raises(ValueError, match=key):
        opt.step()
    after = {n: p.detach().clone() for n, p in params.items()}, _state_copy(opt)
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    for pid, fields in before[1].items():
        for name, v in fields.items():
            w = after[1][pid][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, name
