"""Crafting hostile checkpoints for the security tests: pickles that would run a command, written into
any pickled part of a real checkpoint with ``checksums.json`` rewritten to match -- what anyone who
can write a checkpoint directory can do.

Test code only: it reads the checkpoints it crafts with plain ``pickle`` (they are its own).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from sharded_shampoo.checkpointing.integrity import checksum_files, write_checksums


class RunCommand:
    """Unpickling this calls ``os.system(command)`` (what a crafted checkpoint would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


class RunPython:
    """Unpickling this calls ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def payloads(marker: str) -> dict[str, Any]:
    """Objects whose unpickling writes ``marker`` (each a different way to run code)."""
    return {"os.system": RunCommand(f"echo pwned > {marker}"),
            "exec": RunPython(f"open({marker!r}, 'w').write('pwned')")}


def pickle_bytes(obj: Any) -> bytes:
    """Plain pickle (the ``.metadata`` format)."""
    return pickle.dumps(obj)


def torch_blob(obj: Any) -> bytes:
    """``torch.save`` bytes (the format of every stored item)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_metadata(ckpt: str) -> Metadata:
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        return pickle.load(f)


def pickled_items(ckpt: str) -> list[str]:
    """The keys of every small object (a pickle of its own) stored in ``ckpt``."""
    md = read_metadata(ckpt)
    return sorted(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))


def tensor_items(ckpt: str) -> list[str]:
    md = read_metadata(ckpt)
    return sorted(k for k, v in md.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata))


def _rewrite_checksums(ckpt: str, md: Metadata) -> None:
    if not os.path.exists(os.path.join(ckpt, "checksums.json")):
        return
    files = {info.relative_path for info in md.storage_data.values()}
    world = 1 + max(int(name.split("_")[2]) for name in files)
    write_checksums(ckpt, md, [checksum_files(ckpt, md, r, world) for r in range(world)])


def replace_item(ckpt: str, key: str, blob: bytes) -> None:
    """Put ``blob`` in place of the (first chunk of the) stored item ``key``; fix offsets and checksums."""
    md = read_metadata(ckpt)
    index = next(i for i in sorted(md.storage_data, key=lambda i: list(i.offset or ())) if i.fqn == key)
    info = md.storage_data[index]
    path = os.path.join(ckpt, info.relative_path)
    with open(path, "rb") as f:
        data = f.read()
    start, delta = info.offset, len(blob) - info.length
    with open(path, "wb") as f:
        f.write(data[:start] + blob + data[start + info.length:])
    for other in md.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > start:
            other.offset += delta
    info.length = len(blob)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    _rewrite_checksums(ckpt, md)


def replace_metadata(ckpt: str, raw: bytes) -> None:
    """Write ``raw`` as ``.metadata`` and record its size and CRC in ``checksums.json``."""
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(raw)
    sums = os.path.join(ckpt, "checksums.json")
    if os.path.exists(sums):
        with open(sums) as f:
            record = json.load(f)
        record["metadata"] = {"size": len(raw), "crc": zlib.crc32(raw)}
        with open(sums, "w") as f:
            json.dump(record, f)


def metadata_with(ckpt: str, obj: Any) -> bytes:
    """The checkpoint's real metadata with ``obj`` hidden in it (in ``planner_data``), pickled."""
    md = read_metadata(ckpt)
    md.planner_data = {"hidden": obj}
    return pickle_bytes(md)


def tensor_data_offset(ckpt: str, key: str) -> tuple[str, int]:
    """(file, offset) of a byte in the middle of the raw data of stored tensor ``key`` (first chunk),
    where a flip changes a number rather than the zip framing of the ``torch.save`` blob."""
    md = read_metadata(ckpt)
    index = next(i for i in sorted(md.storage_data, key=lambda i: list(i.offset or ())) if i.fqn == key)
    info = md.storage_data[index]
    with open(os.path.join(ckpt, info.relative_path), "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    archive = zipfile.ZipFile(io.BytesIO(blob))
    entry = next(e for e in archive.infolist() if e.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", blob[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len
    return info.relative_path, info.offset + start + entry.file_size // 2


def flip(path: str, offset: int, bit: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
