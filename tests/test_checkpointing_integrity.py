"""Checkpoint hardening on one process: checksums catch bit flips, failed loads change nothing,
keep_last by save order, a strict ``latest`` pointer, failed saves clean up, clear errors.

(Two-rank versions of the load and agreement cases: test_checkpointing_faults.py.)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from tests.support import ckpt_scenarios as cs
from sharded_shampoo.checkpointing import (CheckpointArgumentError, CheckpointCorruptError, CheckpointError,
                                           CheckpointLoadError, CheckpointNotFoundError, CheckpointPointerError,
                                           CheckpointSaveError, IncompatibleCheckpointError, MissingExtraError,
                                           TrainState, UnverifiedCheckpointWarning, latest_checkpoint,
                                           list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPES = {"w": (20, 6), "v": (5, 4, 3), "b": (7,)}


def _trained(steps: int = 4):
    model, opt = cs.build("single", "root_inverse", model=cs.Net(SHAPES))
    cs.feed(model, opt, 0, steps)
    return model, opt


def _flip(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    root = str(tmp_path_factory.mktemp("hardening"))
    model, opt = _trained()
    save_checkpoint(root, 4, model, opt, extra={"step": 4})
    return root, cs.snapshot(model, opt)


def _spans(ckpt: str, name: str) -> list[tuple[int, int]]:
    return sorted({(i.offset, i.length) for i in FileSystemReader(ckpt).read_metadata().storage_data.values()
                   if i.relative_path == name})


def _tensor_data_offsets(ckpt: str, name: str) -> list[int]:
    """The middle byte of every tensor's raw data (each item is a torch.save zip; its data record
    is '<archive>/data/0'), where a flip changes a number rather than the framing."""
    out = []
    with open(os.path.join(ckpt, name), "rb") as f:
        for offset, length in _spans(ckpt, name):
            f.seek(offset)
            blob = f.read(length)
            if not blob.startswith(b"PK"):
                continue
            archive = zipfile.ZipFile(io.BytesIO(blob))
            for info in archive.infolist():
                if info.filename.endswith("/data/0") and info.file_size >= 4:
                    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
                    start = info.header_offset + 30 + name_len + extra_len
                    out.append(offset + start + (info.file_size // 8) * 4 + 3)  # an fp32's exponent byte
    return out


def _flip_offsets(ckpt: str, name: str, spread: int) -> list[int]:
    """``spread`` offsets evenly over the file, the first and last byte of every stored item, and
    a byte inside every tensor's data."""
    spans = _spans(ckpt, name)
    size = os.path.getsize(os.path.join(ckpt, name))
    # DCP stores the items back to back: every byte of the file belongs to an item
    assert spans[0][0] == 0 and sum(n for _, n in spans) == size
    edges = {o for off, n in spans for o in (off, off + n - 1)}
    return sorted(edges | {size * k // spread for k in range(spread)} | set(_tensor_data_offsets(ckpt, name)))


def test_every_bit_flip_in_a_data_file_raises_and_names_the_file(saved) -> None:
    root, snap = saved
    ckpt = os.path.join(root, "step_4")
    data = os.path.join(ckpt, "__0_0.distcp")
    offsets = _flip_offsets(ckpt, "__0_0.distcp", 100)
    assert len(offsets) > 200
    model, opt = _trained(steps=1)
    before = cs.snapshot(model, opt)
    silent, unnamed = [], []
    for k, offset in enumerate(offsets):
        _flip(data, offset, k % 8)
        try:
            load_checkpoint(root, model, opt, extra={"step": 0})
            silent.append(offset)
        except CheckpointCorruptError as err:
            if data not in str(err) or "holding app." not in str(err) or err.path != ckpt:
                unnamed.append(str(err))
        finally:
            _flip(data, offset, k % 8)
        assert cs.same(cs.snapshot(model, opt), before), offset      # nothing was applied
    assert silent == [] and unnamed == [], (silent, unnamed[:3])
    # the restored file loads and is exactly the saved state
    assert load_checkpoint(root, model, opt, extra={"step": 0}) == {"step": 4}
    assert cs.same(cs.snapshot(model, opt), snap)
    assert verify_checkpoint(ckpt)["files"] == 1


def test_without_checksums_bit_flips_load_silently(saved) -> None:
    """The defect the checksums fix: DCP's format alone loads some flipped bits as wrong values."""
    root, snap = saved
    ckpt = os.path.join(root, "step_4")
    data = os.path.join(ckpt, "__0_0.distcp")
    model, opt = _trained(steps=1)
    offsets = _tensor_data_offsets(ckpt, "__0_0.distcp")
    assert len(offsets) >= 20
    silent = 0
    for offset in offsets:
        _flip(data, offset, 6)
        try:
            load_checkpoint(root, model, opt, extra={"step": 0}, verify=False)
            silent += not cs.same(cs.snapshot(model, opt), snap)
        finally:
            _flip(data, offset, 6)
    assert silent == len(offsets)           # every one loads a wrong number without an error


def test_flips_in_metadata_and_checksum_file_raise(saved) -> None:
    root, _ = saved
    ckpt = os.path.join(root, "step_4")
    model, opt = _trained(steps=1)
    before = cs.snapshot(model, opt)
    for name in (".metadata", "checksums.json"):
        path = os.path.join(ckpt, name)
        size = os.path.getsize(path)
        for k, offset in enumerate(sorted({0, size - 1} | {size * j // 12 for j in range(12)})):
            _flip(path, offset, k % 8)
            try:
                with pytest.raises(CheckpointLoadError) as info:
                    load_checkpoint(root, model, opt, extra={"step": 0})
            finally:
                _flip(path, offset, k % 8)
            assert ckpt in str(info.value) or info.value.path == ckpt, str(info.value)
            assert cs.same(cs.snapshot(model, opt), before)
    os.rename(os.path.join(ckpt, "checksums.json"), os.path.join(ckpt, "gone"))
    try:   # a save_checkpoint checkpoint whose checksums vanished is not silently trusted
        with pytest.raises(CheckpointCorruptError, match="checksums.json.*missing.*verify=False"):
            load_checkpoint(root, model, opt)
    finally:
        os.rename(os.path.join(ckpt, "gone"), os.path.join(ckpt, "checksums.json"))


@pytest.mark.filterwarnings("ignore::sharded_shampoo.checkpointing.UnverifiedCheckpointWarning")
@pytest.mark.parametrize("how", ["delete", "truncate", "unreadable_item"])
def test_failed_load_leaves_model_and_optimizer_unchanged(saved, tmp_path, how: str) -> None:
    root, _ = saved
    for checksums in (True, False):
        ckpt = str(tmp_path / f"c{checksums}")
        model, opt = _trained()
        save_checkpoint(ckpt, 4, model, opt, checksums=checksums)
        data = os.path.join(ckpt, "step_4", "__0_0.distcp")
        if how == "delete":
            os.remove(data)
        elif how == "truncate":
            os.truncate(data, os.path.getsize(data) - 100)
        else:   # the last item's zip header: the read fails after every other item was read
            spans = [(i.offset, i.length) for i in FileSystemReader(os.path.join(ckpt, "step_4")).read_metadata()
                     .storage_data.values()]
            with open(data, "r+b") as f:
                f.seek(max(spans)[0])
                f.write(b"XXXX")
        model2, opt2 = _trained(steps=2)
        before = cs.snapshot(model2, opt2)
        with pytest.raises(CheckpointLoadError) as info:
            load_checkpoint(ckpt, model2, opt2)
        assert isinstance(info.value, Exception) and os.path.join(ckpt, "step_4") in str(info.value)
        assert cs.same(cs.snapshot(model2, opt2), before), (how, checksums)


def test_keep_last_prunes_by_save_order_after_a_rollback(tmp_path) -> None:
    root = str(tmp_path)
    model, opt = _trained(steps=1)
    for step in (5, 10, 20):
        save_checkpoint(root, step, model, opt, extra={"step": step})
    load_checkpoint(os.path.join(root, "step_5"), model, opt, extra={"step": 0})     # roll back
    for step in (6, 7, 8):
        save_checkpoint(root, step, model, opt, extra={"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [7, 8]
    assert latest_checkpoint(root) == os.path.join(root, "step_8")
    sequences = [json.load(open(os.path.join(root, f"step_{s}", "commit.json")))["sequence"] for s in (7, 8)]
    assert sequences == [5, 6]
    # checkpoints without a save record (plain dcp.save into the directory) count as older
    dcp.save({"app": TrainState(model, opt)}, checkpoint_id=os.path.join(root, "step_99"))
    save_checkpoint(root, 9, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [8, 9]


@pytest.mark.parametrize("pointer", ["../a/step_5", "/abs/step_5", "symlink", "a/../step_5"])
def test_latest_outside_the_directory_is_refused(tmp_path, pointer: str) -> None:
    root, outside = str(tmp_path / "ckpt"), str(tmp_path / "a")
    model, opt = _trained(steps=1)
    save_checkpoint(outside, 5, model, opt)
    save_checkpoint(root, 1, model, opt)
    if pointer == "symlink":
        os.symlink(os.path.join(outside, "step_5"), os.path.join(root, "step_5"))
        pointer = "step_5"
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(pointer.replace("/abs", str(tmp_path / "a")) + "\n")
    before = cs.snapshot(model, opt)
    with pytest.raises(CheckpointPointerError, match="latest.*(outside|not the name).*rewrite it"):
        load_checkpoint(root, model, opt)
    with pytest.raises(CheckpointPointerError):
        save_checkpoint(root, 2, model, opt)
    assert cs.same(cs.snapshot(model, opt), before)
    assert not [n for n in os.listdir(root) if ".tmp" in n] and not os.path.exists(os.path.join(root, "step_2"))


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_unusable_latest_gives_a_clear_error(tmp_path, kind: str) -> None:
    root = str(tmp_path)
    model, opt = _trained(steps=1)
    save_checkpoint(root, 1, model, opt)
    pointer = os.path.join(root, "latest")
    os.remove(pointer)
    if kind == "directory":
        os.mkdir(pointer)
    else:
        with open(pointer, "wb") as f:
            f.write(b"\xff\xfe\x00\x9c\x80")
    expected = "is a directory" if kind == "directory" else "binary data"
    for call in (lambda: load_checkpoint(root, model, opt), lambda: save_checkpoint(root, 2, model, opt)):
        with pytest.raises(CheckpointPointerError, match=f"{expected}.*delete it.*pass a step_N directory"):
            call()
    # the fix the message names works: a step_N directory loads
    load_checkpoint(os.path.join(root, "step_1"), model, opt)


def test_failed_save_removes_its_tmp_and_keeps_latest(tmp_path, monkeypatch) -> None:
    from sharded_shampoo.checkpointing import saving as storage

    root = str(tmp_path)
    model, opt = _trained(steps=1)
    save_checkpoint(root, 1, model, opt)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    for target, name in ((FileSystemWriter, "write_data"), (storage, "checksum_files"), (storage, "write_commit")):
        with monkeypatch.context() as m:
            m.setattr(target, name, disk_full)
            with pytest.raises(CheckpointSaveError, match="No space left"):
                save_checkpoint(root, 2, model, opt)
        assert sorted(os.listdir(root)) == ["latest", "step_1"], name
        assert latest_checkpoint(root) == os.path.join(root, "step_1")
    save_checkpoint(root, 2, model, opt)     # and the next save works
    assert latest_checkpoint(root) == os.path.join(root, "step_2")


def test_load_during_a_pending_async_save_waits_for_it(tmp_path) -> None:
    root = str(tmp_path)
    model, opt = _trained(steps=2)
    save_checkpoint(root, 2, model, opt, extra={"step": 2})
    cs.feed(model, opt, 2, 4)
    at_save = cs.snapshot(model, opt)
    handle = save_checkpoint(root, 4, model, opt, extra={"step": 4}, async_=True)
    cs.feed(model, opt, 4, 5)
    model2, opt2 = _trained(steps=1)
    assert load_checkpoint(root, model2, opt2, extra={"step": 0}) == {"step": 4}
    assert handle.done() and cs.same(cs.snapshot(model2, opt2), at_save)


def test_nested_extra_is_refused_at_save_with_a_fix(tmp_path) -> None:
    root = str(tmp_path)
    model, opt = _trained(steps=1)
    for value in ({"a": 1}, {}, [torch.ones(2)], ({"a": 1},)):
        with pytest.raises(CheckpointArgumentError, match=r"extra\['cfg'\].*own extra key.*json.dumps") as info:
            save_checkpoint(root, 1, model, opt, extra={"cfg": value})
        assert isinstance(info.value, ValueError)
    assert os.listdir(root) == []            # refused before anything was written
    plain = {"i": 3, "f": 0.5, "s": "x", "n": None, "l": [1, "a"], "t": torch.arange(3.0), "by": b"\x00"}
    save_checkpoint(root, 1, model, opt, extra=plain)
    template = {k: (torch.zeros(3) if k == "t" else 0) for k in plain}
    got = load_checkpoint(root, model, opt, extra=template)
    assert got.keys() == plain.keys() and torch.equal(got.pop("t"), plain["t"])
    assert got == {k: v for k, v in plain.items() if k != "t"}


def test_error_types_are_exceptions_and_consistent(saved, tmp_path) -> None:
    root, _ = saved
    model, opt = _trained(steps=1)
    with pytest.raises(MissingExtraError, match=r"has no extra values \['missing'\]; it has \['step'\]") as info:
        load_checkpoint(root, model, opt, extra={"missing": 0})
    assert isinstance(info.value, (KeyError, CheckpointLoadError)) and "'" != str(info.value)[0]
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(str(tmp_path), model, opt)
    assert isinstance(info.value, FileNotFoundError) and info.value.path == str(tmp_path)
    for cls in (CheckpointLoadError, CheckpointSaveError, CheckpointCorruptError, IncompatibleCheckpointError,
                CheckpointPointerError, MissingExtraError, CheckpointArgumentError):
        assert issubclass(cls, CheckpointError) and issubclass(cls, Exception)
    assert issubclass(IncompatibleCheckpointError, ValueError)


def test_plain_dcp_checkpoint_loads_with_a_warning_and_reshards_later(tmp_path) -> None:
    model, opt = _trained()
    snap = cs.snapshot(model, opt)
    path = str(tmp_path / "plain")
    dcp.save({"app": TrainState(model, opt, extra={"step": 4})}, checkpoint_id=path)
    model2, opt2 = _trained(steps=1)
    with pytest.warns(UnverifiedCheckpointWarning, match="without verification"):
        assert load_checkpoint(path, model2, opt2, extra={"step": 0}) == {"step": 4}
    assert cs.same(cs.snapshot(model2, opt2), snap)
    with pytest.raises(CheckpointCorruptError, match="no checksums.json"):
        verify_checkpoint(path)
    # and a save_checkpoint checkpoint still loads with dcp.load + TrainState (the extra files are ignored)
    save_checkpoint(str(tmp_path / "pair"), 4, model, opt)
    model3, opt3 = _trained(steps=1)
    dcp.load({"app": TrainState(model3, opt3)}, checkpoint_id=str(tmp_path / "pair" / "step_4"))
    assert cs.same(cs.snapshot(model3, opt3), snap)
    shutil.rmtree(str(tmp_path / "pair"))
