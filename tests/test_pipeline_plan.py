"""Pipeline parallel in the dry-run: torchtitan's stage split, stage-local plans, report, JSON, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sharded_shampoo.config import PlanSettings
from sharded_shampoo.dryrun import MAX_RANKS, PipelinePlan, format_report, llm_stage_modules, parse_axes, plan_model
from sharded_shampoo.dryrun.cli import main
from sharded_shampoo.dryrun.models import LLAMA_TINY, GPT2, Llama, transformer_tp_plan
from sharded_shampoo.dryrun.models.llama import LlamaBlock
from sharded_shampoo.dryrun.stage_report import modules_text
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec
from sharded_shampoo.planning.pipeline import PIPELINE_JSON_SCHEMA, make_pipeline_plan
from sharded_shampoo.planning.plan import make_plan


@pytest.mark.parametrize("stages,layers", [(1, 4), (2, 2), (4, 2), (2, 7), (4, 32), (16, 126), (3, 10), (8, 61)])
def test_stage_split_is_torchtitans(stages, layers):
    pp = pytest.importorskip("torchtitan.distributed.pipeline_parallel")
    theirs = pp._generate_llm_fqn_per_model_part(stages, layers)
    assert llm_stage_modules(stages, layers, outputs=("norm", "lm_head")) == theirs


def test_stage_split_by_hand_and_its_limits():
    # llama3-405b on pp=16: 126 layers + embedding + head = 128 effective layers, 8 per stage
    split = llm_stage_modules(16, 126)
    assert split[0] == ["tok_embeddings"] + [f"layers.{i}" for i in range(7)]
    assert split[1] == [f"layers.{i}" for i in range(7, 15)]
    assert split[15] == [f"layers.{i}" for i in range(119, 126)] + ["norm", "output"]
    with pytest.raises(ValueError, match="pp=5 is too many stages for 2 layers"):
        llm_stage_modules(5, 2)


class _Stage(nn.Module):
    """One pipeline stage of llama-tiny written out by hand (not through the dry-run's splitter)."""

    def __init__(self, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        cfg = LLAMA_TINY
        if first:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg) for i in layers})
        if last:
            self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.layers.values())

    def tp_plan(self) -> dict:
        names = {n for n, _ in self.named_modules()}
        full = transformer_tp_plan(LLAMA_TINY.n_layers, ffn=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
        return {k: v for k, v in full.items() if k in names}


@pytest.mark.parametrize("mesh", ["pp=2,dp=2,fsdp=2", "pp=2,fsdp=2,tp=2"])
def test_pipeline_plan_equals_planning_each_stage_alone(mesh):
    plan = plan_model("llama-tiny", mesh)
    assert isinstance(plan, PipelinePlan) and plan.pp == 2
    assert plan.stage_modules == [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]
    stage_mesh = mesh.replace("pp=2,", "")
    alone = [plan_model(lambda: _Stage([0], True, False), stage_mesh),
             plan_model(lambda: _Stage([1], False, True), stage_mesh)]
    for staged, single in zip(plan.stages, alone):
        assert [p.name for p in staged.params] == [p.name for p in single.params]
        assert [b.block_id for b in staged.blocks] == [b.block_id for b in single.blocks]
        assert staged.owners == single.owners
        assert [r.to_json() for r in staged.ranks] == [r.to_json() for r in single.ranks]
    # every parameter of the model is in exactly one stage; ranks are numbered job-wide
    whole = plan_model("llama-tiny", stage_mesh)
    assert sorted(p.name for s in plan.stages for p in s.params) == sorted(p.name for p in whole.params)
    assert plan.world_size == 2 * whole.mesh.world_size
    stage, report = plan.rank(whole.mesh.world_size + 1)
    assert stage == 1 and report is plan.stages[1].ranks[1]


def test_make_pipeline_plan_is_make_plan_per_stage_and_checks_its_inputs():
    mesh = MeshSpec((2,))
    stages = [[ParamSpec("a", (64, 32), torch.float32, True)], [ParamSpec("b", (16,), torch.float32, True)], []]
    plan = make_pipeline_plan(stages, mesh, PlanSettings(max_preconditioner_dim=16))
    for params, staged in zip(stages, plan.stages):
        alone = make_plan(params, mesh, PlanSettings(max_preconditioner_dim=16))
        assert [r.to_json() for r in staged.ranks] == [r.to_json() for r in alone.ranks]
    assert plan.stages[2].summary.num_blocks == 0                       # a stage without parameters
    assert plan.worst_stage("memory") == 0 and plan.worst_stage("load") == 0
    with pytest.raises(ValueError, match="'a' is in stages 0 and 1"):
        make_pipeline_plan([stages[0], stages[0]], mesh, PlanSettings())
    with pytest.raises(ValueError, match="one entry per stage"):
        make_pipeline_plan(stages, mesh, [PlanSettings()])
    with pytest.raises(ValueError, match="by must be"):
        plan.worst_stage("time")
    with pytest.raises(ValueError, match=r"pipeline stage 0: .*memory_cap_bytes"):
        make_pipeline_plan(stages, mesh, PlanSettings(), memory_cap_bytes=1000)


def test_pipeline_report_and_json():
    plan = plan_model("llama-tiny", "pp=2,dp=2,fsdp=2")
    text = format_report(plan, "llama-tiny")
    assert "mesh pp=2 x dp=2 x fsdp=2 (8 ranks: 2 stages of 4)" in text
    assert "tok_embeddings, layers.0" in text and "layers.1, norm, output" in text
    worst = plan.worst_stage("memory")
    assert f"worst stage by memory: {worst}" in text
    first = plan.global_rank(worst, 0)
    assert f"ranks {first}-{first + 3}:" in text                        # the worst stage, numbered job-wide
    data = json.loads(json.dumps(plan.to_json(include_blocks=False)))
    assert data["schema"] == PIPELINE_JSON_SCHEMA
    assert data["mesh"] == {"shape": [2, 2, 2], "world_size": 8} and data["mesh_dim_names"] == ["pp", "dp", "fsdp"]
    assert data["worst_stage"]["by_memory"] == worst
    assert [s["first_rank"] for s in data["stages"]] == [0, 4]
    assert all("blocks" not in s["plan"] for s in data["stages"])
    summaries = data["stage_summaries"]
    assert summaries[worst]["max_persistent_bytes"] == max(s["max_persistent_bytes"] for s in summaries)
    assert summaries[0]["max_persistent_bytes"] == max(r.persistent_bytes for r in plan.stages[0].ranks)


def test_modules_text_compresses_layer_runs():
    assert modules_text(["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.5", "norm"]) == \
        "tok_embeddings, layers.0-2, layers.5, norm"
    assert modules_text([]) == "(no modules)"


def test_cli_pipeline_dry_run(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    argv = ["plan", "--model", "llama-tiny", "--mesh", "pp=2,dp=2,fsdp=2", "--json", str(out_json)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--png", str(tmp_path / "plan.png")]
    except ImportError:
        pass
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "per stage" in text and "worst stage by memory" in text
    data = json.loads(out_json.read_text())
    assert data["model"] == "llama-tiny" and data["pipeline"]["pp"] == 2
    assert "blocks" in data["stages"][0]["plan"]
    if "--png" in argv:
        assert (tmp_path / "plan.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet50", "--mesh", "pp=2,fsdp=2"], "defines no pipeline_stages"),
    (["--model", "llama-tiny", "--mesh", "pp=5,fsdp=2"], "pp=5 is too many stages"),
    (["--model", "llama-tiny", "--mesh", "pp=0,fsdp=2"], "has a zero dimension"),
    (["--model", "llama-tiny", "--mesh", f"pp=2,fsdp={MAX_RANKS}"], "more than the dry-run plans"),
])
def test_cli_pipeline_errors(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_stage_split_callable_and_its_errors():
    def three(model, n):
        assert n == 3
        return [["tok_embeddings"], ["layers.0", "layers.1"], ["norm", "output"]]

    plan = plan_model("llama-tiny", "pp=3,fsdp=2", stage_split=three)
    assert [len(s.params) for s in plan.stages] == [1, 18, 2]
    bad = {
        "not a submodule": lambda m, n: [["tok_embeddings", "layers.9"], ["norm", "output"]],
        "overlaps": lambda m, n: [["layers", "tok_embeddings"], ["layers.1", "norm", "output"]],
        "in no pipeline stage": lambda m, n: [["tok_embeddings"], ["layers", "norm"]],
        "gave 1 stages for pp=2": lambda m, n: [["tok_embeddings", "layers", "norm", "output"]],
    }
    for message, split in bad.items():
        with pytest.raises(ValueError, match=message):
            plan_model("llama-tiny", "pp=2,fsdp=2", stage_split=split)
    def tied(m, n):                   # GPT-2 ties lm_head to wte
        return [["wte", "wpe", "h"], ["ln_f", "lm_head"]]

    with pytest.raises(ValueError, match="shared between pipeline stages: lm_head.weight|wte.weight"):
        plan_model(lambda: GPT2(n_layers=2, width=64, heads=4, context=32, vocab_size=100), "pp=2,fsdp=2",
                   stage_split=tied)


def test_mesh_cap_and_pp_axis():
    axes = parse_axes("pp=16,dp=32,fsdp=16,tp=8")
    assert (axes.world_size, axes.stage_world_size, MAX_RANKS) == (65536, 4096, 65536)
    assert parse_axes("pp=2,fsdp=4").dense() == (("fsdp",), (4,))
    with pytest.raises(ValueError, match=r"131072 ranks is more than the dry-run plans \(65536\)"):
        parse_axes("pp=32,dp=32,fsdp=16,tp=8")


def test_llama_preset_pipeline_stages_cover_the_model():
    with torch.device("meta"):
        model = Llama(LLAMA_TINY)
    assert model.pipeline_stages(2) == [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]
