"""Reading the pickled parts of a checkpoint without running code from it.

A DCP checkpoint holds two kinds of pickles: ``.metadata`` (plain ``pickle``: where every item is)
and one ``torch.save`` blob per stored item (tensors, and small objects such as ``extra`` values,
param-group values and the plan description). Stock DCP unpickles ``.metadata`` with
``pickle.load`` and small objects with ``torch.load(weights_only=False)``, and an unrestricted
unpickle calls whatever the pickle names -- ``os.system`` included -- before anyone can look at
the result. Anyone who can write a checkpoint (and rewrite ``checksums.json`` to match) could run
code in the job that loads it.

So everything this package reads goes through one of two gates:

- :func:`parse_metadata`: an unpickler that resolves only the classes DCP metadata is made of
  (:data:`METADATA_GLOBALS`, torch dtypes) and refuses every other global before it is called;
  then checks that the result is DCP metadata whose items live in plain files of the checkpoint
  directory (no ``/``, no ``..``: a crafted ``relative_path`` cannot make the reader open other files);
- :func:`load_object`: ``torch.load(weights_only=True)`` (torch's restricted unpickler: containers,
  numbers, strings, bytes, tensors, dtypes), for every small object and every tensor.

A refusal raises :class:`.errors.UnsafeCheckpointError` naming the file and the global it refused.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any, Optional

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from .errors import CheckpointCorruptError, UnsafeCheckpointError

#: (module, name) of every global a DCP ``.metadata`` pickle may name (torch 2.13; see docs/checkpointing.md)
METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),      # maps a layout's name to torch.strided etc.
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),         # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
})


class _Refused(pickle.UnpicklingError):
    """A global (or persistent id) that DCP metadata is never made of; ``what`` names it."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`METADATA_GLOBALS` and ``torch.<dtype>``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"the global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def _check_paths(metadata: Metadata, path: str, ckpt: str) -> None:
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or os.sep in name or name in (".", "..") \
                or "\0" in name:
            raise UnsafeCheckpointError(f"{path!r} places a stored item in {name!r}, which is not a file of the "
                                        "checkpoint directory; refusing a crafted or foreign checkpoint", path=ckpt)


def parse_metadata(raw: bytes, path: str, ckpt: str) -> Metadata:
    """DCP ``Metadata`` from the bytes of ``path`` (a checkpoint's ``.metadata``), unpickled restrictedly."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as err:
        raise UnsafeCheckpointError(f"{path!r} is not DCP metadata: its pickle names {err.what}, which DCP "
                                    "metadata is never made of; refusing to unpickle it (a crafted or foreign "
                                    "file; nothing from it was run)", path=ckpt) from None
    except pickle.UnpicklingError as err:
        raise CheckpointCorruptError(f"{path!r} cannot be read (UnpicklingError: {err}); the checkpoint is "
                                     "damaged or incomplete", path=ckpt) from err
    except Exception as err:
        raise CheckpointCorruptError(f"{path!r} cannot be read ({type(err).__name__}: {err}); the checkpoint is "
                                     "damaged or incomplete", path=ckpt) from err
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict) \
            or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointCorruptError(f"{path!r} holds a {type(metadata).__name__}, not DCP metadata", path=ckpt)
    _check_paths(metadata, path, ckpt)
    return metadata


def read_metadata_file(path: str, ckpt: str) -> Metadata:
    """:func:`parse_metadata` of the file ``path`` (no checksum: for a rank-local or just-written file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise CheckpointCorruptError(f"{path!r} cannot be read ({err})", path=ckpt) from err
    return parse_metadata(raw, path, ckpt)


def refusal(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused (torch wraps it in advice)."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return f"it names the global {found.group(1)}, which is not admitted"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith(("Unsupported", "Can only", "Trying", "Only"))), lines[-1]
                if lines else "refused by the weights-only unpickler")


def refused(where: str, err: pickle.UnpicklingError, ckpt: str) -> UnsafeCheckpointError:
    """The error for an item torch's weights-only unpickler refused."""
    return UnsafeCheckpointError(f"{where}: refusing to unpickle it: {refusal(err)} (torch.load with "
                                 "weights_only=True admits containers, numbers, strings, bytes and tensors; nothing "
                                 "from it was run)", path=ckpt)


def load_object(raw: bytes, where: str, ckpt: str) -> Any:
    """One stored item (``torch.save`` bytes) through ``torch.load(weights_only=True)``.

    ``where`` names the item in errors (file, byte range, key).
    """
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused(where, err, ckpt) from None
    except Exception as err:
        raise CheckpointCorruptError(f"{where} cannot be read ({type(err).__name__}: {err})", path=ckpt) from err


def check_pickles(path: str, metadata: Optional[Metadata] = None) -> dict[str, int]:
    """Unpickle every pickled part of checkpoint ``path`` under the restrictions, offline; load nothing.

    ``.metadata`` (unless given, already parsed) and every stored small object (``extra`` values,
    param-group values, ...). Tensors are not read: every loader, DCP's included, reads them with
    ``weights_only=True``. Works without checksums, so it is the check to run before handing a
    checkpoint of unknown origin to a loader that unpickles without restriction (stock ``dcp.load``,
    torchtitan's ``CheckpointManager``). Returns ``{"metadata": 1, "objects": n}``; raises
    :class:`.errors.UnsafeCheckpointError` (or :class:`.errors.CheckpointCorruptError`) naming the item.
    """
    if metadata is None:
        metadata = read_metadata_file(os.path.join(path, ".metadata"), path)
    objects = 0
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"checkpoint file {os.path.join(path, info.relative_path)!r}, bytes [{info.offset}, " \
                f"{info.offset + info.length}) holding {index.fqn}"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointCorruptError(f"{where} is stored with transforms {list(info.transform_descriptors)}, "
                                         "which this check does not decode", path=path)
        try:
            with open(os.path.join(path, info.relative_path), "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
        except OSError as err:
            raise CheckpointCorruptError(f"{where} cannot be read ({err})", path=path) from err
        load_object(raw, where, path)
        objects += 1
    return {"metadata": 1, "objects": objects}
