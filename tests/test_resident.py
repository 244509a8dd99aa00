"""What the optimizer keeps allocated between steps besides its state, measured against the planner.

Measured by walking the optimizer object (``tests/support/resident.py``). Multi-rank: the same
check runs for every case of ``tests/test_distributed.py``'s grouped launches (HSDP included).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sharded_shampoo import (AdamGrafting, EigenvalueCorrectedShampoo, MeshSpec, ParamSpec, RootInverseShampoo,
                             ShardedShampoo)
from sharded_shampoo.planning.plan import PlanSettings, make_plan
from sharded_shampoo.compute.packing import index_bytes
from tests.support.resident import grad_bytes, resident_buffer_bytes, resident_tensors, step_policy_bytes

PRECONDITIONERS = {
    "root_inverse": RootInverseShampoo(),
    "root_inverse_unpacked": RootInverseShampoo(symmetric_packing=False),
    "eigen_corrected": EigenvalueCorrectedShampoo(),
    "bf16_factors": RootInverseShampoo(factor_storage_dtype=torch.bfloat16),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 96))


def _trained(preconditioner: object, release: bool, steps: int = 4) -> tuple[nn.Module, ShardedShampoo]:
    model = _model()
    opt = ShardedShampoo(model.named_parameters(), lr=1e-3, max_preconditioner_dim=256, precondition_frequency=2,
                         start_preconditioning_step=2, grafting=AdamGrafting(beta2=0.99), momentum=0.5,
                         preconditioner=preconditioner, release_buffers_between_steps=release)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 256, generator=g)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", sorted(PRECONDITIONERS))
def test_default_keeps_at_most_half_the_gradient_bytes_and_the_plan_says_so(name: str) -> None:
    _, opt = _trained(PRECONDITIONERS[name], release=False)
    kept, grads, policy = resident_buffer_bytes(opt), grad_bytes(opt), step_policy_bytes(opt)
    assert kept - policy == opt.plan.ranks[0].resident_buffer_bytes, resident_tensors(opt)
    assert policy <= 0.01 * grads, f"the step policy's constants ({policy} B) are not small against {grads} B"

    assert kept <= 0.5 * grads, f"{kept} B kept between steps > 0.5 x {grads} B of gradients: {resident_tensors(opt)}"
    assert opt.plan.ranks[0].persistent_bytes == (opt.plan.ranks[0].param_bytes + opt.plan.ranks[0].grad_bytes
                                                  + opt.plan.ranks[0].optimizer_state_bytes + kept - policy)


def test_packed_default_keeps_exactly_the_index_tables_and_salts() -> None:
    _, opt = _trained(RootInverseShampoo(), release=False)
    blocks = len(opt.plan.owned_indices(0))
    assert resident_buffer_bytes(opt) - step_policy_bytes(opt) == index_bytes(256) + index_bytes(96) + 8 * blocks


def test_release_keeps_nothing_and_changes_no_number() -> None:
    kept_model, kept_opt = _trained(RootInverseShampoo(), release=False)
    model, opt = _trained(RootInverseShampoo(), release=True)
    # nothing but the step policy's O(parameters + blocks) constants and the deferred-outcome copy stays
    assert resident_buffer_bytes(opt) - step_policy_bytes(opt) == 0 == opt.plan.ranks[0].resident_buffer_bytes, \
        resident_tensors(opt)
    for a, b in zip(model.parameters(), kept_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), kept_opt.state.values()):
        for key in a:
            for field in a[key] if isinstance(a[key], dict) else [None]:
                x, y = (a[key], b[key]) if field is None else (a[key][field], b[key][field])
                assert torch.equal(x, y), (key, field)


def test_bf16_factors_release_remakes_the_salts() -> None:
    """Stochastic rounding reads per-block salts: released and remade, the trajectory is the same."""
    kept_model, _ = _trained(PRECONDITIONERS["bf16_factors"], release=False, steps=5)
    model, opt = _trained(PRECONDITIONERS["bf16_factors"], release=True, steps=5)
    assert resident_buffer_bytes(opt) - step_policy_bytes(opt) == 0
    for a, b in zip(model.parameters(), kept_model.parameters()):
        assert torch.equal(a, b)


def test_bad_release_setting_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="release_buffers_between_steps must be True or False"):
        ShardedShampoo(_model().parameters(), release_buffers_between_steps="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PlanSettings.release_buffers_between_steps"):
        PlanSettings(release_buffers_between_steps=1)  # type: ignore[arg-type]


def test_report_json_and_memory_cap_count_resident_buffers() -> None:
    params = [ParamSpec("w", (512, 512), torch.float32)]
    mesh = MeshSpec((1,))
    kept = make_plan(params, mesh, [PlanSettings(max_preconditioner_dim=256)])
    freed = make_plan(params, mesh, [PlanSettings(max_preconditioner_dim=256, release_buffers_between_steps=True)])
    r, f = kept.ranks[0], freed.ranks[0]
    assert r.resident_buffer_bytes == index_bytes(256) + 8 * 4 and f.resident_buffer_bytes == 0
    assert r.persistent_bytes - f.persistent_bytes == r.resident_buffer_bytes
    row = json.loads(json.dumps(r.to_json()))
    assert row["resident_buffer_bytes"] == r.resident_buffer_bytes and row["persistent_bytes"] == r.persistent_bytes
    assert kept.summary.max_resident_buffer_bytes == r.resident_buffer_bytes
    # a cap between the two totals fits only the plan that frees its buffers
    cap = f.persistent_bytes + r.resident_buffer_bytes // 2
    make_plan(params, mesh, [PlanSettings(max_preconditioner_dim=256, release_buffers_between_steps=True)],
              memory_cap_bytes=cap)
    with pytest.raises(ValueError, match="memory_cap_bytes"):
        make_plan(params, mesh, [PlanSettings(max_preconditioner_dim=256)], memory_cap_bytes=cap)
