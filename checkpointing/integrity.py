"""Checksums of every stored item of a checkpoint, written at save and verified on load.

DCP stores each tensor chunk (and each small object) as one ``torch.save`` blob at an
(offset, length) in a rank's ``__{rank}_0.distcp`` file, and nothing in that format checks the
bytes: a flipped bit in a blob's data loads as a wrong number. So after DCP has written the
checkpoint, each rank reads back the files it wrote and computes a CRC-32 of every item's byte
range (``zlib.crc32``: ~6x faster than blake2b here, and it detects every burst error up to 32
bits, so every single-bit flip). Rank 0 gathers them and writes ``checksums.json`` -- with the
size and CRC of ``.metadata`` too -- before the checkpoint is published, so a checkpoint with a
``commit.json`` always has its checksums.

On load, :class:`VerifyingReader` (a DCP ``FileSystemReader``) parses ``.metadata`` only from
bytes that match its checksum, checks, before DCP reads anything, that every file this rank
will read exists and has the recorded size, then verifies each item's bytes as it reads them,
before deserializing them. A mismatch raises :class:`.errors.CheckpointCorruptError` naming the file,
the byte range and the tensor (key and chunk offset).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zlib
from dataclasses import dataclass
from typing import IO, Any, Optional

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan

from .directory import write_atomic
from .errors import CheckpointCorruptError
from .safe_pickle import check_pickles, parse_metadata, read_metadata_file, refused

CHECKSUM_FILE = "checksums.json"
METADATA_FILE = ".metadata"
FORMAT = "sharded-shampoo.checksums/1"
ALGORITHM = "crc32"
_BLOCK = 16 << 20
_RANK_FILE = re.compile(r"^__(\d+)_")


def _crc_of_range(stream: IO[bytes], offset: int, length: int) -> tuple[int, int]:
    """(CRC-32, bytes actually read) of ``length`` bytes at ``offset``, read in 16 MiB blocks."""
    stream.seek(offset)
    crc, done = 0, 0
    while done < length:
        block = stream.read(min(_BLOCK, length - done))
        if not block:
            break
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc, done


def _spans_by_file(metadata: Metadata) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {}
    for info in metadata.storage_data.values():
        spans.setdefault(info.relative_path, []).append((info.offset, info.length))
    return {name: sorted(set(s)) for name, s in spans.items()}


def file_owner(name: str, world_size: int) -> int:
    """The rank that checksums file ``name``: its writer (``__{rank}_*``), else rank 0."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) < world_size else 0


def checksum_files(ckpt: str, metadata: Metadata, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's share of the checksums: size and per-item CRCs of the files it wrote."""
    out: dict[str, Any] = {}
    for name, spans in _spans_by_file(metadata).items():
        if file_owner(name, world_size) != rank:
            continue
        with open(os.path.join(ckpt, name), "rb") as f:
            items = {}
            for offset, length in spans:
                crc, done = _crc_of_range(f, offset, length)
                if done != length:
                    raise CheckpointCorruptError(f"{os.path.join(ckpt, name)!r} is shorter than DCP's metadata says "
                                                 "right after it was written", path=ckpt)
                items[str(offset)] = [length, crc]
            out[name] = {"size": os.fstat(f.fileno()).st_size, "items": items}
    return out


def _whole_file(path: str) -> dict[str, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        crc, _ = _crc_of_range(f, 0, size)
    return {"size": size, "crc": crc}


def write_checksums(ckpt: str, metadata: Metadata, parts: list[dict[str, Any]]) -> None:
    """Rank 0: merge every rank's share and write ``checksums.json`` (atomically) into ``ckpt``."""
    files: dict[str, Any] = {}
    for part in parts:
        files.update(part)
    missing = sorted(set(_spans_by_file(metadata)) - set(files))
    if missing:
        raise CheckpointCorruptError(f"no rank computed checksums of {missing} in {ckpt!r}", path=ckpt)
    record = {"format": FORMAT, "algorithm": ALGORITHM, "metadata": _whole_file(os.path.join(ckpt, METADATA_FILE)),
              "files": files}
    write_atomic(os.path.join(ckpt, CHECKSUM_FILE), json.dumps(record, sort_keys=True))


@dataclass(frozen=True)
class Checksums:
    """The content of a checkpoint's ``checksums.json``."""

    path: str
    metadata: dict[str, int]
    files: dict[str, Any]

    def file_size(self, name: str) -> int:
        if name not in self.files:
            raise CheckpointCorruptError(f"{os.path.join(self.path, CHECKSUM_FILE)!r} has no entry for {name!r}, "
                                         "which .metadata references; the checkpoint is inconsistent", path=self.path)
        return int(self.files[name]["size"])

    def item(self, name: str, offset: int, length: int) -> int:
        """The CRC recorded for ``length`` bytes at ``offset`` of file ``name``."""
        entry = self.files.get(name, {}).get("items", {}).get(str(offset))
        if entry is None or int(entry[0]) != length:
            raise CheckpointCorruptError(f"{os.path.join(self.path, CHECKSUM_FILE)!r} records no item of {length} "
                                         f"bytes at offset {offset} of {name!r}; .metadata and checksums disagree",
                                         path=self.path)
        return int(entry[1])


def read_checksums(ckpt: str) -> Optional[Checksums]:
    """``ckpt``'s checksums, or None if it has none; a damaged ``checksums.json`` raises."""
    path = os.path.join(ckpt, CHECKSUM_FILE)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointCorruptError(f"{path!r} cannot be read ({err}); the checkpoint cannot be verified",
                                     path=ckpt) from err
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("algorithm") != ALGORITHM:
        raise CheckpointCorruptError(f"{path!r} is not a {FORMAT} record with {ALGORITHM} checksums", path=ckpt)
    return Checksums(ckpt, record["metadata"], record["files"])


def _parse_metadata(ckpt: str, raw: bytes, sums: Optional[Checksums]) -> Metadata:
    """DCP's ``.metadata`` from its bytes, checked against its CRC first (it says where every tensor is),
    then unpickled restrictedly (:mod:`.safe_pickle`: nothing in it can run code)."""
    path = os.path.join(ckpt, METADATA_FILE)
    if sums is not None and (len(raw), zlib.crc32(raw)) != (int(sums.metadata["size"]), int(sums.metadata["crc"])):
        raise CheckpointCorruptError(f"{path!r} does not match its checksum (size {len(raw)} vs "
                                     f"{sums.metadata['size']} saved); the checkpoint is damaged", path=ckpt)
    return parse_metadata(raw, path, ckpt)


def check_file(ckpt: str, name: str, needed: int, sums: Optional[Checksums]) -> None:
    """``name`` exists and is as long as recorded (or, without checksums, holds ``needed`` bytes)."""
    path = os.path.join(ckpt, name)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise CheckpointCorruptError(f"checkpoint file {path!r} is missing or unreadable ({err}); the checkpoint "
                                     "is incomplete", path=ckpt) from err
    expected = sums.file_size(name) if sums is not None else None
    if (expected is not None and size != expected) or size < needed:
        want = f"{expected} bytes were saved" if expected is not None else f"DCP's metadata needs {needed}"
        raise CheckpointCorruptError(f"checkpoint file {path!r} has {size} bytes but {want}; it was truncated or "
                                     "overwritten", path=ckpt)


class VerifyingReader(FileSystemReader):
    """A ``FileSystemReader`` that checks files before any read and every item's bytes as it reads them.

    Without checksums (``checksums=None``) it still refuses missing and truncated files.
    """

    def __init__(self, path: str, checksums: Optional[Checksums]) -> None:
        super().__init__(path)
        self.checksums = checksums
        self.ckpt = str(path)
        self.planned_reads = 0
        self.checked_reads = 0
        self._names: dict[tuple[str, int], str] = {}
        self._metadata: Optional[Metadata] = None
        self.reading = "an item"          # the item being read, for errors raised inside DCP's read

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """``.metadata``, verified and parsed once (the load's checks and DCP's planning share it)."""
        if args or kwargs.get("rank") is not None:   # DCP's rank-local fallback: no checksum, still restricted
            rank = kwargs["rank"] if kwargs.get("rank") is not None else args[0]
            local = read_metadata_file(os.path.join(self.ckpt, f"__{rank}{METADATA_FILE}"), self.ckpt)
            return self._with_load_id(local)
        if self._metadata is None:
            try:
                with open(os.path.join(self.ckpt, METADATA_FILE), "rb") as f:
                    raw = f.read()
            except OSError as err:
                raise CheckpointCorruptError(f"{os.path.join(self.ckpt, METADATA_FILE)!r} cannot be read ({err})",
                                             path=self.ckpt) from err
            self._metadata = _parse_metadata(self.ckpt, raw, self.checksums)
        return self._with_load_id(self._metadata)

    def _with_load_id(self, metadata: Metadata) -> Metadata:
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None     # set above when the file had none
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._names = {(info.relative_path, info.offset): f"{index.fqn} (chunk at offset {list(index.offset or ())})"
                       for index, info in self.storage_data.items()}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        # runs inside DCP's planning step, before any byte is read: DCP gathers a failure here
        # from every rank, so all ranks raise and no one reads
        needed: dict[str, int] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(needed.items()):
            check_file(self.ckpt, name, end, self.checksums)
        self.planned_reads = len(plan.items)
        return super().prepare_local_plan(plan)

    def read_data(self, plan: LoadPlan, planner: Any) -> Any:
        """DCP's read (tensors via ``torch.load(weights_only=True)``), naming the item a refused pickle is in."""
        try:
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as err:
            raise refused(self.reading, err, self.ckpt) from None

    def _slice_file(self, file: IO[bytes], sinfo: Any) -> IO[bytes]:
        """DCP's hook that hands one item's bytes to ``torch.load``: verify them first."""
        file.seek(sinfo.offset)
        raw = file.read(sinfo.length)
        where = (f"checkpoint file {os.path.join(self.ckpt, sinfo.relative_path)!r}, bytes [{sinfo.offset}, "
                 f"{sinfo.offset + sinfo.length}) holding {self._names.get((sinfo.relative_path, sinfo.offset), '?')}")
        self.reading = where
        if len(raw) != sinfo.length:
            raise CheckpointCorruptError(f"{where}: only {len(raw)} bytes could be read; the file was truncated",
                                         path=self.ckpt)
        if self.checksums is not None:
            expected = self.checksums.item(sinfo.relative_path, sinfo.offset, sinfo.length)
            if zlib.crc32(raw) != expected:
                raise CheckpointCorruptError(f"{where}: CRC-32 {zlib.crc32(raw):#010x} does not match the saved "
                                             f"{expected:#010x}; the file is damaged", path=self.ckpt)
        self.checked_reads += 1
        return io.BytesIO(raw)


def verify_checkpoint(path: str) -> dict[str, int]:
    """Verify every byte of checkpoint ``path`` against its checksums (local; reads all files), and
    that every pickled part unpickles under :mod:`.safe_pickle`'s restrictions.

    Works on every checkpoint with checksums: ``save_checkpoint``'s and the torchrec ``save_dmp``'s.
    Returns ``{"files": n, "items": n, "bytes": n, "objects": n}``; raises
    :class:`.errors.CheckpointCorruptError` (:class:`.errors.UnsafeCheckpointError` for a refused
    pickle) on the first problem, or if the checkpoint has no checksums.
    """
    sums = read_checksums(path)
    if sums is None:
        raise CheckpointCorruptError(f"{path!r} has no {CHECKSUM_FILE}; it cannot be verified", path=path)
    metadata = VerifyingReader(path, sums).read_metadata()
    totals = {"files": 0, "items": 0, "bytes": 0}
    for name, spans in _spans_by_file(metadata).items():
        check_file(path, name, 0, sums)
        with open(os.path.join(path, name), "rb") as f:
            for offset, length in spans:
                if _crc_of_range(f, offset, length)[0] != sums.item(name, offset, length):
                    raise CheckpointCorruptError(f"checkpoint file {os.path.join(path, name)!r}: bytes [{offset}, "
                                                 f"{offset + length}) do not match their saved CRC-32", path=path)
                totals["items"] += 1
                totals["bytes"] += length
        totals["files"] += 1
    totals["objects"] = check_pickles(path, metadata)["objects"]
    return totals
