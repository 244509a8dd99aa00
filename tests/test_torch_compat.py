"""Every private torch name the project uses exists on the installed torch, and only _torch_compat uses one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from sharded_shampoo import _torch_compat as compat
from sharded_shampoo.checkpointing.integrity import VerifyingReader

ROOT = Path(__file__).resolve().parents[1]
#: ``from torch.x._y import``, ``import torch._y``, ``torch._y`` / ``torch.x._y`` attribute access
PRIVATE_TORCH = re.compile(r"\btorch(\.[A-Za-z]\w*)*\._[A-Za-z]\w*|\bfrom torch(\.\w+)* import [^#\n]*\b_[A-Za-z]\w*")


def test_every_private_name_exists() -> None:
    assert compat.StridedShard.__name__ == "_StridedShard"
    assert compat.StridedShard(0, split_factor=2).split_factor == 2
    assert callable(DeviceMesh._flatten) and callable(DeviceMesh._unflatten)
    assert isinstance(compat.fake_store(), torch.distributed.Store)
    assert "fake" in torch.distributed.Backend.backend_list   # registered by the store's module
    for op in (compat.foreach_add, compat.foreach_add_, compat.foreach_mul, compat.foreach_mul_, compat.foreach_copy_, compat.foreach_lerp_,
               compat.foreach_norm):
        assert callable(op)
    assert callable(getattr(FileSystemReader, compat.DCP_ITEM_READ_HOOK)) and callable(compat.dcp_set_element)
    assert compat.DCP_ITEM_READ_HOOK in vars(VerifyingReader), "the verifying reader no longer overrides DCP's hook"
    assert "linewidth" in vars(compat.print_options())
    assert importlib.import_module(compat.DYNAMO_MODULE).__name__ == compat.DYNAMO_MODULE
    assert compat.profiler_enabled() is False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert compat.profiler_enabled() is True


def test_foreach_ops_compute_what_their_names_say() -> None:
    a, b = [torch.ones(2), torch.full((3,), 2.0)], [torch.ones(2), torch.ones(3)]
    assert [t.tolist() for t in compat.foreach_add(a, b, alpha=2.0)] == [[3.0, 3.0], [4.0, 4.0, 4.0]]
    compat.foreach_mul_(a, 0.5)
    compat.foreach_add_(a, b)
    assert [t.tolist() for t in a] == [[1.5, 1.5], [2.0, 2.0, 2.0]]
    compat.foreach_copy_(a, b)
    assert [float(n) for n in compat.foreach_norm(a, 2)] == pytest.approx([2 ** 0.5, 3 ** 0.5])
    compat.foreach_lerp_(a, [torch.zeros(2), torch.zeros(3)], 0.25)
    assert [t.tolist() for t in a] == [[0.75, 0.75], [0.75, 0.75, 0.75]]


def test_local_shape_helpers_agree_on_a_strided_layout() -> None:
    placements = (compat.StridedShard(0, split_factor=2), Shard(0))
    # (fsdp=2, tp=2) over 10 rows: tp chunks rows 0-4 / 5-9, fsdp splits each chunk again
    shapes = {c: compat.local_shape_and_offset_at((10, 3), (2, 2), c, placements) for c in
              ((0, 0), (0, 1), (1, 0), (1, 1))}
    assert {c: (tuple(s), tuple(o)) for c, (s, o) in shapes.items()} == {
        (0, 0): ((3, 3), (0, 0)), (0, 1): ((3, 3), (5, 0)), (1, 0): ((2, 3), (3, 0)), (1, 1): ((2, 3), (8, 0))}


def test_no_other_file_uses_a_private_torch_name() -> None:
    offenders = []
    for folder in ("sharded_shampoo", "checkpointing", "tests", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "_torch_compat.py" or path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE_TORCH.search(code) and not re.search(r"[\"'].*_StridedShard", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "private torch names outside sharded_shampoo/_torch_compat.py:\n" + "\n".join(offenders)


def test_all_gather_into_gathers_without_a_deprecation_warning() -> None:
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = torch.empty(3, dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)    # torch 2.13 deprecates all_gather_into_tensor
            compat.all_gather_into(out, torch.tensor([4, 5, 6]))
        assert out.tolist() == [4, 5, 6]
    finally:
        dist.destroy_process_group()
