"""Hardening checks on a real DMP checkpoint (sharded tables, fused optimizer), run inside the 2-rank
torchrec launch (``torchrec_scenarios.scenario_two_ranks``) after the checkpoint was saved.

Each damage is applied by rank 0 to a copy of the checkpoint while the other rank waits; then every
rank calls ``load_dmp`` on a freshly built model and reports what it raised and whether tables,
fused-optimizer state, dense parameters and dense Shampoo state are bit-identical afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tests.support import ckpt_craft as cc
from tests.support import torchrec_scenarios as sc

TABLE = "app.model.model.sparse_arch.embedding_bag_collection.embedding_bags.t_c0.weight"   # table-wise, rank 0


def _damages(marker: str) -> dict[str, Callable[[str], None]]:
    def flip_table(ckpt: str) -> None:
        name, offset = cc.tensor_data_offset(ckpt, TABLE)
        cc.flip(os.path.join(ckpt, name), offset)

    def truncate(ckpt: str) -> None:
        path = os.path.join(ckpt, "__1_0.distcp")
        os.truncate(path, os.path.getsize(path) - 100)

    return {
        "flip in an embedding table": flip_table,
        "truncated shard file": truncate,
        "crafted .metadata": lambda c: cc.replace_metadata(c, cc.metadata_with(c, cc.payloads(marker)["exec"])),
        "crafted extra": lambda c: cc.replace_item(c, "app.extra.step",
                                                    cc.torch_blob(cc.payloads(marker)["os.system"])),
    }


def _everything(dmp: Any, dense: Any, opt: Any) -> dict[str, Any]:
    """Every value a load could change on this rank."""
    return {"sparse": sc.sparse_snapshot(dmp, opt), "dense": sc.dense_values(dense),
            "state": sc.flat_state(dense.shampoo.state), "step": dense.shampoo.param_groups[0]["step"]}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """What ``fn()`` returned, or what it raised (class names of its MRO, message): never raises, so one
    failing check does not end the launch."""
    try:
        return {"error": None, "value": fn()}
    except BaseException as err:  # noqa: BLE001 - the test inspects what came out
        return {"error": [c.__name__ for c in type(err).__mro__], "message": str(err)}


def run(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    from sharded_shampoo.checkpointing import verify_checkpoint
    from sharded_shampoo.integrations.torchrec import ShampooDenseOptimizer, load_dmp, save_dmp

    out: dict[str, Any] = {"verify": _attempt(lambda: verify_checkpoint(ckpt))}
    dmp, dense, opt = sc.build(world, seed=4)
    before = _everything(dmp, dense, opt)
    marker = os.path.join(os.path.dirname(ckpt), "marker")
    damaged = ckpt + ".damaged"
    for case, damage in _damages(marker).items():
        if rank == 0:
            shutil.copytree(ckpt, damaged)
            damage(damaged)
        dist.barrier()
        got = _attempt(lambda: load_dmp(damaged, dmp, opt, extra={"step": -1}))
        got["unchanged"] = _same(_everything(dmp, dense, opt), before)
        got["marker"] = os.path.exists(marker)
        out[case] = got
        dist.barrier()
        if rank == 0:
            shutil.rmtree(damaged)
    out["nested extra"] = _attempt(lambda: save_dmp(ckpt + ".nested", dmp, opt, extra={"cfg": {"a": 1}}))
    out["nested extra"]["written"] = os.path.exists(ckpt + ".nested")
    out["all parameters"] = _attempt(lambda: ShampooDenseOptimizer(dict(dmp.named_parameters()), **sc.CONFIG))
    # the undamaged checkpoint still loads into this model, exactly
    dist.barrier()
    out["good"] = _attempt(lambda: load_dmp(ckpt, dmp, opt, extra={"step": -1}))
    return out
