"""No code runs from a checkpoint on load (one process; the torchrec cases also on 2 ranks, test_torchrec.py).

Each case writes a pickle that would run a command (``os.system`` / ``exec`` writing a marker
file) into one pickled part of a real checkpoint -- ``.metadata`` or one stored item -- and rewrites
``checksums.json`` to match, as anyone who can write the directory can. The payloads are live:
plain ``pickle.loads`` / ``torch.load(weights_only=False)`` of them writes the marker. The loaders
must refuse each with :class:`UnsafeCheckpointError` naming the item, leave model and optimizer
bit-identical, and the marker must never appear.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest
import torch

from tests.support import ckpt_craft as cc
from tests.support import ckpt_scenarios as cs
from sharded_shampoo.checkpointing import (CheckpointCorruptError, CheckpointLoadError, UnsafeCheckpointError,
                                           check_pickles, load_checkpoint, read_checkpoint_meta, save_checkpoint,
                                           verify_checkpoint)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SHAPES = {"w": (12, 6), "b": (7,)}
EXTRA = {"step": 4, "name": "run-a", "blob": b"\x00\x01", "sizes": [1, 2.5]}


def _trained(steps: int = 3):
    model, opt = cs.build("single", "root_inverse", model=cs.Net(SHAPES))
    cs.feed(model, opt, 0, steps)
    return model, opt


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("pristine"))
    model, opt = _trained()
    save_checkpoint(root, 4, model, opt, extra=EXTRA)
    return os.path.join(root, "step_4")


def test_payloads_are_live(tmp_path) -> None:
    """The payloads do run under an unrestricted unpickle (so 'no marker' below means 'refused')."""
    for how, obj in cc.payloads(str(tmp_path / "m")).items():
        marker = tmp_path / "m"
        pickle.loads(cc.pickle_bytes(obj))
        assert marker.exists(), how
        marker.unlink()
        torch.load(io.BytesIO(cc.torch_blob(obj)), weights_only=False)
        assert marker.exists(), how
        marker.unlink()


def _refused(ckpt: str, load, marker: str, what: str) -> str:
    """``load()`` must raise UnsafeCheckpointError, naming ``what``, without writing the marker."""
    with pytest.raises(UnsafeCheckpointError) as info:
        load()
    assert not os.path.exists(marker), f"code from {what} ran"
    assert isinstance(info.value, CheckpointCorruptError) and isinstance(info.value, Exception)
    assert what in str(info.value) and "nothing" in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("how", ["os.system", "exec"])
def test_crafted_metadata_runs_nothing(pristine: str, tmp_path, how: str) -> None:
    marker = str(tmp_path / "marker")
    payload = cc.payloads(marker)[how]
    model, opt = _trained(steps=1)
    before = cs.snapshot(model, opt)
    for variant, raw in (("whole file", cc.pickle_bytes(payload)), ("hidden", cc.metadata_with(pristine, payload))):
        ckpt = str(tmp_path / variant.replace(" ", "_"))
        shutil.copytree(pristine, ckpt)
        cc.replace_metadata(ckpt, raw)
        for verify in (True, False):
            message = _refused(ckpt, lambda: load_checkpoint(ckpt, model, opt, verify=verify), marker, ".metadata")
            assert "DCP metadata is never made of" in message and ("system" in message or "exec" in message), message
        for offline in (verify_checkpoint, check_pickles, read_checkpoint_meta):
            _refused(ckpt, lambda: offline(ckpt), marker, ".metadata")
        assert cs.same(cs.snapshot(model, opt), before), variant


def test_crafted_item_runs_nothing_in_any_pickled_item(pristine: str, tmp_path) -> None:
    """Every small object (extra values, every param-group value, the plan description and guard) and a
    tensor item, each in turn."""
    marker = str(tmp_path / "marker")
    blob = cc.torch_blob(cc.payloads(marker)["os.system"])
    items = cc.pickled_items(pristine)
    assert len(items) > 50 and "app.extra.name" in items and "app.shampoo_meta" in items
    model, opt = _trained(steps=1)
    before = cs.snapshot(model, opt)
    template = {k: 0 for k in EXTRA}
    for key in items + cc.tensor_items(pristine)[:2]:
        ckpt = str(tmp_path / "c")
        shutil.copytree(pristine, ckpt)
        cc.replace_item(ckpt, key, blob)
        _refused(ckpt, lambda: load_checkpoint(ckpt, model, opt, extra=template), marker, key)
        assert cs.same(cs.snapshot(model, opt), before), key
        if key in items:       # the offline checks read small objects; tensors only ever with weights_only
            _refused(ckpt, lambda: verify_checkpoint(ckpt), marker, key)
            _refused(ckpt, lambda: check_pickles(ckpt), marker, key)
        shutil.rmtree(ckpt)
    # the untouched checkpoint loads exactly, and passes both offline checks
    assert load_checkpoint(pristine, model, opt, extra=template) == EXTRA
    assert check_pickles(pristine) == {"metadata": 1, "objects": len(items)}
    assert verify_checkpoint(pristine)["objects"] == len(items)


def test_metadata_that_points_outside_the_checkpoint_is_refused(pristine: str, tmp_path) -> None:
    """Data-only, but a stored item placed in '../x' would make the reader open another file."""
    ckpt = str(tmp_path / "c")
    shutil.copytree(pristine, ckpt)
    md = cc.read_metadata(ckpt)
    next(iter(md.storage_data.values())).relative_path = "../../etc/passwd"
    cc.replace_metadata(ckpt, cc.pickle_bytes(md))
    model, opt = _trained(steps=1)
    with pytest.raises(UnsafeCheckpointError, match="not a file of the checkpoint directory"):
        load_checkpoint(ckpt, model, opt)


def test_data_only_foreign_objects_still_load_as_data(pristine: str, tmp_path) -> None:
    """The restriction refuses code, not data: an extra value that is a plain container of data loads."""
    model, opt = _trained(steps=1)
    root = str(tmp_path / "r")
    save_checkpoint(root, 1, model, opt, extra={"nested_list": [[1, 2], (3, "x")], "none": None, "f": float("inf")})
    got = load_checkpoint(root, model, opt, extra={"nested_list": 0, "none": 0, "f": 0})
    assert got == {"nested_list": [[1, 2], (3, "x")], "none": None, "f": float("inf")}


@pytest.mark.filterwarnings("ignore::sharded_shampoo.checkpointing.UnverifiedCheckpointWarning")
def test_torchrec_checkpoint_runs_nothing(tmp_path) -> None:
    """save_dmp/load_dmp (DMPTrainState over a KeyedOptimizer; the 2-rank DMP run repeats two cases)."""
    pytest.importorskip("torchrec")
    from tests.support import keyed_helpers as th
    from sharded_shampoo.integrations.torchrec import load_dmp, save_dmp

    marker = str(tmp_path / "marker")
    model, opt = th.keyed_model()
    pristine = str(tmp_path / "pristine")
    save_dmp(pristine, model, opt, extra={"step": 2})
    model2, opt2 = th.keyed_model(seed=1)
    before = th.snapshot(model2, opt2)
    cases = [(".metadata", lambda c: cc.replace_metadata(c, cc.metadata_with(c, cc.payloads(marker)["exec"])))]
    cases += [(key, lambda c, key=key: cc.replace_item(c, key, cc.torch_blob(cc.payloads(marker)["os.system"])))
              for key in cc.pickled_items(pristine) + cc.tensor_items(pristine)[:1]]
    for what, craft in cases:
        ckpt = str(tmp_path / "c")
        shutil.copytree(pristine, ckpt)
        craft(ckpt)
        _refused(ckpt, lambda: load_dmp(ckpt, model2, opt2, extra={"step": 0}), marker, what)
        assert th.same(th.snapshot(model2, opt2), before), what
        shutil.rmtree(ckpt)
    assert load_dmp(pristine, model2, opt2, extra={"step": 0}) == {"step": 2}
    assert th.same(th.snapshot(model2, opt2), th.snapshot(model, opt))


def test_unreadable_pickle_is_corrupt_not_unsafe(pristine: str, tmp_path) -> None:
    """Damage (not a crafted global) in .metadata stays a CheckpointCorruptError saying it is damaged."""
    ckpt = str(tmp_path / "c")
    shutil.copytree(pristine, ckpt)
    cc.replace_metadata(ckpt, b"\x80\x04not a pickle at all")
    model, opt = _trained(steps=1)
    with pytest.raises(CheckpointLoadError, match="damaged or incomplete") as info:
        load_checkpoint(ckpt, model, opt)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_rank_local_metadata_fallback_is_restricted_too(pristine: str, tmp_path) -> None:
    """DCP may ask the reader for a rank's own ``__{rank}.metadata``; it goes through the same gate."""
    from sharded_shampoo.checkpointing.integrity import VerifyingReader, read_checksums

    marker = str(tmp_path / "marker")
    ckpt = str(tmp_path / "c")
    shutil.copytree(pristine, ckpt)
    with open(os.path.join(ckpt, "__0.metadata"), "wb") as f:
        f.write(cc.metadata_with(ckpt, cc.payloads(marker)["os.system"]))
    reader = VerifyingReader(ckpt, read_checksums(ckpt))
    assert reader.read_metadata().state_dict_metadata       # the checksummed .metadata is fine
    _refused(ckpt, lambda: reader.read_metadata(rank=0), marker, "__0.metadata")
