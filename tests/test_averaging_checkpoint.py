"""Single-process DCP checkpoints of iterate averaging, and checkpoints written before its settings existed.

Multi-rank saves read back on one process (resharded 2 -> 1) are in test_checkpointing_dist.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.support import ckpt_scenarios as cs
from sharded_shampoo import WeightDecayType
from sharded_shampoo.checkpointing import TrainState, load_checkpoint, save_checkpoint
from sharded_shampoo.checkpointing.added_keys import ADDED_GROUP_KEYS

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.mark.parametrize("config", ["gpa", "schedule_free"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_single_process_checkpoint_in_either_mode_resumes_exactly(tmp_path, config: str, mode: str) -> None:
    model, opt = cs.build("single", config)
    cs.feed(model, opt, 0, cs.SAVE_AT)
    if mode == "eval":
        opt.eval()
    save_checkpoint(str(tmp_path), cs.SAVE_AT, model, opt)
    ref = cs.averaging_reference(config, mode)
    new_model, new_opt = cs.build("single", config)
    load_checkpoint(str(tmp_path), new_model, new_opt)
    assert new_opt.param_groups[0]["train_mode"] is (mode == "train")
    assert cs.same(cs.full_params(new_model), cs.full_params(model))      # parameters as saved (x in eval)
    new_opt.train()
    cs.feed(new_model, new_opt, cs.SAVE_AT, cs.END)
    diff = max(float((a - ref[n]).abs().max()) for n, a in cs.full_params(new_model).items())
    assert diff == 0.0, diff          # one process, same operations: bit for bit


def _as_written_before_weight_decay_type(optim: dict, legacy: bool) -> None:
    """Edit a request state dict into what earlier versions saved (both layouts)."""
    groups = optim["param_groups"] if isinstance(optim.get("param_groups"), list) else None
    containers = groups if groups is not None else [optim]
    for container in containers:
        for key in list(container):
            setting = key.rsplit(".", 1)[-1]
            if setting in ADDED_GROUP_KEYS:
                del container[key]
                if setting == "weight_decay_type":
                    container[key[: len(key) - len(setting)] + "use_decoupled_weight_decay"] = legacy


@pytest.mark.parametrize("flatten", [True, False])
def test_checkpoint_written_before_weight_decay_type_loads(tmp_path, flatten: bool) -> None:
    model, opt = cs.build("single", "root_inverse", weight_decay_type="L2")
    cs.feed(model, opt, 0, 3)
    app = TrainState(model, opt, flatten_optimizer_state_dict=flatten).state_dict()
    _as_written_before_weight_decay_type(app["optim"], legacy=False)
    path = os.path.join(str(tmp_path), "step_3")
    dcp.save({"app": app}, checkpoint_id=path)
    new_model, new_opt = cs.build("single", "root_inverse", weight_decay_type="DECOUPLED", peak_lr=0.5)
    with pytest.warns(UserWarning, match="no checksums"):
        load_checkpoint(path, new_model, new_opt)
    g = new_opt.param_groups[0]
    # the alias converts; settings without one keep their live value
    assert g["weight_decay_type"] is WeightDecayType.L2 and g["peak_lr"] == 0.5 and g["iterate_averaging"] is None
    assert cs.same(cs.opt_snapshot(new_opt)["state"], cs.opt_snapshot(opt)["state"])
    assert all(torch.equal(a, b) for a, b in zip(new_model.parameters(), model.parameters()))


def test_averaging_is_part_of_the_fingerprint(tmp_path) -> None:
    from sharded_shampoo.checkpointing import IncompatibleCheckpointError, describe

    plain = describe(cs.build("single", "root_inverse")[1])
    model, opt = cs.build("single", "gpa")
    assert describe(opt)["fingerprint"] != plain["fingerprint"]
    assert "iterate_averaging" not in plain["groups"][0]        # earlier fingerprints stay valid
    cs.feed(model, opt, 0, 2)
    save_checkpoint(str(tmp_path), 2, model, opt)
    other_model, other = cs.build("single", "schedule_free")
    before = cs.snapshot(other_model, other)
    with pytest.raises(IncompatibleCheckpointError, match=r"param group 0: iterate_averaging differs \(checkpoint "
                                                          r"GeneralizedPrimalAveraging.*optimizer ScheduleFree"):
        load_checkpoint(str(tmp_path), other_model, other)
    assert cs.same(before, cs.snapshot(other_model, other))
