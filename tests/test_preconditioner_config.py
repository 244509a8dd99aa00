"""New config options: validation with clear errors, serialisation, equality and their cost model."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo.config import (EigenvalueCorrectedShampoo, EighRootConfig, QREigenbasisConfig,
                                    RootInverseShampoo, WarmStartRootConfig, config_from_dict, config_to_dict)
from sharded_shampoo.planning.blocking import plan_blocks
from sharded_shampoo.planning.costs import (CostModel, block_amortized_flops, block_amortized_workspace_bytes,
                                            block_state_bytes, param_state_bytes)


@pytest.mark.parametrize("make,match", [
    (lambda: WarmStartRootConfig(max_order=0), "WarmStartRootConfig.max_order"),
    (lambda: WarmStartRootConfig(probes=1.5), "WarmStartRootConfig.probes"),
    (lambda: WarmStartRootConfig(tolerance=0.0), "WarmStartRootConfig.tolerance"),
    (lambda: WarmStartRootConfig(tolerance=1.0), "WarmStartRootConfig.tolerance"),
    (lambda: WarmStartRootConfig(fallback="eigh"), "WarmStartRootConfig.fallback"),
    (lambda: QREigenbasisConfig(iterations=0), "QREigenbasisConfig.iterations"),
    (lambda: QREigenbasisConfig(fallback=None), "QREigenbasisConfig.fallback"),
    (lambda: RootInverseShampoo(root=QREigenbasisConfig()), "RootInverseShampoo.root"),
    (lambda: EigenvalueCorrectedShampoo(eigenbasis=WarmStartRootConfig()), "EigenvalueCorrectedShampoo.eigenbasis"),
    (lambda: RootInverseShampoo(factor_storage_dtype=torch.float16), "RootInverseShampoo.factor_storage_dtype"),
    (lambda: EigenvalueCorrectedShampoo(root_storage_dtype=torch.int8), "root_storage_dtype"),
    (lambda: RootInverseShampoo(root=WarmStartRootConfig(), inverse_exponent_override={2: 1 / 3}),
     "1/\\(2\\*0.333"),
])
def test_bad_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_warm_root_accepts_exponents_with_integer_half_root():
    RootInverseShampoo(root=WarmStartRootConfig(), inverse_exponent_override={2: 0.5, 3: {0: 1 / 6, 1: 0.0}})


@pytest.mark.parametrize("config", [
    RootInverseShampoo(root=WarmStartRootConfig(max_order=4, tolerance=1e-2, fallback=EighRootConfig(False, False))),
    RootInverseShampoo(factor_storage_dtype=torch.bfloat16, root_storage_dtype=torch.bfloat16),
    EigenvalueCorrectedShampoo(eigenbasis=QREigenbasisConfig(iterations=2), root_storage_dtype=torch.bfloat16),
])
def test_round_trip_and_equality(config):
    data = config_to_dict(config)
    back = config_from_dict(data)
    assert back == config and hash(back) == hash(config)
    assert config != type(config)()          # every new field takes part in equality (the fingerprint)


@pytest.mark.parametrize("packed", [True, False])
def test_state_bytes_follow_storage_dtypes(packed):
    pre = RootInverseShampoo(factor_storage_dtype=torch.bfloat16, symmetric_packing=packed)
    b = plan_blocks([("w", (64, 32))], 1024, pre)[0]
    got = block_state_bytes(b, pre, None, 0.9)
    square = 64 * 65 // 2 + 32 * 33 // 2 if packed else 64 * 64 + 32 * 32
    assert got["factors"] == square * 2 and got["roots"] == square * 4
    assert got["filtered_grad"] == 64 * 32 * 4
    for shape, d in (((300, 70), 64), ((5, 1000), 128), ((17,), 8)):
        blocks = plan_blocks([("w", shape)], d, pre)
        per = [sum(block_state_bytes(x, pre, None, 0.9).values()) for x in blocks]
        assert param_state_bytes(shape, d, pre, None, 0.9) == (max(per), sum(per), len(blocks))


def test_cost_model_of_cheap_refreshes():
    d = 512
    b = plan_blocks([("w", (d, d))], 1024, RootInverseShampoo())[0]
    eigh = block_amortized_flops(b, RootInverseShampoo())
    warm = RootInverseShampoo(root=WarmStartRootConfig())
    # q = 2 for an order-2 block: (2 + 3 + 1) GEMMs of 2 d^3, plus 10% of an eigh root (11 d^3)
    assert block_amortized_flops(b, warm) == pytest.approx(2 * (6 * 2 + 0.1 * 11) * d ** 3)
    assert block_amortized_flops(b, warm, CostModel(warm_fallback_rate=1.0)) > eigh
    qr = EigenvalueCorrectedShampoo(eigenbasis=QREigenbasisConfig())
    assert block_amortized_flops(b, qr) == pytest.approx(2 * (2 + 8 / 3 + 0.1 * 9) * d ** 3)
    assert block_amortized_flops(b, qr) < block_amortized_flops(b, EigenvalueCorrectedShampoo()) / 1.5
    # workspace: the larger of the method's and its eigh fallback's (fp64 retry counted)
    assert block_amortized_workspace_bytes(b, warm) == max(5 * d * d * 4, (3 * d * d + d) * 8)
    assert block_amortized_workspace_bytes(b, qr) == max(4 * d * d * 4, (3 * d * d + d) * 8)
    with pytest.raises(ValueError, match="CostModel.warm_fallback_rate"):
        CostModel(warm_fallback_rate=2.0)
    with pytest.raises(ValueError, match="CostModel.warm_series_order"):
        CostModel(warm_series_order=0)


def test_new_fields_at_default_keep_the_old_dicts():
    """Checkpoints written before these options existed keep their fingerprint and load."""
    assert config_to_dict(RootInverseShampoo()) == {
        "__config__": "RootInverseShampoo",
        "root": {"__config__": "EighRootConfig", "make_positive_semidefinite": True, "retry_in_float64": True},
        "inverse_exponent_override": {"__mapping__": []}, "factor_dtype": {"__dtype__": "float32"},
        "max_consecutive_root_failures": 10}
    assert set(config_to_dict(EigenvalueCorrectedShampoo())) == {
        "__config__", "inverse_exponent_override", "factor_dtype", "max_consecutive_root_failures"}
    assert config_from_dict(config_to_dict(EigenvalueCorrectedShampoo())) == EigenvalueCorrectedShampoo()
    assert "root_storage_dtype" in config_to_dict(RootInverseShampoo(root_storage_dtype=torch.bfloat16))
