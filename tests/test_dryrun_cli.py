"""Dry-run planner end to end: fake process group + fully_shard on meta, CLI in-process, JSON, PNG."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from sharded_shampoo.dryrun.cli import main
from sharded_shampoo.dryrun import (
    DryRunError,
    format_report,
    parse_dtype,
    parse_mesh,
    plan_model,
    resolve_model,
    sharded_param_specs,
    write_png,
)
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec
from sharded_shampoo.planning.plan import JSON_SCHEMA, PlanSettings, make_plan
from sharded_shampoo.dryrun.presets import LLAMA_TINY, PRESETS, Llama, fsdp_units


@pytest.fixture(autouse=True)
def no_leaked_process_group():
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized(), "the dry-run must destroy its fake process group"


def test_parse_mesh():
    assert parse_mesh("64") == (64,)
    assert parse_mesh("16x64") == (16, 64)
    assert parse_mesh(" 2X3 ") == (2, 3)
    for bad in ("", "16x", "x4", "2x3x4", "a", "-4", "4.0", "16*64"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="zero"):
        parse_mesh("0x4")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="--param-dtype 'int8'"):
        parse_dtype("int8")


def test_resolve_model_errors(tmp_path, monkeypatch):
    assert resolve_model("llama-tiny")[0] == "llama-tiny"
    with pytest.raises(ValueError, match="'llama9' is not a preset"):
        resolve_model("llama9")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_xyz.models'"):
        resolve_model("no_such_pkg_xyz.models:build")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_model("json:nope")
    with pytest.raises(ValueError, match="not a callable"):
        resolve_model("json.decoder:NaN")
    with pytest.raises(ValueError, match="both parts"):
        resolve_model("json:")


def test_fsdp_units_default_rule():
    with torch.device("meta"):
        model = Llama(LLAMA_TINY)
    assert fsdp_units(model) == list(model.layers)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 1))
    assert fsdp_units(seq) == [seq[1][0]]


def test_sharded_specs_from_fake_pg_fsdp():
    specs, mesh = sharded_param_specs(PRESETS["llama-tiny"], (4,))
    assert mesh == MeshSpec((4,))
    with torch.device("meta"):
        expected = [(n, tuple(p.shape)) for n, p in Llama(LLAMA_TINY).named_parameters()]
    assert [(s.name, s.shape) for s in specs] == expected
    assert all(s.sharded and s.dtype == torch.float32 for s in specs)
    # HSDP and bf16: same shapes, (Replicate, Shard(0)) -> sharded, on a 2-D mesh
    specs2, mesh2 = sharded_param_specs(PRESETS["llama-tiny"], (2, 3), torch.bfloat16)
    assert mesh2 == MeshSpec((2, 3))
    assert [(s.name, s.shape) for s in specs2] == expected
    assert all(s.sharded and s.dtype == torch.bfloat16 for s in specs2)


def test_dry_run_plan_equals_make_plan_on_the_same_specs():
    plan = plan_model("llama-tiny", "2x2", PlanSettings(max_preconditioner_dim=128))
    with torch.device("meta"):
        specs = [ParamSpec(n, tuple(p.shape), p.dtype, True) for n, p in Llama(LLAMA_TINY).named_parameters()]
    direct = make_plan(specs, MeshSpec((2, 2)), PlanSettings(max_preconditioner_dim=128))
    assert plan.owners == direct.owners
    assert [r.to_json() for r in plan.ranks] == [r.to_json() for r in direct.ranks]


def test_cli_end_to_end_tiny_model(tmp_path, capsys):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "--model", "llama-tiny", "--mesh", "4", "--max-preconditioner-dim", "256",
               "--precondition-frequency", "50", "--param-dtype", "bf16", "--json", str(out_json),
               "--png", str(out_png)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "model llama-tiny | mesh 4 (FSDP)" in text and "imbalance max/mean" in text
    data = json.loads(out_json.read_text())
    assert data["schema"] == JSON_SCHEMA and data["model"] == "llama-tiny"
    assert data["mesh"] == {"shape": [4], "world_size": 4}
    assert data["settings"][0]["max_preconditioner_dim"] == 256
    assert data["settings"][0]["precondition_frequency"] == 50
    params = sum(p.numel() for p in Llama(LLAMA_TINY).parameters())
    # bf16 params: 2 bytes each, split over 4 shards (every dim-0 divides evenly by 4 here)
    assert [r["param_bytes"] for r in data["ranks"]] == [params * 2 // 4] * 4
    assert all(r["grad_bytes"] == r["param_bytes"] for r in data["ranks"])
    for r in data["ranks"]:
        assert sum(r["optimizer_state_breakdown"].values()) == r["optimizer_state_bytes"]
    assert {b["owner"] for b in data["blocks"]} == {0, 1, 2, 3}
    assert data["summary"]["num_blocks"] == len(data["blocks"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_hsdp_and_large_mesh_table(capsys):
    assert main(["plan", "--model", "llama-tiny", "--mesh", "2x16", "--json-no-blocks"]) == 0
    text = capsys.readouterr().out
    assert "mesh 2x16 (HSDP: replicate x shard)" in text
    assert "over 32 ranks" in text and "median" in text and "busiest 8 ranks" in text


def test_cli_module_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models_for_plan.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Tower(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList(nn.Linear(96, 96) for _ in range(3))
                self.head = nn.Linear(96, 10, bias=False)
                self.frozen = nn.Linear(4, 4)
                self.frozen.requires_grad_(False)

        def build():
            return Tower()

        def not_a_module():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out_json = tmp_path / "p.json"
    assert main(["plan", "--model", "my_models_for_plan:build", "--mesh", "3", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    names = [p["name"] for p in data["params"]]
    assert names == [f"blocks.{i}.{w}" for i in range(3) for w in ("weight", "bias")] + ["head.weight"]
    assert all(p["sharded"] for p in data["params"])
    # head.weight (10 x 96): torch.chunk over 3 shards -> 4, 4, 2 rows
    head = 10 * 96 * 4
    per_rank = [r["param_bytes"] for r in data["ranks"]]
    assert sum(per_rank) == 3 * (96 * 96 + 96) * 4 + head
    assert main(["plan", "--model", "my_models_for_plan:not_a_module", "--mesh", "2"]) == 2
    assert "returned a int" in capsys.readouterr().err
    sys.modules.pop("my_models_for_plan", None)


@pytest.mark.parametrize("argv,message", [
    (["plan", "--model", "llama-tiny", "--mesh", "16x"], "--mesh '16x' is not valid"),
    (["plan", "--model", "gpt5", "--mesh", "8"], "'gpt5' is not a preset"),
    (["plan", "--model", "nowhere_pkg_q.mod:f", "--mesh", "8"], "cannot import module 'nowhere_pkg_q.mod'"),
    (["plan", "--model", "llama-tiny", "--mesh", "8", "--param-dtype", "fp8"], "--param-dtype 'fp8'"),
    (["plan", "--model", "llama-tiny", "--mesh", "8", "--max-preconditioner-dim", "0"], "--max-preconditioner-dim"),
    (["plan", "--model", "llama-tiny", "--mesh", "8", "--memory-cap-gib", "-1"], "--memory-cap-gib"),
    (["plan", "--mesh", "8"], "needs --model"),
    (["plan", "--model", "llama-tiny", "--mesh", "8", "--beta1", "1.5"], "--beta1 must be a number in [0, 1)"),
    (["plan", "--model", "llama-tiny", "--mesh", "8", "--factor-dtype", "bf16"], "factor_dtype must be"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err


def test_cli_memory_cap_error(capsys):
    assert main(["plan", "--model", "llama-tiny", "--mesh", "2", "--memory-cap-gib", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "block '" in err and "max_preconditioner_dim" in err


def test_cli_usage_and_listing(capsys):
    assert main(["plan", "--list-models"]) == 0
    assert capsys.readouterr().out.split() == sorted(PRESETS)
    assert main(["--help"]) == 0
    assert main(["plan", "--bogus"]) == 2


def test_live_process_group_is_refused():
    from sharded_shampoo._torch_compat import fake_store
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=2)
    try:
        with pytest.raises(DryRunError, match="already initialized"):
            sharded_param_specs(PRESETS["llama-tiny"], (2,))
    finally:
        dist.destroy_process_group()


def test_png_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    plan = make_plan([ParamSpec("w", (8, 8), torch.float32, True)], MeshSpec((2,)), PlanSettings())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DryRunError, match=r"sharded-shampoo\[plot\]"):
        write_png(plan, str(tmp_path / "x.png"))


def test_presets_match_published_sizes():
    counts = {}
    for name in ("llama3-8b", "llama3-70b", "llama3-405b", "gpt2-small", "resnet50"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in PRESETS[name]().parameters())
    assert counts == {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
                      "llama3-405b": 405_853_388_800, "gpt2-small": 124_439_808, "resnet50": 25_557_032}


def test_format_report_small_mesh_lists_every_rank():
    plan = make_plan([ParamSpec("w", (64, 64), torch.float32, True)], MeshSpec((2, 2)), PlanSettings())
    text = format_report(plan, "toy")
    lines = text.splitlines()
    assert any(line.split()[:3] == ["3", "1", "1"] for line in lines)   # rank 3 = replica 1, shard 1
    assert "max/lower bound 1.0000" in text


# ----------------------------------------------------------------------------- hardening, TP / EP meshes


def test_parse_axes_named_and_flags():
    from sharded_shampoo.dryrun import MAX_RANKS, MeshAxes, parse_axes

    assert parse_axes("64") == MeshAxes(fsdp=64)
    assert parse_axes("16x64") == MeshAxes(dp=16, fsdp=64)
    assert parse_axes("dp=8,fsdp=32,tp=8") == MeshAxes(dp=8, fsdp=32, tp=8)
    assert parse_axes("64", tp=8, ep=8) == MeshAxes(fsdp=64, tp=8, ep=8)
    assert parse_axes("dp=8,fsdp=32,tp=8").world_size == 2048
    for bad, match in (("dp=8,fsdq=4", "axis=size"), ("fsdp=4,fsdp=4", "twice"), ("fsdp=0", "zero"),
                       ("fsdp=6,ep=4", "ep=4 must divide"), (f"fsdp={MAX_RANKS + 1}", "more than the dry-run")):
        with pytest.raises(ValueError, match=match):
            parse_axes(bad)
    with pytest.raises(ValueError, match="--tp 4 contradicts"):
        parse_axes("fsdp=4,tp=2", tp=4)


def test_cli_huge_mesh_is_refused_fast(capsys):
    import time

    t0 = time.perf_counter()
    assert main(["plan", "--model", "llama-tiny", "--mesh", "1000000"]) == 2
    assert time.perf_counter() - t0 < 5
    assert "more than the dry-run plans" in capsys.readouterr().err


@pytest.mark.parametrize("body,message", [
    ("def build():\n    raise RuntimeError('no config file')\n", "the factory raised RuntimeError: no config file"),
    ("def build(cfg):\n    return None\n", "must be callable with no arguments"),
    ("import torch.nn as nn\ndef build():\n    m = nn.Linear(3, 3)\n"
     "    m.weight = nn.Parameter(m.weight.detach().to(torch.complex64))\n    return m\nimport torch\n",
     "complex"),
])
def test_cli_bad_factories_exit_2_with_one_line(tmp_path, monkeypatch, capsys, body, message):
    (tmp_path / "bad_factory_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_factory_mod", None)
    assert main(["plan", "--model", "bad_factory_mod:build", "--mesh", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    sys.modules.pop("bad_factory_mod", None)


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_cli_unwritable_outputs_fail_before_planning(tmp_path, capsys, option):
    import time

    for path, message in ((tmp_path / "missing" / "p.out", "does not exist"), (tmp_path, "is a directory")):
        t0 = time.perf_counter()
        assert main(["plan", "--model", "llama3-405b", "--mesh", "32x64", option, str(path)]) == 2
        assert time.perf_counter() - t0 < 5, "outputs must be checked before minutes of planning"
        assert message in capsys.readouterr().err


def test_tensor_and_expert_parallel_dry_run():
    tp = plan_model("llama-tiny", "fsdp=2,tp=2", PlanSettings(max_preconditioner_dim=128))
    wq = next(p for p in tp.params if p.name == "layers.0.attention.wq.weight")
    assert [repr(x) for x in wq.layout.placements] == ["_StridedShard(dim=0, sf=2)", "Shard(dim=0)"]
    assert tp.mesh.dim_names == ("fsdp", "tp") and len(tp.ranks) == 4
    text = format_report(tp, "t")
    assert "mesh fsdp=2 x tp=2" in text and any(line.split()[:2] == ["3", "1,1"] for line in text.splitlines())
    moe = plan_model("moe-tiny", "4", PlanSettings(max_preconditioner_dim=128), ep=2)
    experts = [b for b in moe.blocks if b.param_name == "layers.0.moe.experts.w1"]
    assert len(experts) == 4 and all(b.shape == (64, 96) for b in experts)   # one block set per expert
    w1 = next(p for p in moe.params if p.name == "layers.0.moe.experts.w1")
    assert w1.layout.mesh.dim_names == ("efsdp", "ep")
    # each expert is held whole by one rank, which owns it: no gradient traffic for experts
    from sharded_shampoo.planning.layout import box_numel, intersect

    for i, b in enumerate(moe.blocks):
        if ".moe.experts." in b.param_name:
            held = moe.geometries[moe.block_param[i]].held(moe.owners[i])
            assert held is not None and box_numel(intersect(held, b.box)) == b.numel, b.block_id
    assert main(["plan", "--model", "moe-tiny", "--mesh", "dp=2,fsdp=2", "--ep", "2", "--json-no-blocks"]) == 0


def test_mixtral_preset_size():
    with torch.device("meta"):
        n = sum(p.numel() for p in PRESETS["mixtral-8x7b"]().parameters())
    assert n == 46_702_792_704


def test_gpt2_preset_starts_at_uniform_loss():
    """GPT-2's init (std 0.02, scaled residual projections): a byte-level model starts near ln(256)."""
    import math

    from sharded_shampoo.dryrun.models import GPT2

    torch.manual_seed(0)
    model = GPT2(n_layers=2, width=128, heads=4, context=64, vocab_size=256)
    tokens = torch.randint(0, 256, (8, 65))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    assert abs(float(loss.detach()) - math.log(256)) < 0.1 * math.log(256)


def test_tp_plan_per_parent_equals_one_parallelize_module_call():
    """apply_tp_plan calls parallelize_module per parent module: the same DTensors as one whole-model call."""
    from torch.distributed.tensor.parallel import parallelize_module
    from sharded_shampoo._torch_compat import fake_store
    from sharded_shampoo.dryrun.parallelize import apply_tp_plan

    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        layouts = []
        for apply in (lambda m: parallelize_module(m, mesh, m.tp_plan()), lambda m: apply_tp_plan(m, mesh, m.tp_plan())):
            with torch.device("meta"):
                model = Llama(LLAMA_TINY)
            apply(model)
            layouts.append({n: (type(p.data).__name__, tuple(p.shape), repr(getattr(p, "placements", None)))
                            for n, p in model.named_parameters()})
        assert layouts[0] == layouts[1]
        assert "Shard(dim=0)" in layouts[1]["layers.0.attention.wq.weight"][2]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model,mesh", [("llama-tiny", "dp=2,fsdp=2,tp=2"), ("moe-tiny", "fsdp=4,ep=2"),
                                        ("gpt2-small", "4"), ("llama-tiny", "pp=2,fsdp=2,tp=2")])
def test_twin_layers_get_the_placements_of_a_full_parallelization(model, mesh):
    """Identical layers parallelized once (twins.py) give every parameter the spec that parallelizing every
    layer gives: same names, shapes, dtypes, placements and per-rank coordinates."""
    from sharded_shampoo.dryrun import parse_axes
    from sharded_shampoo.dryrun.build import shard_stages

    name, factory = resolve_model(model)
    axes = parse_axes(mesh)

    def described(parts):
        return [[(s.name, s.shape, s.dtype, s.sharded, repr(s.layout.placements) if s.layout else None,
                  s.layout.mesh.coords if s.layout else None) for s in part.specs] + [sorted(part.experts)]
                for part in parts]

    assert described(shard_stages(factory, axes, None, name, None, True)) == \
        described(shard_stages(factory, axes, None, name, None, False))


def test_twins_are_found_only_where_layers_are_alike():
    from sharded_shampoo.dryrun.twins import find_twins

    with torch.device("meta"):
        model = Llama(LLAMA_TINY)
    twins = find_twins(model, tensor_parallel=True)
    assert twins is not None and twins.view.names == ["tok_embeddings", "layers.0", "norm", "output"]
    assert twins.copies["layers.1.attention.wq.weight"] == "layers.0.attention.wq.weight"
    model.layers[1].attention.wq = torch.nn.Linear(LLAMA_TINY.dim, LLAMA_TINY.dim, bias=True, device="meta")
    assert find_twins(model, tensor_parallel=True) is None          # layer 1 differs: no twins left


@pytest.mark.parametrize("choice,config", [("spectral", "NewtonSchulz"), ("spectral-svd", "SVD"), ("sign", None)])
def test_cli_plans_spectral_and_sign_descent_without_factors(tmp_path, capsys, choice, config):
    """--preconditioner spectral / spectral-svd / sign: no factors or roots, no refresh FLOPs, each block's
    state is its filtered gradient + AdaGrad grafting + the two counters; 1-D blocks (norms) use grafting."""
    from sharded_shampoo.compute.orthogonalize import newton_schulz_flops

    out_json = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--preconditioner", choice,
                 "--json", str(out_json)]) == 0
    assert ("SpectralDescent" if config else "SignDescent") in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    settings = data["settings"][0]
    assert settings["blocking"]["precondition_1d"] is False
    if config:
        assert settings["preconditioner"]["orthogonalization"]["__config__"] == config
    for r in data["ranks"]:
        assert {k for k, v in r["optimizer_state_breakdown"].items() if v} == {"filtered_grad", "grafting", "counters"}
        assert r["amortized_flops"] == 0
    numels = [torch.Size(b["shape"]).numel() for b in data["blocks"]]
    assert [b["state_bytes"] for b in data["blocks"]] == [2 * 4 * n + 16 for n in numels]
    assert {len(b["shape"]) for b in data["blocks"]} == {1, 2}       # the norms' 1-D blocks are planned too
    if config == "NewtonSchulz":
        for b in data["blocks"]:
            if len(b["shape"]) == 2:
                assert b["step_flops"] > newton_schulz_flops(*b["shape"], 5)


def test_cli_eigendecomposed_tolerance_and_measured_skip_rate(tmp_path, capsys):
    """``--preconditioner eigendecomposed``: its refresh cost is eigh 9 d^3 per factor, with ``--tolerance`` the
    check 4 d^3 on top, and with ``--refresh-skip-rate r`` the eigh charged (1 - r) times; state is unchanged."""
    def plan(*extra: str) -> tuple[float, int, dict]:
        out = tmp_path / "plan.json"
        assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--preconditioner", "eigendecomposed",
                     "--json", str(out), *extra]) == 0
        data = json.loads(out.read_text())
        return sum(b["amortized_flops"] for b in data["blocks"]), sum(r["optimizer_state_bytes"]
                                                                     for r in data["ranks"]), data
    full, state, data = plan()
    checked, state_tol, _ = plan("--tolerance", "0.1")
    measured, _, _ = plan("--tolerance", "0.1", "--refresh-skip-rate", "0.5")
    assert checked == pytest.approx(full * 13 / 9, rel=1e-12)
    assert measured == pytest.approx(full * 8.5 / 9, rel=1e-12)
    assert state_tol == state
    dims = [d for b in data["blocks"] for d in b["factor_dims"]]
    assert sum(9 * d ** 3 for d in dims) == pytest.approx(full, rel=1e-12)
    capsys.readouterr()


def test_cli_eigendecomposed_kl(tmp_path, capsys):
    """``--preconditioner eigendecomposed-kl``: eigendecomposed Shampoo's state and refresh cost (with the
    tolerance's check), plus the KL update per step: ``2 numel (a + b)`` mode products and ``2 (a^3 + b^3)`` to
    form the roots from the eigenpairs, for an (a, b) block."""
    def plan(name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--preconditioner", name,
                     "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())
    for extra in ((), ("--tolerance", "0.1")):
        eig, ours = plan("eigendecomposed", *extra), plan("eigendecomposed-kl", *extra)
        assert [r["optimizer_state_bytes"] for r in ours["ranks"]] == [r["optimizer_state_bytes"] for r in eig["ranks"]]
        for a, b in zip(eig["blocks"], ours["blocks"]):
            assert a["shape"] == b["shape"] and b["amortized_flops"] == pytest.approx(a["amortized_flops"], rel=1e-12)
            dims = b["factor_dims"]
            extra_flops = (2 * math.prod(b["shape"]) * (len(dims) - 1) * sum(dims) + 2 * sum(d ** 3 for d in dims)
                           if len(dims) > 1 else 0)
            assert b["step_flops"] - a["step_flops"] == pytest.approx(extra_flops, rel=1e-12)
        assert any(len(b["factor_dims"]) > 1 for b in ours["blocks"])
    capsys.readouterr()


@pytest.mark.parametrize("extra,message", [
    (["--tolerance", "0.1"], "--tolerance 0.1 needs --preconditioner eigendecomposed"),
    (["--preconditioner", "eigendecomposed", "--tolerance", "1.5"], "--tolerance must be a finite number in [0.0"),
    (["--preconditioner", "eigenvalue-corrected", "--refresh-skip-rate", "0.3"],
     "--refresh-skip-rate 0.3 needs --tolerance > 0"),
    (["--preconditioner", "eigendecomposed", "--tolerance", "0.1", "--refresh-skip-rate", "1.2"],
     "--refresh-skip-rate must be a number in [0, 1]"),
])
def test_cli_tolerance_errors(extra, message, capsys):
    assert main(["plan", "--model", "llama-tiny", "--mesh", "4", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err


@pytest.mark.parametrize("num_experts, ranks, dim", [(8, 64, 1), (8, 8, 0), (8, 4, 0), (64, 128, 1), (4, 4, 0)])
def test_expert_shard_dim_is_torchtitans_rule(num_experts: int, ranks: int, dim: int) -> None:
    """FSDP shards experts on dim 1 exactly when efsdp x ep (or the FSDP size) exceeds the number of experts."""
    from sharded_shampoo.dryrun.parallelize import expert_shard_dim

    assert expert_shard_dim(num_experts, ranks) == dim


def test_mixtral_with_ep_shards_experts_on_dim_1_and_says_ep(tmp_path, capsys):
    """mixtral-8x7b on 64 ranks, ep=8: efsdp x ep = 64 > 8 experts, so FSDP shards experts on dim 1 and every
    rank holds 1/64 of every weight (dim 0 left ranks 8-63 with 96 MiB and ranks 0-7 with 21.1 GiB)."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mixtral-8x7b", "--mesh", "64", "--ep", "8", "--json", str(out),
                 "--json-no-blocks"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("model mixtral-8x7b | mesh 64 (FSDP), experts on efsdp=8 x ep=8 |")
    ranks = json.loads(out.read_text())["ranks"]
    params = [r["param_bytes"] for r in ranks]
    assert sum(params) == 46_702_792_704 * 4            # fp32, every byte on exactly one rank
    # every rank holds 1/64 of every weight but the routers ([8, 4096] per layer, 8 rows for 64 ranks):
    # ranks 0-7 hold one row of each of the 32 layers' routers, the others none
    router_rows = 32 * 4096 * 4
    assert params[:8] == [params[0]] * 8 and params[8:] == [params[0] - router_rows] * 56
    assert params[0] - router_rows == (46_702_792_704 - 32 * 8 * 4096) * 4 // 64      # 2.72 GiB, not 21.1


def test_experts_on_dim_1_that_fsdp_cannot_split_evenly_are_a_clear_error(capsys):
    """moe-tiny (4 experts, w2 [4, 96, 64]) on 64 FSDP ranks: dim 1 sharding (64 > 4) needs 96 % 64 == 0."""
    assert main(["plan", "--model", "moe-tiny", "--mesh", "64"]) == 2
    err = capsys.readouterr().err
    assert "expert weight 'layers.0.moe.experts.w2' (4, 96, 64) is sharded on dim 1 over 64 FSDP ranks" in err
    assert "so that efsdp x ep <= 4, or efsdp divides 96" in err
    assert main(["plan", "--model", "moe-tiny", "--mesh", "32", "--json-no-blocks"]) == 0     # 96 % 32 == 0
