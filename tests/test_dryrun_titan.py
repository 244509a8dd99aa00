"""The dry-run's torchtitan model source: ``torchtitan:<model>:<flavor>`` laid out by torchtitan itself.

In-process, meta device and a fake process group (no ranks are spawned). Skipped without
torchtitan. That the per-rank bytes equal a real run's is tested in test_torchtitan_dist.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchtitan")

from sharded_shampoo.dryrun import PipelinePlan, llm_stage_modules, plan_model
from sharded_shampoo.dryrun.cli import main
from sharded_shampoo.dryrun.titan_source import titan_model_module

LLAMA = "torchtitan:llama3:debugmodel"


def test_tp_layout_is_torchtitans() -> None:
    """torchtitan's FSDP x TP layout reaches the plan: 2x2 mesh, every parameter of the 6-layer model planned."""
    plan = plan_model(LLAMA, "fsdp=2,tp=2")
    assert plan.mesh.shape == (2, 2)
    assert len({b.param_name for b in plan.blocks}) == 6 * 7 + 3    # 7 weights per layer + embedding, norm, head
    params = 6 * (4 * 768 * 256 + 256 * 256 + 2 * 256) + 2 * 2048 * 256 + 256
    norms = (6 * 2 + 1) * 256          # (Shard(0), Replicate()): each norm is held by both TP ranks
    assert sum(r.param_bytes for r in plan.ranks) == 4 * (params + norms)


def test_pipeline_stages_are_split_by_torchtitans_pipelining_fn() -> None:
    """pp=2: torchtitan's pipelining_fn keeps each pipeline rank's stage; stages partition the model's blocks."""
    whole = plan_model(LLAMA, "fsdp=2,tp=2")
    plan = plan_model(LLAMA, "pp=2,fsdp=2,tp=2")
    assert isinstance(plan, PipelinePlan) and plan.pp == 2 and plan.world_size == 8
    assert plan.stage_modules == llm_stage_modules(2, 6, outputs=("norm", "lm_head"))
    stage_ids = [{b.block_id for b in stage.blocks} for stage in plan.stages]
    assert not stage_ids[0] & stage_ids[1]
    assert stage_ids[0] | stage_ids[1] == {b.block_id for b in whole.blocks}
    for stage, modules in zip(plan.stages, plan.stage_modules):   # each stage plans its own modules only
        assert all(any(b.param_name.startswith(m + ".") for m in modules) for b in stage.blocks)


def test_expert_weights_get_per_expert_blocks_and_ep_layout() -> None:
    """qwen3 MoE on EP 2: each expert weight [64, d, d'] is 64 matrices, with blocks of its own."""
    plan = plan_model("torchtitan:qwen3:debugmodel_moe", "fsdp=4,ep=2")
    w1 = [b for b in plan.blocks if b.param_name == "layers.0.moe.routed_experts.inner_experts.w1_EFD"]
    assert len(w1) == 64
    dense = plan_model("torchtitan:qwen3:debugmodel_moe", "fsdp=4")
    assert {b.block_id for b in plan.blocks} == {b.block_id for b in dense.blocks}


def test_torchtitan_global_settings_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The build runs on CPU meshes with the partial_dtensor backend, and leaves torchtitan as it found it --
    also where torchtitan chose "cuda" at import (a GPU host), emulated here."""
    utils = pytest.importorskip("torchtitan.distributed.utils")
    parallel_dims = pytest.importorskip("torchtitan.distributed.parallel_dims")
    monkeypatch.setattr(parallel_dims, "device_type", "cuda")
    utils.set_spmd_backend("spmd_types")          # torchtitan's default
    try:
        plan = plan_model(LLAMA, "fsdp=2")
        assert (utils.get_spmd_backend(), parallel_dims.device_type) == ("spmd_types", "cuda")
    finally:
        utils.set_spmd_backend("spmd_types")
    assert plan.mesh.shape == (2,) and plan.summary.num_blocks > 0


@pytest.mark.parametrize("source, message", [
    ("torchtitan:llama3", "write torchtitan:<model>:<flavor>"),
    ("torchtitan:nosuchmodel:x", "torchtitan has no model 'nosuchmodel'; its models are"),
    ("torchtitan:llama3:9B", "has no flavor '9B'; its flavors are 1B, 3B, 405B, 70B, 8B, debugmodel"),
])
def test_bad_torchtitan_sources_say_what_to_write(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_model(source, "fsdp=2")


def test_layouts_torchtitan_refuses_and_stage_split_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"pipelining_fn refused the layout .*Number of stages \(16\)"):
        plan_model(LLAMA, "pp=16,fsdp=1")
    with pytest.raises(ValueError, match=r"on fsdp=1024: torchtitan's parallelize_fn refused the layout "
                                         r"\(NotImplementedError: FSDP does not support uneven sharding on dim 1"):
        plan_model("torchtitan:qwen3:debugmodel_moe", "1024")      # experts [64, 768, 256] on dim 1, 768 % 1024
    with pytest.raises(ValueError, match="stage_split: a torchtitan model is split into stages by torchtitan"):
        plan_model(LLAMA, "pp=2,fsdp=2", stage_split=lambda model, n: [[]] * n)


def test_cli_plans_a_torchtitan_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", LLAMA, "--mesh", "fsdp=2,tp=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model {LLAMA} | mesh fsdp=2 x tp=2 |")
    assert main(["plan", "--model", "torchtitan:llama3:9B", "--mesh", "2"]) == 2
    assert "has no flavor '9B'" in capsys.readouterr().err


def test_titan_model_module_imports_a_model_package() -> None:
    assert callable(titan_model_module("qwen3").model_registry)


@pytest.mark.parametrize("axes", ["fsdp=128,ep=2", "fsdp=8,ep=2", "fsdp=128"])
def test_presets_lay_experts_out_as_torchtitan_does(axes: str) -> None:
    """Our MoE with torchtitan's qwen3 debug sizes (64 experts) gets torchtitan's expert placements and mesh:
    Shard(1) under FSDP when efsdp x ep (or the FSDP size without EP) exceeds the 64 experts, dim 0 otherwise."""
    import dataclasses

    from sharded_shampoo.dryrun import parse_axes, shard_model
    from sharded_shampoo.dryrun.models import MOE_TINY
    from sharded_shampoo.dryrun.models.moe import MoETransformer
    from sharded_shampoo.dryrun.titan_source import shard_titan_stages, titan_spec

    cfg = dataclasses.replace(MOE_TINY, num_experts=64, dim=256, ffn_dim=128)
    ours = shard_model(lambda: MoETransformer(cfg), parse_axes(axes))
    theirs = shard_titan_stages(titan_spec("torchtitan:qwen3:debugmodel_moe")[1], parse_axes(axes))[0]

    def layout(specs: list, suffix: str) -> tuple:
        spec = next(s for s in specs if s.name.endswith(suffix))
        return tuple(map(repr, spec.layout.placements)), spec.layout.mesh.shape, spec.layout.mesh.dim_names

    assert layout(ours.specs, "experts.w1") == layout(theirs.specs, "inner_experts.w1_EFD")
    expected_dim = 1 if axes != "fsdp=8,ep=2" else 0
    assert f"Shard(dim={expected_dim}" in layout(ours.specs, "experts.w1")[0][0]   # FSDP's placement (first mesh dim)
