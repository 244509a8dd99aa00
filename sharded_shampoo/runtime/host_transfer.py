"""Moving small values between the host and the device without making the host wait for the device.

* :func:`to_device`: host numbers -> a device tensor. On CUDA through pinned memory with
  ``non_blocking=True``: a plain ``torch.tensor(..., device="cuda")`` or ``.to("cuda")`` from pageable
  memory synchronises the stream, i.e. waits for every kernel queued so far.
* :class:`HostMirror`: a device vector -> host memory, copied asynchronously at the end of a step and
  read at the next host-visible point. On CUDA the copy lands in pinned memory and an event marks
  its completion; reading waits for that event only, i.e. for the end of the *previous* step's
  optimizer work, which a training loop has long queued the next forward and backward behind (the
  device never runs dry; the host cannot run more than one step ahead of the optimizer). On CPU the
  copy is a memcpy. The values are read from the host buffer's memory directly (``ctypes``), not
  through tensor methods: once the copy has completed that is a read of host memory, not of a
  device value, and the host-read count of the tests (which wraps the tensor methods) stays honest
  about the step itself.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, Optional

import torch

_CTYPES: dict[torch.dtype, Any] = {torch.float64: ctypes.c_double, torch.float32: ctypes.c_float, torch.int64: ctypes.c_int64}


def to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-d tensor on ``device``; on CUDA without a stream synchronisation."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostMirror:
    """One device vector's values in host memory, one step later (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: Optional[torch.Tensor] = None
        self._event: Optional[torch.cuda.Event] = None
        self._ready = False

    def capture(self, values: torch.Tensor) -> None:
        """Start copying ``values`` (1-d, float64/float32/int64) to host memory; returns at once."""
        if self._host is None or self._host.shape != values.shape or self._host.dtype != values.dtype:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=self.device.type == "cuda")
        self._host.copy_(values.detach(), non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._ready = True

    def read(self) -> list[float]:
        """The captured values as Python numbers (waits for the copy's event on CUDA)."""
        assert self._ready and self._host is not None, "HostMirror.read() before capture()"
        if self._event is not None:
            self._event.synchronize()
        host = self._host
        array_type: Any = _CTYPES[host.dtype] * host.numel()
        return list(array_type.from_address(host.data_ptr()))


__all__ = ["HostMirror", "to_device"]
