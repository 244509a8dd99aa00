"""Single-process checkpointing: the pair API, TrainState with DCP, torch's get/set_state_dict in
both layouts, every incompatibility error, settings that may change, the init step, the pointer."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from sharded_shampoo._torch_compat import init_optim_state

from tests.support import ckpt_scenarios as cs
from sharded_shampoo import AdamGrafting, BlockingConfig, EigenvalueCorrectedShampoo, KLShampoo, RootInverseShampoo
from sharded_shampoo.checkpointing import (IncompatibleCheckpointError, TrainState, describe, latest_checkpoint,
                                           list_checkpoints, load_checkpoint, read_checkpoint_meta,
                                           save_checkpoint)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPES = {"w": (20, 6), "v": (5, 4, 3), "b": (7,)}


def _trained(steps: int = 4, shapes: dict = SHAPES, config: str = "root_inverse", **kw):
    model, opt = cs.build("single", config, model=cs.Net(shapes), **kw)
    cs.feed(model, opt, 0, steps)
    return model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    root = str(tmp_path_factory.mktemp("single"))
    model, opt = _trained()
    save_checkpoint(root, 4, model, opt, extra={"step": 4, "tag": "x"})
    return root, cs.snapshot(model, opt)


def test_pair_round_trip_is_exact_and_returns_extra(saved) -> None:
    root, snap = saved
    assert latest_checkpoint(root) == os.path.join(root, "step_4")
    assert [s for s, _ in list_checkpoints(root)] == [4]
    model, opt = _trained(steps=1)
    assert load_checkpoint(root, model, opt, extra={"step": 0}) == {"step": 4}
    assert cs.same(cs.snapshot(model, opt), snap)
    cs.feed(model, opt, 4, 5)  # and it keeps training from there
    assert opt.param_groups[0]["step"] == 5


@pytest.mark.parametrize("flatten", [True, False])
def test_train_state_with_dcp_and_torch_get_set_state_dict(tmp_path, flatten: bool) -> None:
    model, opt = _trained()
    snap = cs.snapshot(model, opt)
    dcp.save({"app": TrainState(model, opt, flatten_optimizer_state_dict=flatten)}, checkpoint_id=str(tmp_path / "a"))
    cs.raw_save(model, opt, str(tmp_path / "raw"), flatten)
    for how in ("stateful", "raw"):
        model2, opt2 = _trained(steps=2)
        if how == "stateful":
            dcp.load({"app": TrainState(model2, opt2, flatten_optimizer_state_dict=flatten)},
                     checkpoint_id=str(tmp_path / "a"))
        else:
            cs.raw_load(model2, opt2, str(tmp_path / "raw"), flatten)
        assert cs.same(cs.snapshot(model2, opt2), snap), how
    # load_checkpoint reads a TrainState checkpoint and detects its layout
    model3, opt3 = _trained(steps=1)
    load_checkpoint(str(tmp_path / "a"), model3, opt3)
    assert cs.same(cs.snapshot(model3, opt3), snap)
    keys = FileSystemReader(str(tmp_path / "a")).read_metadata().state_dict_metadata
    assert "app.optim.state.w.block_1.factor_0" in keys and "app.optim.state.w.momentum" in keys
    assert any(k.startswith("app.optim.param_groups." + ("w." if flatten else "0.")) for k in keys)


@pytest.mark.parametrize("flatten", [True, False])
def test_layout_is_detected_with_numeric_module_names(tmp_path, flatten: bool) -> None:
    # nn.Sequential names parameters "0.weight": the flattened keys param_groups.0.weight.lr must
    # not be mistaken for the nested layout's param_groups.0.lr
    def make():
        torch.manual_seed(0)
        return cs.build("single", "root_inverse",
                        model=torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)))

    model, opt = make()
    cs.feed(model, opt, 0, 3)
    save_checkpoint(str(tmp_path), 3, model, opt, flatten_optimizer_state_dict=flatten)
    model2, opt2 = make()
    load_checkpoint(str(tmp_path), model2, opt2)
    assert cs.same(cs.snapshot(model2, opt2), cs.snapshot(model, opt))


def test_plain_state_dict_still_works_on_one_process() -> None:
    model, opt = _trained()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2, opt2 = _trained(steps=1)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert cs.same(cs.opt_snapshot(opt2), cs.opt_snapshot(opt))


INCOMPATIBLE = {
    "shape": (dict(shapes={"w": (20, 7), "v": (5, 4, 3), "b": (7,)}), "'w' has global shape (20, 6)"),
    "missing_param": (dict(shapes={"w": (20, 6), "v": (5, 4, 3), "b": (7,), "c": (3,)}), "['c'] have no state"),
    "extra_param": (dict(shapes={"w": (20, 6), "v": (5, 4, 3)}), "['b'] that this optimizer does not train"),
    "max_dim": (dict(max_preconditioner_dim=8), "max_preconditioner_dim differs (checkpoint 16, optimizer 8)"),
    "kind": (dict(config="eigen_corrected"), "preconditioner differs"),
    "factor_dtype": (dict(preconditioner=RootInverseShampoo(factor_dtype=torch.float64)), "preconditioner differs"),
    "exponent": (dict(preconditioner=RootInverseShampoo(inverse_exponent_override={2: 0.5})), "preconditioner"),
    "grafting": (dict(grafting=AdamGrafting()), "grafting differs"),
    "blocking": (dict(blocking=BlockingConfig(precondition_1d=False)), "blocking differs"),
    "momentum": (dict(momentum=0.0), "momentum > 0 differs"),
    "beta1": (dict(betas=(0.0, 0.99)), "betas[0] > 0 differs"),
    # the same state keys and shapes as RootInverseShampoo, but another statistic: never resumed across
    "kl_shampoo": (dict(preconditioner=KLShampoo()), "preconditioner differs"),
}


@pytest.mark.parametrize("case", list(INCOMPATIBLE))
def test_incompatible_settings_fail_before_touching_state(saved, case: str) -> None:
    root, _ = saved
    kw, expected = INCOMPATIBLE[case]
    kw = dict(kw)
    model, opt = _trained(steps=2, shapes=kw.pop("shapes", SHAPES), config=kw.pop("config", "root_inverse"), **kw)
    before = cs.snapshot(model, opt)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(root, model, opt, extra={"step": 0})
    assert expected in str(info.value), str(info.value)
    assert cs.same(cs.snapshot(model, opt), before)
    # used directly with dcp.load, DCP's load planning stops at the guard key before reading anything
    with pytest.raises(BaseException, match="shampoo_plan_"):
        dcp.load({"app": TrainState(model, opt)}, checkpoint_id=latest_checkpoint(root))
    assert cs.same(cs.snapshot(model, opt), before)


def test_fingerprint_ignores_what_may_change() -> None:
    _, base = _trained(steps=0)
    for kw in (dict(lr=0.5), dict(betas=(0.5, 0.9)), dict(epsilon=1e-3), dict(weight_decay=0.0),
               dict(momentum=0.9), dict(precondition_frequency=7), dict(start_preconditioning_step=5),
               dict(comm_dtype=torch.bfloat16)):
        _, opt = _trained(steps=0, **kw)
        assert describe(opt)["fingerprint"] == describe(base)["fingerprint"], kw
    _, eig = _trained(steps=0, preconditioner=EigenvalueCorrectedShampoo())
    assert describe(eig)["fingerprint"] != describe(base)["fingerprint"]


@pytest.mark.parametrize("mode", ["checkpoint", "current"])
def test_settings_that_may_change_across_a_resume(saved, mode: str) -> None:
    root, snap = saved
    model, opt = _trained(steps=1, lr=0.5, precondition_frequency=7, epsilon=1e-4)
    load_checkpoint(root, model, opt, hyperparameters=mode)
    g = opt.param_groups[0]
    assert g["step"] == 4                                            # counters always come back
    assert cs.same(cs.opt_snapshot(opt)["state"], snap["state"])     # and all statistics
    if mode == "checkpoint":                                         # torch's convention
        assert (g["lr"], g["precondition_frequency"], g["epsilon"]) == (0.05, 3, 1e-8)
    else:                                                            # keep the live values
        assert (g["lr"], g["precondition_frequency"], g["epsilon"]) == (0.5, 7, 1e-4)
    cs.feed(model, opt, 4, 6)


def test_init_step_is_a_no_op_and_state_is_eager() -> None:
    model, opt = cs.build("single", "root_inverse", model=cs.Net(SHAPES))
    # eager: every block's state exists at construction, counters at zero
    assert all(int(s["block_0"]["step"]) == 0 for s in opt.state.values())
    for trained in (False, True):
        if trained:
            cs.feed(model, opt, 0, 3)
        before = cs.snapshot(model, opt)
        init_optim_state(opt)    # torch's get_state_dict init: state exists, so it does nothing
        assert cs.same(cs.snapshot(model, opt), before)
        # torchtitan's init_optim_state: zero grads, lr 0, one step
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = torch.tensor(0.0) if trained else 0.0
        opt.step()
        assert opt.last_step_was_init
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        assert cs.same(cs.snapshot(model, opt), before)   # no counter, statistic or parameter moved


def test_checkpoint_dir_pointer_rules(tmp_path) -> None:
    root = str(tmp_path)
    model, opt = _trained(steps=1)
    with pytest.raises(FileNotFoundError, match="latest"):
        load_checkpoint(root, model, opt)
    for step in (1, 2, 3):
        save_checkpoint(root, step, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    assert open(os.path.join(root, "latest")).read().strip() == "step_3"
    with pytest.raises(RuntimeError, match="already exists and is the latest"):
        save_checkpoint(root, 3, model, opt)
    save_checkpoint(root, 2, model, opt)   # an older step may be rewritten; latest follows the newest save
    assert latest_checkpoint(root) == os.path.join(root, "step_2")
    assert read_checkpoint_meta(root)["fingerprint"] == describe(opt)["fingerprint"]
    assert not [n for n in os.listdir(root) if ".tmp" in n]
    with pytest.raises(KeyError, match="extra"):
        load_checkpoint(root, model, opt, extra={"missing": 0})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(root, -1, model, opt)


def test_async_save_single_process(tmp_path) -> None:
    model, opt = _trained()
    snap = cs.snapshot(model, opt)
    handle = save_checkpoint(str(tmp_path), 4, model, opt, async_=True)
    cs.feed(model, opt, 4, 6)                   # keeps training while the save runs
    assert latest_checkpoint(str(tmp_path)) is None or handle.done()
    assert handle.wait() == os.path.join(str(tmp_path), "step_4") and handle.done()
    model2, opt2 = _trained(steps=1)
    load_checkpoint(str(tmp_path), model2, opt2)
    assert cs.same(cs.snapshot(model2, opt2), snap)
