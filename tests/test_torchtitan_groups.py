"""The framework-free param-group helpers of the torchtitan integration (no torchtitan needed)."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import AdamGrafting, BlockingConfig
from sharded_shampoo.integrations.trainer_groups import (expert_blocking, is_expert_weight, shampoo_group_keys,
                                                       shampoo_group_kwargs, split_expert_groups)


@pytest.mark.parametrize("fqn, ndim, expected", [
    ("layers.3.moe.routed_experts.inner_experts.w1_EFD", 3, True),   # torchtitan 0.3.0 MoE
    ("layers.3.moe.experts.w2", 3, True),                           # older torchtitan naming
    ("layers.3.moe.shared_experts.w1.weight", 2, False),            # shared expert: a plain FFN
    ("layers.3.moe.router.gate.weight", 2, False),
    ("layers.3.moe.expert_bias", 1, False),
    ("layers.0.conv.weight", 3, False),                             # 3-D but not under an experts module
    ("experts_w1", 3, False),                                       # a top-level param has no owning module path
])
def test_is_expert_weight(fqn: str, ndim: int, expected: bool) -> None:
    assert is_expert_weight(fqn, ndim) is expected


def _group(names_ndims: list[tuple[str, int]], **hp: object) -> dict:
    params = [torch.zeros((2,) * nd) for _, nd in names_ndims]
    return {"params": params, "param_names": [n for n, _ in names_ndims], **hp}


def test_split_keeps_order_hyperparameters_and_drops_empty_parts() -> None:
    blocking = BlockingConfig(merge_dims=False)
    dense_only = _group([("a.weight", 2), ("b.weight", 1)], lr=0.1)
    mixed = _group([("l.0.moe.experts.w1", 3), ("l.0.attn.wo.weight", 2), ("l.0.moe.experts.w2", 3)], lr=0.2,
                   betas=(0.9, 0.95), blocking=blocking)
    out = split_expert_groups([dense_only, mixed])
    assert [g["param_names"] for g in out] == [["a.weight", "b.weight"], ["l.0.attn.wo.weight"],
                                               ["l.0.moe.experts.w1", "l.0.moe.experts.w2"]]
    assert [g["lr"] for g in out] == [0.1, 0.2, 0.2]
    assert out[2]["betas"] == (0.9, 0.95)
    assert out[2]["params"][0] is mixed["params"][0] and out[2]["params"][1] is mixed["params"][2]
    assert "blocking" not in out[0] and out[1]["blocking"] is blocking  # dense parts keep theirs
    assert out[2]["blocking"] == BlockingConfig(merge_dims=False, batch_dims=1)


def test_split_without_pattern_is_identity() -> None:
    g = _group([("l.0.moe.experts.w1", 3), ("l.0.attn.wo.weight", 2)], lr=0.2)
    (out,) = split_expert_groups([g], None)
    assert out["param_names"] == g["param_names"] and out["params"] == g["params"] and out["lr"] == 0.2


def test_split_dense_only_needs_no_expert_blocking() -> None:
    (out,) = split_expert_groups([_group([("a.weight", 2), ("b.moe.experts.gate", 2)], lr=0.1)])
    assert out["param_names"] == ["a.weight", "b.moe.experts.gate"]


def test_split_rejects_misaligned_names() -> None:
    g = _group([("a.weight", 2)])
    g["param_names"].append("extra")
    with pytest.raises(ValueError, match="1 params but 2 param_names"):
        split_expert_groups([g])


def test_expert_blocking_keeps_user_blocking_fields() -> None:
    out = expert_blocking(BlockingConfig(precondition_1d=False, merge_dims=False))
    assert out == BlockingConfig(precondition_1d=False, merge_dims=False, batch_dims=1)
    assert expert_blocking(None) == BlockingConfig(batch_dims=1)


def test_group_keys_are_shampoo_per_group_options() -> None:
    keys = shampoo_group_keys()
    assert {"lr", "betas", "epsilon", "weight_decay", "grafting", "preconditioner", "blocking",
            "max_preconditioner_dim", "precondition_frequency"} <= keys
    assert not keys & {"mesh", "comm_dtype", "nonfinite_grads", "params", "self"}


def test_fused_and_foreach_are_dropped() -> None:
    g = {"params": [], "param_names": [], "lr": 0.1, "fused": True, "foreach": False,
         "grafting": AdamGrafting(beta2=0.95)}
    assert shampoo_group_kwargs(g) == {"params": [], "param_names": [], "lr": 0.1,
                                       "grafting": AdamGrafting(beta2=0.95)}


@pytest.mark.parametrize("key, hint", [
    ("eps", "calls it 'epsilon'"),
    ("nesterov", "use_nesterov"),
    ("mesh", "optimizer_factory_kwargs_by_name"),
    ("nonfinite_grads", "optimizer_factory_kwargs_by_name"),
    ("overlap_chunks", "optimizer_factory_kwargs_by_name"),     # was accepted per group and ignored
    ("capturable", "accepted keys"),
])
def test_unknown_keys_are_rejected_with_a_hint(key: str, hint: str) -> None:
    with pytest.raises(ValueError, match=f"pattern 'layers': ShardedShampoo has no per-group option '{key}'") as err:
        shampoo_group_kwargs({"params": [], "param_names": [], "lr": 0.1, key: 1}, pattern="layers")
    assert hint in str(err.value)
