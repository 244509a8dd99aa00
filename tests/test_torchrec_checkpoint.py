"""torchrec checkpoints (save_dmp / load_dmp) in one process: checksums, all-or-nothing loads, refused
extras, param groups, publishing. ``DMPTrainState`` takes any module with a torchrec KeyedOptimizer,
so this runs on a plain model with a ShampooDenseOptimizer; test_torchrec.py repeats the key cases
on a real 2-rank DMP model with sharded tables.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.torchrec_required import require_torchrec

require_torchrec()

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402

from tests.support import ckpt_craft as cc  # noqa: E402
from tests.support import keyed_helpers as th  # noqa: E402
from sharded_shampoo.checkpointing import (CheckpointArgumentError, CheckpointCorruptError,  # noqa: E402
                                           CheckpointLoadError, UnverifiedCheckpointWarning, verify_checkpoint)
from sharded_shampoo.config import AdaGradGrafting  # noqa: E402
from sharded_shampoo.integrations.torchrec import (DMPTrainState, ShampooDenseOptimizer, load_dmp,  # noqa: E402
                                                   save_dmp)

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("dmp") / "step_4")
    model, opt = th.keyed_model()
    assert save_dmp(path, model, opt, extra={"step": 4}) == path
    return path, th.snapshot(model, opt)


def test_save_dmp_writes_checksums_and_a_commit_record(saved) -> None:
    path, _ = saved
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "checksums.json", "commit.json"]
    totals = verify_checkpoint(path)
    assert totals["files"] == 1 and totals["items"] == len(cc.tensor_items(path)) + len(cc.pickled_items(path))
    assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n]


def test_every_flipped_tensor_byte_is_caught_and_nothing_changes(saved, tmp_path) -> None:
    """The defect: without checksums a flipped byte in a stored tensor loads as a wrong number."""
    path, snap = saved
    model, opt = th.keyed_model(seed=1)
    before = th.snapshot(model, opt)
    tensors = cc.tensor_items(path)
    assert len(tensors) == 38
    silent = []
    for key in tensors:
        ckpt = str(tmp_path / "c")
        shutil.copytree(path, ckpt)
        name, offset = cc.tensor_data_offset(ckpt, key)
        cc.flip(os.path.join(ckpt, name), offset)
        with pytest.raises(CheckpointCorruptError, match="CRC-32") as info:
            load_dmp(ckpt, model, opt, extra={"step": 0})
        assert key in str(info.value) and "__0_0.distcp" in str(info.value), str(info.value)
        assert th.same(th.snapshot(model, opt), before), key
        with pytest.raises(CheckpointCorruptError):
            verify_checkpoint(ckpt)
        load_dmp(ckpt, model, opt, extra={"step": 0}, verify=False)      # what an unverified load does
        if not th.same(th.snapshot(model, opt), snap):
            silent.append(key)
        load_dmp(path, model, opt, extra={"step": 0})
        shutil.rmtree(ckpt)
        model, opt = th.keyed_model(seed=1)
    # every one loads a wrong number, except the wrapper's per-parameter copies of the one group step
    # counter: the 4 parameters share it, and the last one copied in (2.bias) wins
    steps = sorted(k for k in tensors if k.endswith(".step") and ".block_" not in k)
    assert len(steps) == 4 and sorted(set(tensors) - set(silent)) == [k for k in steps if not k.endswith("2.bias.step")]


@pytest.mark.filterwarnings("ignore::sharded_shampoo.checkpointing.UnverifiedCheckpointWarning")
@pytest.mark.parametrize("how", ["delete", "truncate", "unreadable_last_item"])
def test_failed_load_dmp_is_all_or_nothing_and_an_exception(tmp_path, how: str) -> None:
    for checksums in (True, False):
        model, opt = th.keyed_model()
        ckpt = save_dmp(str(tmp_path / f"c{checksums}"), model, opt, checksums=checksums)
        data = os.path.join(ckpt, "__0_0.distcp")
        if how == "delete":
            os.remove(data)
        elif how == "truncate":
            os.truncate(data, os.path.getsize(data) - 100)
        else:       # the last item's zip header: the read fails after every other item was read
            md = cc.read_metadata(ckpt)
            with open(data, "r+b") as f:
                f.seek(max(i.offset for i in md.storage_data.values()))
                f.write(b"XXXX")
        model2, opt2 = th.keyed_model(seed=1)
        before = th.snapshot(model2, opt2)
        with pytest.raises(CheckpointLoadError) as info:
            load_dmp(ckpt, model2, opt2)
        assert isinstance(info.value, Exception) and ckpt in str(info.value), str(info.value)
        assert th.same(th.snapshot(model2, opt2), before), (how, checksums)


def test_save_dmp_refuses_an_extra_that_cannot_be_loaded_back(tmp_path) -> None:
    model, opt = th.keyed_model()
    for value in ({"a": 1}, {}, [torch.ones(2)]):
        with pytest.raises(CheckpointArgumentError, match=r"extra\['cfg'\].*own extra key.*json.dumps"):
            save_dmp(str(tmp_path / "c"), model, opt, extra={"cfg": value})
        with pytest.raises(CheckpointArgumentError):
            DMPTrainState(model, opt, extra={"cfg": value})
    assert os.listdir(tmp_path) == []          # refused before anything was written
    plain = {"i": 3, "s": "x", "l": [1, "a"], "t": torch.arange(3.0), "n": None}
    save_dmp(str(tmp_path / "c"), model, opt, extra=plain)
    got = load_dmp(str(tmp_path / "c"), model, opt, extra={k: (torch.zeros(3) if k == "t" else 0) for k in plain})
    assert torch.equal(got.pop("t"), plain["t"]) and got == {k: v for k, v in plain.items() if k != "t"}


def test_param_groups_with_config_objects_round_trip_as_data(tmp_path) -> None:
    """save_param_groups(True): configs are stored as plain dicts (weights_only loads them) and come back."""
    model, opt = th.keyed_model()
    opt.save_param_groups(True)
    assert opt.state_dict()["param_groups"][0]["grafting"]["__config__"] == "AdaGradGrafting"
    save_dmp(str(tmp_path / "c"), model, opt)
    model2, opt2 = th.keyed_model(seed=1)
    opt2.save_param_groups(True)
    opt2.shampoo.param_groups[0]["lr"] = 1.0
    load_dmp(str(tmp_path / "c"), model2, opt2)
    group = opt2.shampoo.param_groups[0]
    assert group["lr"] == th.CONFIG["lr"] and group["grafting"] == AdaGradGrafting(epsilon=1e-8)
    assert th.same(th.snapshot(model2, opt2), th.snapshot(model, opt))


def test_saving_again_replaces_the_checkpoint_only_once_complete(tmp_path) -> None:
    path = str(tmp_path / "step_4")
    model, opt = th.keyed_model()
    save_dmp(path, model, opt, extra={"step": 1})
    th.train(opt, model, range(50, 52))
    save_dmp(path, model, opt, extra={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["step_4"]
    model2, opt2 = th.keyed_model(seed=1)
    assert load_dmp(path, model2, opt2, extra={"step": 0}) == {"step": 2}
    assert th.same(th.snapshot(model2, opt2), th.snapshot(model, opt))


def test_an_older_unverified_checkpoint_still_loads(tmp_path) -> None:
    """A save_dmp checkpoint of an earlier version (plain dcp.save, no checksums) loads, with a warning."""
    model, opt = th.keyed_model()
    dcp.save({"app": DMPTrainState(model, opt, extra={"step": 4})}, checkpoint_id=str(tmp_path / "old"))
    model2, opt2 = th.keyed_model(seed=1)
    with pytest.warns(UnverifiedCheckpointWarning, match="without verification"):
        assert load_dmp(str(tmp_path / "old"), model2, opt2, extra={"step": 0}) == {"step": 4}
    assert th.same(th.snapshot(model2, opt2), th.snapshot(model, opt))


def test_parameters_of_the_fused_optimizer_are_refused_with_the_fix() -> None:
    """What dict(dmp.named_parameters()) passes: tables trained by torchrec's in-backward optimizer."""
    model = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2))
    apply_optimizer_in_backward(torch.optim.SGD, model[0].parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match=r"\['0.weight'\].*sharded embedding tables.*dense_parameters\(model\)"):
        ShampooDenseOptimizer(dict(model.named_parameters()), **th.CONFIG)
    dense = ShampooDenseOptimizer({"1.weight": model[1].weight, "1.bias": model[1].bias}, **th.CONFIG)
    assert len(dense.shampoo.param_groups[0]["params"]) == 2


def test_a_failed_save_dmp_raises_our_error_and_publishes_nothing(tmp_path, monkeypatch) -> None:
    """DCP's own failure is a BaseException (CheckpointException); save_dmp raises a CheckpointSaveError."""
    from torch.distributed.checkpoint import FileSystemWriter

    from sharded_shampoo.checkpointing import CheckpointSaveError

    model, opt = th.keyed_model()
    path = str(tmp_path / "step_1")
    save_dmp(path, model, opt, extra={"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    with pytest.raises(CheckpointSaveError, match="No space left") as info:
        save_dmp(path, model, opt, extra={"step": 2})
    assert isinstance(info.value, Exception)
    assert os.listdir(tmp_path) == ["step_1"]              # the old checkpoint stays, no temporary left
    monkeypatch.undo()
    assert load_dmp(path, model, opt, extra={"step": 0}) == {"step": 1}
