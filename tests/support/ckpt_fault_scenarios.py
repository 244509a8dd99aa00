"""Two-rank fault scenarios for the checkpoint hardening tests (imported by spawned ranks).

Each returns, per case, what the rank saw: the error class and message (or None) and how long
the failing call took, plus whether model and optimizer were bit-identical afterwards.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.support import ckpt_scenarios as cs
from sharded_shampoo.checkpointing import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint


def attempt(fn: Callable[[], Any], root: Optional[str] = None) -> dict[str, Any]:
    """Run ``fn``; what it raised (class names of its MRO, message, path), how long it took, and the
    ``.tmp`` directories in ``root`` the moment it returned."""
    t0 = time.perf_counter()
    try:
        fn()
        out: dict[str, Any] = {"error": None}
    except BaseException as err:  # noqa: BLE001 - the test inspects what came out
        out = {"error": [c.__name__ for c in type(err).__mro__], "message": str(err),
               "path": getattr(err, "path", None)}
    out["seconds"] = time.perf_counter() - t0
    if root is not None:
        out["tmp_after"] = sorted(n for n in os.listdir(root) if ".tmp" in n)
    return out


def last_item(ckpt: str, file: str) -> tuple[int, int]:
    """(offset, length) of the item stored last in ``file``."""
    spans = [(i.offset, i.length) for i in FileSystemReader(ckpt).read_metadata().storage_data.values()
             if i.relative_path == file]
    return max(spans)


def damage(ckpt: str, how: str) -> None:
    """Rank 0: damage a copy of a checkpoint in one of the ways a real file system does."""
    rank1 = os.path.join(ckpt, "__1_0.distcp")
    if how == "delete_rank1":
        os.remove(rank1)
    elif how.startswith("truncate_rank"):
        path = os.path.join(ckpt, f"__{how[-1]}_0.distcp")
        os.truncate(path, os.path.getsize(path) - 100)
    elif how == "flip_rank1":
        with open(rank1, "r+b") as f:
            f.seek(os.path.getsize(rank1) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
    elif how == "unreadable_last_item":
        # no checksums: break the zip header of rank 1's last item, so the read fails only after
        # rank 1 has read its other items -- DCP would have copied those into the live state
        offset, _ = last_item(ckpt, "__1_0.distcp")
        with open(rank1, "r+b") as f:
            f.seek(offset)
            f.write(b"XXXX")
    else:
        raise ValueError(how)


DAMAGE = {"delete_rank1": "ok", "truncate_rank1": "ok", "truncate_rank0": "ok", "flip_rank1": "ok",
          "truncate_rank1 (no checksums)": "plain", "unreadable_last_item": "plain"}


def scenario_atomic_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save on 2 ranks (with and without checksums), train on, then load damaged copies."""
    model, opt = cs.build("fsdp", "root_inverse", (2,))
    cs.feed(model, opt, 0, 4)
    save_checkpoint(os.path.join(root, "ok"), 4, model, opt, extra={"step": 4})
    save_checkpoint(os.path.join(root, "plain"), 4, model, opt, extra={"step": 4}, checksums=False)
    dcp.save({"app": TrainState(model, opt, extra={"step": 4})}, checkpoint_id=os.path.join(root, "plain_dcp"))
    at_save = cs.snapshot(model, opt)
    cs.feed(model, opt, 4, 6)                       # the live state now differs from the checkpoint
    before = cs.snapshot(model, opt)
    out: dict[str, Any] = {"differs_from_checkpoint": not cs.same(at_save, before)}
    for case, source in DAMAGE.items():
        path = os.path.join(root, case.split()[0] + ("_plain" if source == "plain" else ""))
        if rank == 0:
            shutil.copytree(os.path.join(root, source, "step_4"), path)
            damage(path, case.split()[0])
        dist.barrier()
        out[case] = attempt(lambda: load_checkpoint(path, model, opt, extra={"step": -1}))
        out[case]["path_expected"] = path
        out[case]["unchanged"] = cs.same(cs.snapshot(model, opt), before)
    # the undamaged checkpoints load, and give back exactly the saved state
    for source in ("ok", "plain"):
        out[f"good {source}"] = load_checkpoint(os.path.join(root, source), model, opt, extra={"step": -1})
        out[f"good {source} equal"] = cs.same(cs.snapshot(model, opt), at_save)
    return out


def _fail_on_rank1(module: Any, name: str) -> None:
    """Make ``module.name`` raise on rank 1 only (a local failure the other rank cannot see)."""
    real = getattr(module, name)

    def broken(*args: Any, **kwargs: Any) -> Any:
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    setattr(module, name, broken)


def scenario_agreement(rank: int, world: int, root: str) -> dict[str, Any]:
    """Local failures on one rank during save and load: every rank must raise, within seconds."""
    from sharded_shampoo.checkpointing import saving as storage

    model, opt = cs.build("fsdp", "root_inverse", (2,))
    cs.feed(model, opt, 0, 2)
    save_checkpoint(root, 2, model, opt)
    pointer = os.path.join(root, "latest")
    out: dict[str, Any] = {}

    def with_pointer(content: bytes, case: str, fn: Callable[[], Any]) -> None:
        if rank == 0:
            with open(pointer, "wb") as f:
                f.write(content)
        dist.barrier()
        out[case] = attempt(fn, root)
        dist.barrier()
        if rank == 0:
            with open(pointer, "w") as f:
                f.write("step_2\n")
        dist.barrier()

    def case(name: str, fn: Callable[[], Any]) -> None:
        # the barrier keeps a fast rank from starting the next case (whose save creates a new
        # ``.tmp``) while a slower one still lists the directory after this case
        out[name] = attempt(fn, root)
        dist.barrier()

    binary = b"\xff\xfe\x00\x9c binary"
    with_pointer(binary, "save: binary latest (rank 0 fails)", lambda: save_checkpoint(root, 3, model, opt))
    with_pointer(binary, "load: binary latest", lambda: load_checkpoint(root, model, opt))
    case("save: nested extra on rank 1 only",
         lambda: save_checkpoint(root, 3, model, opt, extra={"cfg": {"a": 1}} if rank == 1 else {"cfg": 1}))
    case("save: ranks disagree on the step", lambda: save_checkpoint(root, 3 + rank, model, opt))
    case("load: rank 1 passes a missing path",
         lambda: load_checkpoint(root if rank == 0 else os.path.join(root, "nope"), model, opt))
    _fail_on_rank1(storage, "checksum_files")
    case("save: checksums fail on rank 1", lambda: save_checkpoint(root, 3, model, opt))
    dist.barrier()
    out["tmp_dirs"] = sorted(n for n in os.listdir(root) if ".tmp" in n)
    out["latest"] = os.path.basename(latest_checkpoint(root))
    return out
