"""torchtitan's own Llama3 and qwen3-MoE debug models on 4 CPU gloo ranks, parallelized by torchtitan.

Skipped without torchtitan (CI installs the ``[torchtitan]`` extra). Each test is one launch of
4 ranks forked from one process that imported torchtitan once for the module (titan_ranks.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchtitan")

from tests.support import pipeline_scenarios, titan_scenarios
from tests.support.titan_harness import Layout
from tests.support.titan_ranks import TitanRanks


S0, S1, R = "Shard(dim=0)", "Shard(dim=1)", "Replicate()"
SS0 = "_StridedShard(dim=0, sf=2)"
# Observed with torchtitan 0.3.0 (spmd_backend="partial_dtensor"), world 4; docs/parallelism.md shows
# the same table. kind -> (global shape, mesh, placements, local shape on every rank)
LLAMA3_FSDP2_TP2 = {
    "tok_embeddings.weight": ((2048, 256), "fsdp=2,tp=2", f"{SS0}, {S0}", (512, 256)),
    "layers.*.attention.qkv_linear.wqkv.weight": ((768, 256), "fsdp=2,tp=2", f"{SS0}, {S0}", (192, 256)),
    "layers.*.attention.wo.weight": ((256, 256), "fsdp=2,tp=2", f"{S0}, {S1}", (128, 128)),
    "layers.*.feed_forward.w1.weight": ((768, 256), "fsdp=2,tp=2", f"{SS0}, {S0}", (192, 256)),
    "layers.*.feed_forward.w2.weight": ((256, 768), "fsdp=2,tp=2", f"{S0}, {S1}", (128, 384)),
    "layers.*.feed_forward.w3.weight": ((768, 256), "fsdp=2,tp=2", f"{SS0}, {S0}", (192, 256)),
    "layers.*.attention_norm.weight": ((256,), "fsdp=2,tp=2", f"{S0}, {R}", (128,)),
    "layers.*.ffn_norm.weight": ((256,), "fsdp=2,tp=2", f"{S0}, {R}", (128,)),
    "norm.weight": ((256,), "fsdp=2,tp=2", f"{S0}, {R}", (128,)),
    "lm_head.weight": ((2048, 256), "fsdp=2,tp=2", f"{SS0}, {S0}", (512, 256)),
}
EXPERTS = "layers.*.moe.routed_experts.inner_experts."
MOE_FSDP4_EP2 = {
    "tok_embeddings.weight": ((2048, 256), "fsdp=4", S0, (512, 256)),
    "layers.*.attention.qkv_linear.wqkv.weight": ((4096, 256), "fsdp=4", S0, (1024, 256)),
    "layers.*.attention.wo.weight": ((256, 2048), "fsdp=4", S0, (64, 2048)),
    "layers.*.attention.q_norm.weight": ((128,), "fsdp=4", S0, (32,)),
    "layers.*.attention.k_norm.weight": ((128,), "fsdp=4", S0, (32,)),
    EXPERTS + "w1_EFD": ((4, 64, 256), "efsdp=2,ep=2", f"{SS0}, {S0}", (1, 64, 256)),
    EXPERTS + "w2_EDF": ((4, 256, 64), "efsdp=2,ep=2", f"{SS0}, {S0}", (1, 256, 64)),
    EXPERTS + "w3_EFD": ((4, 64, 256), "efsdp=2,ep=2", f"{SS0}, {S0}", (1, 64, 256)),
    "layers.*.moe.router.gate.weight": ((4, 256), "fsdp=4", S0, (1, 256)),
    "layers.*.attention_norm.weight": ((256,), "fsdp=4", S0, (64,)),
    "layers.*.ffn_norm.weight": ((256,), "fsdp=4", S0, (64,)),
    "norm.weight": ((256,), "fsdp=4", S0, (64,)),
    "lm_head.weight": ((2048, 256), "fsdp=4", S0, (512, 256)),
}


@pytest.fixture(scope="module")
def titan() -> Iterator[TitanRanks]:
    ranks = TitanRanks()
    yield ranks
    ranks.close()


def _merged(results: list[dict[str, Any]], key: str) -> dict[str, tuple[float, float]]:
    """Per-rank state fingerprints merged; a block's state must be held by exactly one rank."""
    merged: dict[str, tuple[float, float]] = {}
    for r, res in enumerate(results):
        for k, v in res[key].items():
            # group steps, and torchtitan AdamW's per-parameter step (a plain scalar on every rank)
            if k.startswith("param_groups.") or k.endswith(".step"):
                assert merged.setdefault(k, v) == v, (k, r)
                continue
            assert k not in merged, f"{k} held by two ranks ({key})"
            merged[k] = v
    return merged


def _check_train_save_resume(results: list[dict[str, Any]], steps: int, rel: float = 1e-3) -> None:
    """Loss falls; the resumed run starts from exactly the saved state and continues the curve.

    Every layout of the harness computes the global-mean gradient (titan_harness: torchtitan's FSDP
    sums over data-parallel ranks, so each rank's loss is divided by their number), so the resumed
    losses of any two layouts are comparable; ``rel=0`` demands bit-identical losses.
    """
    losses = results[0]["losses"]
    assert all(res["losses"] == losses for res in results)  # all-reduced: one value on every rank
    assert len(losses) == 2 * steps and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(res["loaded_step"] == steps for res in results)
    saved, loaded = _merged(results, "saved_state"), _merged(results, "loaded_state")
    assert any(k.startswith("state.") for k in saved)
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert loaded[k] == saved[k], k  # a copy: bit-identical tensors, so identical float64 sums
    # the first resumed loss depends on the restored weights only, the next ones on the restored
    # optimizer state too. Other layouts sum gradients in another order and fresh factors (3
    # gradients) amplify that: FSDP 4 -> HSDP 2x2 differs by 4e-5 relative at the second resumed step.
    resumed = results[0]["resumed_losses"]
    assert resumed == pytest.approx(losses[steps:], rel=rel)


def test_adamw_placements_fsdp_tp_and_ep(titan: TitanRanks) -> None:
    """The harness: torchtitan's AdamW trains both layouts; the placements are the documented ones."""
    results = titan.run(4, titan_scenarios.adamw_layouts)
    llama, moe = results[0]["llama3 fsdp2 x tp2"], results[0]["moe fsdp4 / efsdp2 x ep2"]
    for key in ("kinds", "mesh_ranks"):  # every rank sees the same shapes and meshes
        assert all(res[label][key] == results[0][label][key] for res in results for label in results[0])
    assert llama["kinds"] == LLAMA3_FSDP2_TP2
    assert moe["kinds"] == MOE_FSDP4_EP2
    # sub-meshes of one world mesh: dense (fsdp, tp) has tp fastest; experts (efsdp, ep) has ep fastest
    assert llama["mesh_ranks"]["lm_head.weight"] == [[0, 1], [2, 3]]
    assert moe["mesh_ranks"][EXPERTS + "w1_EFD"] == [[0, 1], [2, 3]]
    assert moe["mesh_ranks"]["lm_head.weight"] == [0, 1, 2, 3]
    # the box of the global tensor each rank 0..3 holds: what the core must compute from placements.
    # (_StridedShard(0, sf=2), Shard(0)) on (fsdp, tp): rank 2f+t holds row chunk 2t+f, TP-major
    def regions(label: str, kind: str) -> list[str]:
        return [res[label]["regions"][kind] for res in results]

    dense = "llama3 fsdp2 x tp2"
    assert regions(dense, "layers.*.attention.qkv_linear.wqkv.weight") == [
        "[0:192, 0:256]", "[384:576, 0:256]", "[192:384, 0:256]", "[576:768, 0:256]"]
    assert regions(dense, "layers.*.attention.wo.weight") == [
        "[0:128, 0:128]", "[0:128, 128:256]", "[128:256, 0:128]", "[128:256, 128:256]"]
    assert regions(dense, "norm.weight") == ["[0:128]", "[0:128]", "[128:256]", "[128:256]"]  # replicated over tp
    # experts over (efsdp, ep): each rank one whole expert; rank 2e+p (efsdp e, ep p) holds expert 2p+e
    assert regions("moe fsdp4 / efsdp2 x ep2", EXPERTS + "w2_EDF") == [
        "[0:1, 0:256, 0:64]", "[2:3, 0:256, 0:64]", "[1:2, 0:256, 0:64]", "[3:4, 0:256, 0:64]"]
    for report in (llama, moe):
        losses = report["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_fsdp_llama3_shampoo_trains_and_resumes_on_hsdp(titan: TitanRanks, tmp_path: Path) -> None:
    """FSDP 4 -> HSDP 2x2 through torchtitan's CheckpointManager, with today's core."""
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"), ("llama3", Layout()),
                              ("llama3", Layout(dp_replicate=2, dp_shard=2)))
    _check_train_save_resume(results, steps=2)
    first, second = results[0]["first_kinds"], results[0]["second_kinds"]
    assert first["lm_head.weight"] == ((2048, 256), "fsdp=4", "Shard(dim=0)", (512, 256))
    assert second["lm_head.weight"] == ((2048, 256), "dp_replicate=2,fsdp=2", "Replicate(), Shard(dim=0)",
                                        (1024, 256))


def test_fsdp_tp_llama3_shampoo_trains_and_resumes_on_fsdp(titan: TitanRanks, tmp_path: Path) -> None:
    """FSDP x TP 2x2 -> FSDP 4 through torchtitan's CheckpointManager."""
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"), ("llama3", Layout(tp=2)),
                              ("llama3", Layout()))
    _check_train_save_resume(results, steps=2)


def test_ep_moe_shampoo_trains_and_resumes_without_ep(titan: TitanRanks, tmp_path: Path) -> None:
    """qwen3 MoE (shrunk) with EP 2 -> no EP, through torchtitan's CheckpointManager; experts per expert."""
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"), ("moe", Layout(ep=2)),
                              ("moe", Layout()))
    _check_train_save_resume(results, steps=2)
    assert results[0]["second_kinds"][EXPERTS + "w1_EFD"][1:3] == ("fsdp=4", "Shard(dim=0)")


def test_dryrun_of_torchtitan_layouts_equals_real_allocation(titan: TitanRanks) -> None:
    """The dry-run of a torchtitan model (torchtitan's parallelize_fn over a fake process group) gives every
    rank exactly the optimizer-state bytes a real run allocates: FSDP x TP 2x2 and EP 2, one launch."""
    from sharded_shampoo import AdamGrafting
    from sharded_shampoo.config import PlanSettings
    from sharded_shampoo.dryrun import plan_model
    from sharded_shampoo.dryrun.titan_source import titan_model_module

    from tests.support import titan_harness as th

    titan_model_module("qwen3")   # moe_spec edits torchtitan's qwen3 configs: import it as the dry-run does
    kw = titan_scenarios.SHAMPOO_KW
    settings = PlanSettings(max_preconditioner_dim=kw["max_preconditioner_dim"], beta1=kw["betas"][0],
                            grafting=AdamGrafting(beta2=0.95, epsilon=1e-8),
                            precondition_frequency=kw["precondition_frequency"])
    dry = {"llama3 fsdp2 x tp2": plan_model("torchtitan:llama3:debugmodel", "fsdp=2,tp=2", settings),
           "moe fsdp4 / efsdp2 x ep2": plan_model(th.moe_spec(), "fsdp=4,ep=2", settings)}
    results = titan.run(4, titan_scenarios.state_bytes_layouts)
    for label, plan in dry.items():
        planned = [r.optimizer_state_bytes for r in plan.ranks]
        real = [res[label][0] for res in results]
        own = [res[label][1] for res in results]
        assert real == own == planned, (label, real, own, planned)
        assert min(real) > 0
    # per-expert blocks in both: 2 layers x 3 expert weights x 4 experts, each its own [64, 256] or [256, 64] block
    moe = dry["moe fsdp4 / efsdp2 x ep2"]
    assert sum(1 for b in moe.blocks if ".inner_experts." in b.block_id) == 2 * 3 * 4
def test_pipeline_stages_equal_one_process(titan: TitanRanks) -> None:
    """pp=2 x fsdp=2, torch.distributed.pipelining GPipe, one ShardedShampoo per stage == 1 process."""
    results = titan.run(4, pipeline_scenarios.stage_local_exactness)
    assert [res["stage"] for res in results] == [0, 0, 1, 1]
    assert [res["group_ranks"] for res in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(res["plan_ranks"] == 2 for res in results)  # each stage plans over its own 2 ranks
    assert results[0]["blocks"] == ["layers.0.weight.block_0", "layers.1.weight.block_0"]
    assert results[2]["blocks"] == ["layers.2.weight.block_0", "layers.3.weight.block_0"]
    for res in results:
        # measured: gradients <= 3e-18, parameters <= 3e-8 after 6 steps (fp32 factors of fp64 gradients)
        assert max(res["grad_diffs"].values()) <= 1e-12, res["grad_diffs"]
        assert max(res["diffs"].values()) <= 1e-6, res["diffs"]
    assert min(results[0]["moved"].values()) > 0.1  # the parameters did move


def test_pipeline_llama3_resumes_exactly_on_the_same_layout(titan: TitanRanks, tmp_path: Path) -> None:
    """torchtitan's Llama3 (2 layers) with torchtitan's pipelining (pp=2 x fsdp=2, GPipe): AdamW for the
    embeddings (stage 0 only: a pattern that matches on one stage), ShardedShampoo for the rest.
    Saved through torchtitan's CheckpointManager and resumed on the same layout: bit-identical losses."""
    layout = Layout(pp=2, dp_shard=2)
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"), ("llama3-2layers", layout),
                        ("llama3-2layers", layout), "shampoo+adamw")
    _check_train_save_resume(results, steps=2, rel=0.0)
    # stage 0 (ranks 0, 1) holds the embeddings and layer 0; stage 1 (ranks 2, 3) layer 1, norm, head
    stage0, stage1 = results[0]["first_kinds"], results[2]["first_kinds"]
    assert "tok_embeddings.weight" in stage0 and "lm_head.weight" not in stage0
    assert "lm_head.weight" in stage1 and "tok_embeddings.weight" not in stage1
    assert stage1["lm_head.weight"] == ((2048, 256), "fsdp=2", "Shard(dim=0)", (1024, 256))


def test_pipeline_llama3_resumes_without_pp(titan: TitanRanks, tmp_path: Path) -> None:
    """pp=2 x fsdp=2 -> pp=1 x fsdp=4: the checkpoint's stage-local states load into one optimizer."""
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"),
                        ("llama3-2layers", Layout(pp=2, dp_shard=2)), ("llama3-2layers", Layout()), "shampoo+adamw")
    _check_train_save_resume(results, steps=2)
    assert results[0]["second_kinds"]["lm_head.weight"] == ((2048, 256), "fsdp=4", "Shard(dim=0)", (512, 256))


def test_pipeline_interleaved_llama3_resumes_without_pp(titan: TitanRanks, tmp_path: Path) -> None:
    """Interleaved1F1B: 4 virtual stages, 2 model parts per rank; stage 0 holds only the AdamW embeddings
    (a model part without ShardedShampoo parameters). Resumed on pp=1 x fsdp=4."""
    first = Layout(pp=2, dp_shard=2, pp_schedule="Interleaved1F1B")
    results = titan.run(4, titan_scenarios.train_save_resume, str(tmp_path / "ckpt"), ("llama3-2layers", first),
                        ("llama3-2layers", Layout()), "shampoo+adamw")
    _check_train_save_resume(results, steps=2)
    # torchtitan's split: stages [embeddings], [layer 0], [layer 1], [norm, head]; rank p holds p and p + 2
    assert results[0]["first_parts"] == [["tok_embeddings"], ["layers.1"]]
    assert results[2]["first_parts"] == [["layers.0"], ["lm_head", "norm"]]
    assert results[0]["first_optimizers"] == ["AdamW", "ShardedShampoo"]
    assert results[2]["first_optimizers"] == ["ShardedShampoo"]
    assert results[0]["second_optimizers"] == ["AdamW", "ShardedShampoo"]


def test_a_pattern_may_match_on_one_stage_only(titan: TitanRanks) -> None:
    """Container patterns across pipeline stages: matched somewhere is enough, matched nowhere raises on every rank."""
    results = titan.run(4, pipeline_scenarios.container_patterns_across_stages)
    assert [res["kinds"] for res in results] == [["AdamW"], ["AdamW"], ["ShardedShampoo"], ["ShardedShampoo"]]
    for res in results:
        assert "pattern(s) ['experts'] matched no trainable parameter in any model part on any rank" in res["error"]
