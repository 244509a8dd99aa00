"""make_plan: exact byte accounting against a brute-force reference, balance, JSON, memory cap."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest
import torch

from sharded_shampoo.planning.balance import lower_bound
from sharded_shampoo.config import AdamGrafting, EigenvalueCorrectedShampoo, RootInverseShampoo, SGDGrafting
from sharded_shampoo.planning.costs import BLOCK_STATE_KINDS, RANK_STATE_KINDS, block_cost
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec, box_numel, held_region, intersect
from sharded_shampoo.planning.plan import JSON_SCHEMA, PlanSettings, make_plan
from sharded_shampoo.runtime.placements import param_specs_from_tensors
from sharded_shampoo.dryrun.presets import LLAMA3_8B, LLAMA3_70B, Llama

MIXED = [
    ParamSpec("emb", (1000, 64), torch.float32, True),
    ParamSpec("w1", (300, 200), torch.bfloat16, True),
    ParamSpec("conv", (32, 16, 3, 3), torch.float32, True),
    ParamSpec("bias", (300,), torch.float32, True),
    ParamSpec("tiny", (3,), torch.float32, True),           # fewer rows than shards: trailing shards empty
    ParamSpec("rep", (50, 40), torch.float32, False),        # replicated (DDP-style)
    ParamSpec("scalar", (), torch.float32, False),
]


def held_rows(spec, rank, mesh):
    """Dim-0 rows of a shorthand parameter a rank holds: FSDP2's torch.chunk rows, or all."""
    dim0 = spec.shape[0] if spec.shape else 1
    if not spec.sharded:
        return 0, dim0
    chunk = -(-dim0 // mesh.num_shards) if dim0 else 0
    start = min(mesh.shard_index(rank) * chunk, dim0)
    return start, min(start + chunk, dim0)


def reference(plan):
    """Per-rank bytes straight from the definitions, element by element (no shortcuts)."""
    mesh = plan.mesh
    n = mesh.world_size
    ref = [dict(param=0, momentum=0, send=0, recv=0, state=dict.fromkeys(BLOCK_STATE_KINDS, 0))
           for _ in range(n)]
    for k, p in enumerate(plan.params):
        s = plan.settings[k]
        for r in range(n):
            a, b = held_rows(p, r, mesh)
            inner = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
            elems = (b - a) * inner if p.sharded else p.numel
            ref[r]["param"] += elems * p.itemsize
            if s.momentum > 0:
                ref[r]["momentum"] += elems * p.itemsize
    for blk, k, o in zip(plan.blocks, plan.block_param, plan.owners):
        p, s = plan.params[k], plan.settings[k]
        cb = torch.empty((), dtype=s.comm_dtype).element_size()
        for kind, v in block_cost(blk, s.preconditioner, s.grafting, s.beta1).state_bytes.items():
            ref[o]["state"][kind] += v

        def held(r):
            region = held_region(p, mesh, r)
            common = intersect(blk.box, region) if region is not None else None
            return box_numel(common) if common is not None else 0

        missing = blk.numel - held(o)
        ref[o]["recv"] += missing * cb
        if p.sharded:   # senders: the holders in the owner's replica group
            rep = mesh.replica_index(o)
            for s_idx in range(mesh.num_shards):
                r = rep * mesh.num_shards + s_idx
                if r != o:
                    ref[r]["send"] += held(r) * cb
        for h in range(n):
            if h != o and held(h) > 0:
                ref[o]["send"] += held(h) * cb
                ref[h]["recv"] += held(h) * cb
    return ref


@pytest.mark.parametrize("mesh_shape", [(1,), (4,), (3, 4), (2, 5)])
@pytest.mark.parametrize("variant", ["default", "ec_bf16comm_momentum"])
def test_exact_bytes_match_reference(mesh_shape, variant):
    if variant == "default":
        settings = PlanSettings(max_preconditioner_dim=128)
    else:
        settings = PlanSettings(max_preconditioner_dim=96, preconditioner=EigenvalueCorrectedShampoo(),
                                grafting=AdamGrafting(), beta1=0.0, momentum=0.9, comm_dtype=torch.bfloat16)
    plan = make_plan(MIXED, MeshSpec(mesh_shape), settings)
    ref = reference(plan)
    assert len(plan.ranks) == math.prod(mesh_shape)
    for r, rep in zip(plan.ranks, ref):
        assert r.param_bytes == r.grad_bytes == rep["param"]
        assert {k: r.state_bytes_by_kind[k] for k in BLOCK_STATE_KINDS} == rep["state"]
        assert r.state_bytes_by_kind["momentum"] == rep["momentum"]
        assert r.optimizer_state_bytes == sum(rep["state"].values()) + rep["momentum"]
        assert r.comm_send_bytes == rep["send"] and r.comm_recv_bytes == rep["recv"]
        assert r.num_blocks == len(plan.owned_blocks(r.rank))
    # conservation: every byte sent is received
    assert sum(r.comm_send_bytes for r in plan.ranks) == sum(r.comm_recv_bytes for r in plan.ranks)


def test_hand_computed_single_rank():
    # One 8 x 4 fp32 matrix on one rank, default settings: nothing to communicate.
    plan = make_plan([ParamSpec("w", (8, 4), torch.float32, True)], MeshSpec((1,)), PlanSettings())
    (r,) = plan.ranks
    assert [b.block_id for b in plan.blocks] == ["w.block_0"]
    assert plan.blocks[0].shape == (32,)          # merged: 8 * 4 <= 1024
    assert r.param_bytes == r.grad_bytes == 128
    # factors and roots packed: the upper triangle of a 32 x 32 matrix, 32 * 33 / 2 numbers each
    assert r.state_bytes_by_kind == {"factors": 32 * 33 // 2 * 4, "roots": 32 * 33 // 2 * 4, "eigenvalues": 0,
                                     "grafting": 128, "filtered_grad": 128, "counters": 16, "momentum": 0,
                                     "averaging": 0}
    assert r.comm_bytes_per_step == 0
    assert r.step_flops == 4 * 32 * 32 + 13 * 32
    assert r.amortized_flops == 11 * 32 ** 3
    assert r.load == r.step_flops + r.amortized_flops / 100
    assert r.peak_transient_bytes == 2 * 32 * 4 + (3 * 32 * 32 + 32) * 8


def test_hand_computed_two_shards_comm():
    # w: 4 x 2 rows sharded over 2 ranks (2 rows each), one block of 4 x 2 -> merged (8,).
    # The owner holds 4 of 8 elements: receives 4 (gather), sends 4 (update); the other rank
    # sends 4 and receives 4. fp32 comm -> 16 bytes each way.
    plan = make_plan([ParamSpec("w", (4, 2), torch.float32, True)], MeshSpec((2,)), PlanSettings())
    o = plan.owners[0]
    other = 1 - o
    assert plan.ranks[o].comm_recv_bytes == 16 and plan.ranks[o].comm_send_bytes == 16
    assert plan.ranks[other].comm_recv_bytes == 16 and plan.ranks[other].comm_send_bytes == 16
    assert plan.ranks[other].optimizer_state_bytes == 0


def test_blocks_owners_and_settings_per_param():
    settings = [PlanSettings(max_preconditioner_dim=64) if i % 2 else PlanSettings(max_preconditioner_dim=128)
                for i in range(len(MIXED))]
    plan = make_plan(MIXED, MeshSpec((4,)), settings)
    names = [p.name for p in MIXED]
    assert [names.index(b.param_name) for b in plan.blocks] == sorted(names.index(b.param_name) for b in plan.blocks)
    assert len(plan.owners) == len(plan.blocks)
    assert max(max(b.shape) for b in plan.blocks if b.param_name == "w1") <= 64
    assert max(max(b.shape) for b in plan.blocks if b.param_name == "emb") == 128
    owned = [b.block_id for r in range(4) for b in plan.owned_blocks(r)]
    assert sorted(owned) == sorted(b.block_id for b in plan.blocks)
    assert plan.owner_of() == {b.block_id: o for b, o in zip(plan.blocks, plan.owners)}
    with pytest.raises(ValueError, match="one per parameter"):
        make_plan(MIXED, MeshSpec((4,)), settings[:2])
    with pytest.raises(ValueError, match="rank must be in"):
        plan.owned_blocks(4)


def test_plan_independent_of_parameter_order():
    settings = PlanSettings(max_preconditioner_dim=64)
    ref = make_plan(MIXED, MeshSpec((2, 3)), settings).owner_of()
    for seed in range(3):
        params = list(MIXED)
        random.Random(seed).shuffle(params)
        assert make_plan(params, MeshSpec((2, 3)), settings).owner_of() == ref


def test_hsdp_replicas_share_the_work():
    params = [ParamSpec(f"l{i}", (256, 256), torch.float32, True) for i in range(16)]
    plan = make_plan(params, MeshSpec((4, 4)), PlanSettings(max_preconditioner_dim=128))
    # 64 equal blocks over 16 ranks: every rank (all replicas) owns exactly 4
    assert [r.num_blocks for r in plan.ranks] == [4] * 16
    assert plan.summary.imbalance == 1.0
    assert plan.summary.max_over_lower_bound == 1.0
    # locality: each owner holds the rows of the block it owns (128-row blocks, 64-row shards)
    for blk, o in zip(plan.blocks, plan.owners):
        assert intersect(blk.box, held_region(params[0], plan.mesh, o)) is not None


def _meta_specs(cfg):
    with torch.device("meta"):
        model = Llama(cfg)
    return [ParamSpec(n, tuple(p.shape), p.dtype, True) for n, p in model.named_parameters()]


@pytest.mark.parametrize("cfg", [LLAMA3_8B, LLAMA3_70B], ids=["llama3-8b", "llama3-70b"])
def test_llama_imbalance_target(cfg):
    plan = make_plan(_meta_specs(cfg), MeshSpec((64,)), PlanSettings(max_preconditioner_dim=1024))
    s = plan.summary.to_json()
    assert s["max_over_lower_bound"] <= 1.03
    assert s["round_robin_param_max_over_lower_bound"] > 1.5   # what the balancer buys
    loads = [r.load for r in plan.ranks]
    assert s["lower_bound"] == pytest.approx(lower_bound(plan.block_loads, 64))
    assert s["imbalance"] == pytest.approx(max(loads) / (sum(loads) / 64))


def test_to_json_schema():
    settings = [PlanSettings(max_preconditioner_dim=64), PlanSettings(momentum=0.9)] * 3 + [PlanSettings()]
    plan = make_plan(MIXED, MeshSpec((2, 2)), settings)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["schema"] == JSON_SCHEMA
    assert data["mesh"] == {"shape": [2, 2], "world_size": 4}
    assert len(data["settings"]) == 3
    assert [p["settings_index"] for p in data["params"]] == [0, 1, 0, 1, 0, 1, 2]
    assert data["params"][1] == {"name": "w1", "shape": [300, 200], "dtype": "bfloat16", "sharded": True,
                                 "settings_index": 1}
    assert [r["rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    for r, rep in zip(data["ranks"], plan.ranks):
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "comm_bytes_per_step",
                    "peak_transient_bytes", "step_flops", "amortized_flops"):
            assert key in r
        assert set(r["optimizer_state_breakdown"]) == set(RANK_STATE_KINDS)
        assert sum(r["optimizer_state_breakdown"].values()) == r["optimizer_state_bytes"]
        assert r["comm_bytes_per_step"] == r["comm_send_bytes_per_step"] + r["comm_recv_bytes_per_step"]
        assert r["optimizer_state_bytes"] == rep.optimizer_state_bytes
    s = data["summary"]
    for key in ("imbalance", "lower_bound", "max_over_lower_bound", "total_param_bytes",
                "total_optimizer_state_bytes", "round_robin_param_imbalance", "num_blocks"):
        assert key in s
    assert s["total_optimizer_state_bytes"] == sum(r["optimizer_state_bytes"] for r in data["ranks"])
    assert [b["owner"] for b in data["blocks"]] == plan.owners
    assert [b["block_id"] for b in data["blocks"]] == [b.block_id for b in plan.blocks]
    assert "blocks" not in plan.to_json(include_blocks=False)


@pytest.mark.parametrize("extra_bytes", [12_000_000, 20_000_000])
def test_memory_cap_error_names_block_and_fitting_dim(extra_bytes):
    # A tall 4096 x 256 matrix on 2 ranks: one 4096 x 256 block needs 2 x (4096^2 + 256^2) x 4 x 2 bytes
    # of factors + roots; smaller row chunks need far less.
    params = [ParamSpec("w", (4096, 256), torch.float32, True)]
    settings = PlanSettings(max_preconditioner_dim=4096, beta1=0.0, grafting=None)
    cap = 4096 * 256 * 4 + extra_bytes          # params + grads of one shard + room for state
    with pytest.raises(ValueError, match=r"'w\.block_0'.*largest max_preconditioner_dim that fits is (\d+)") \
            as info:
        make_plan(params, MeshSpec((2,)), settings, memory_cap_bytes=cap)
    best = int(re.search(r"fits is (\d+)", str(info.value)).group(1))
    assert 1 <= best < 4096
    fitted = make_plan(params, MeshSpec((2,)), dataclasses.replace(settings, max_preconditioner_dim=best),
                       memory_cap_bytes=cap)
    assert max(r.persistent_bytes for r in fitted.ranks) <= cap
    with pytest.raises(ValueError, match="memory_cap_bytes"):
        make_plan(params, MeshSpec((2,)), dataclasses.replace(settings, max_preconditioner_dim=best + 1),
                  memory_cap_bytes=cap)


def test_memory_cap_error_when_nothing_fits():
    params = [ParamSpec("w", (4096, 256), torch.float32, True)]
    base = 4096 * 256 * 4
    with pytest.raises(ValueError, match="'w.block_0'.*no max_preconditioner_dim fits"):
        make_plan(params, MeshSpec((2,)), PlanSettings(), memory_cap_bytes=base + 100)
    # square blocks cost ~4 factor entries per element at any size: a cap below that never fits
    sq = [ParamSpec("sq", (512, 512), torch.float32, True)]
    with pytest.raises(ValueError, match="'sq.block_0'.*no max_preconditioner_dim"):
        make_plan(sq, MeshSpec((2,)), PlanSettings(beta1=0.0, grafting=None),
                  memory_cap_bytes=512 * 512 * 4 + 512 * 512 * 4)
    with pytest.raises(ValueError, match="memory_cap_bytes must be a positive integer"):
        make_plan(params, MeshSpec((2,)), PlanSettings(), memory_cap_bytes=-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(beta1=1.0), "beta1"),
    (dict(momentum=-1.0), "momentum"),
    (dict(comm_dtype=torch.int32), "comm_dtype"),
    (dict(grafting="adagrad"), "grafting"),
    (dict(preconditioner=SGDGrafting()), "preconditioner"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=f"PlanSettings.{match}"):
        PlanSettings(**kwargs)


def test_api_validation():
    with pytest.raises(ValueError, match="unique"):
        make_plan([ParamSpec("a", (2,)), ParamSpec("a", (3,))], MeshSpec((1,)), PlanSettings())
    with pytest.raises(ValueError, match="MeshSpec"):
        make_plan([ParamSpec("a", (2,))], (2,), PlanSettings())
    with pytest.raises(ValueError, match=r"params\[0\]"):
        make_plan([("a", (2,))], MeshSpec((1,)), PlanSettings())
    empty = make_plan([], MeshSpec((3,)), PlanSettings())
    assert empty.blocks == [] and len(empty.ranks) == 3 and empty.summary.imbalance == 1.0


def test_param_specs_from_plain_tensors():
    specs, mesh = param_specs_from_tensors([("a", torch.zeros(3, 4, dtype=torch.bfloat16)), ("b", torch.zeros(5))])
    assert mesh == MeshSpec((1,))
    assert specs == [ParamSpec("a", (3, 4), torch.bfloat16, False), ParamSpec("b", (5,), torch.float32, False)]


def test_root_inverse_default_is_what_the_optimizer_gets():
    s = PlanSettings()
    assert s.preconditioner == RootInverseShampoo() and s.max_preconditioner_dim == 1024


def test_same_plan_in_processes_with_different_hash_seeds():
    # Every rank computes the plan on its own: it must not depend on str hashing or dict order.
    import os
    import subprocess
    import sys

    code = ("import hashlib, torch\n"
            "from sharded_shampoo.planning.plan import make_plan, PlanSettings\n"
            "from sharded_shampoo.planning.layout import MeshSpec, ParamSpec\n"
            "ps = [ParamSpec(f'l{i}.w{j}', (96 * (j + 1), 64 + 32 * i), torch.float32, True)"
            " for i in range(12) for j in range(3)] + [ParamSpec('r', (70, 5), torch.float32, False)]\n"
            "p = make_plan(ps, MeshSpec((3, 4)), PlanSettings(max_preconditioner_dim=64))\n"
            "print(hashlib.sha256(repr((p.owners, [r.to_json() for r in p.ranks])).encode()).hexdigest())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1
