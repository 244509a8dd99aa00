"""Low-precision storage of factor stacks: deterministic stochastic rounding and bounded fp32 chunks.

A factor is an exponential moving average ``F <- beta2 F + (1 - beta2) G G^T``. Stored in
``bfloat16`` (8 significant bits) with round-to-nearest, every increment smaller than half a unit
in the last place -- ``1 - beta2 = 1e-3`` of ``F`` is far smaller -- would be lost and the
average would freeze. Stochastic rounding keeps the stored value unbiased: it rounds up with
probability equal to the discarded fraction, so the EMA is right on average.

The random bits are a fixed uniform 16-bit pattern per matrix size (drawn once) XOR-ed with a
16-bit number per block and step, hashed from (block id, block step, factor): uniform over the
steps for every entry, one cheap integer pass instead of a random-number generator call per block
(which cost more than the bf16 GEMMs it serves). A run is reproducible, independent of the number
of ranks (a block's bits do not depend on which other blocks share its bucket) and resumes
bit-exactly from a checkpoint (the step is state).
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Optional, Union

import torch

#: Largest fp32 transient (bytes) a chunked low-precision update allocates at once (at least one block).
CHUNK_BYTES = 32 * 2 ** 20


def block_salt(block_id: str) -> int:
    """A stable 32-bit number per block id (``hash()`` of a str changes between processes)."""
    return zlib.crc32(block_id.encode())


def rounding_seed(salt: int, step: int, factor: int) -> int:
    """The random number of one block's rounding at one step for one factor (splitmix64 of the inputs)."""
    z = (salt * 1_000_003 + step * 0x9E3779B97F4A7C15 + factor * 104_729) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _signed(c: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: mask the sign copies off)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def rounding_seeds(salts: torch.Tensor, steps: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`rounding_seed` of every block, on the device (int64 ``[B]``, the same bit patterns).

    int64 multiplication wraps modulo 2^64 like the unsigned arithmetic of splitmix64, so no value is
    read on the host (a plain step must not wait for the device).
    """
    z = salts * 1_000_003 + steps * _signed(0x9E3779B97F4A7C15) + factor * 104_729
    z = (z ^ _shift_right(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def chunk_slices(n: int, bytes_per_item: int, budget: Optional[int] = None) -> list[slice]:
    """Consecutive slices of ``range(n)`` whose items take at most ``budget`` bytes (>= 1 item each;
    default :data:`CHUNK_BYTES`, read at each call)."""
    per = max(1, (CHUNK_BYTES if budget is None else budget) // max(1, bytes_per_item))
    return [slice(a, min(a + per, n)) for a in range(0, n, per)]


@lru_cache(maxsize=32)
def _dither(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A fixed uniform pattern of 16-bit numbers (int32) of ``shape``, the same on every run and rank."""
    g = torch.Generator().manual_seed(20_26_11_27 + sum(shape))
    return torch.randint(0, 1 << 16, shape, generator=g, dtype=torch.int32).to(device)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seeds: Union[list[int], torch.Tensor],
                      noise: Optional[torch.Tensor] = None) -> None:
    """``dst[j] <- round(src[j])`` to ``dst``'s dtype (``bfloat16``), stochastically, one seed per row.

    ``src`` (contiguous fp32) is used as scratch. Adding uniform random bits below bfloat16's last
    significant bit to the fp32 bit pattern and truncating rounds up with probability equal to the
    truncated fraction (for either sign: the pattern is sign-magnitude). Other dtypes round to nearest.
    ``seeds``: one per row, Python ints or an int64 tensor on the device (:func:`rounding_seeds`);
    ``noise``: optional int32 scratch of ``src``'s shape (avoids an allocation).
    """
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        dst.copy_(src)
        return
    bits = src.view(torch.int32)
    if isinstance(seeds, torch.Tensor):
        salt = (seeds & 0xFFFF).to(torch.int32)
    else:
        salt = torch.tensor([s & 0xFFFF for s in seeds], dtype=torch.int32, device=src.device)
    noise = torch.bitwise_xor(_dither(tuple(src.shape[1:]), str(src.device)),
                              salt.view((-1,) + (1,) * (src.ndim - 1)), out=noise)
    bits.add_(noise).bitwise_and_(-65536)   # clear the 16 low bits: exactly representable in bfloat16
    dst.copy_(src)


def ema_round_(F: torch.Tensor, GG: torch.Tensor, beta: Union[float, torch.Tensor], weight: float,
               seeds: Union[list[int], torch.Tensor], scratch: Optional[torch.Tensor] = None) -> None:
    """``F <- round(beta F + weight GG)`` for a low-precision stack ``F`` (math in fp32, stochastic rounding).

    ``beta``: a float or a per-block tensor broadcasting over ``F`` (1 where a block must not change:
    with ``GG = 0`` there, ``F`` is exactly representable and the rounding leaves it bit-identical).
    ``scratch``: optional flat fp32 tensor of at least ``2 * F.numel()`` elements (the fp32 value and
    the rounding noise), reused instead of allocating.
    """
    n = F.numel()
    if scratch is not None and scratch.numel() >= 2 * n and scratch.dtype == torch.float32:
        wide = scratch[:n].view(F.shape)
        noise = scratch[n:2 * n].view(torch.int32).view(F.shape)
    else:
        wide, noise = torch.empty(F.shape, dtype=torch.float32, device=F.device), None
    torch.mul(GG, weight, out=wide)
    if isinstance(beta, torch.Tensor):
        wide.addcmul_(F, beta)
    else:
        wide.add_(F, alpha=beta)
    stochastic_round_(F, wide, seeds, noise)


__all__ = ["CHUNK_BYTES", "block_salt", "chunk_slices", "ema_round_", "rounding_seed", "rounding_seeds",
           "stochastic_round_"]
