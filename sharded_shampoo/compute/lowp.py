"""Low-precision storage of factor stacks: deterministic stochastic rounding and bounded fp32 chunks.

A factor is an exponential moving average ``F <- beta2 F + (1 - beta2) G G^T``. Stored in
``bfloat16`` (8 significant bits) with round-to-nearest, every increment smaller than half a unit
in the last place -- ``1 - beta2 = 1e-3`` of ``F`` is far smaller -- would be lost and the
average would freeze. Stochastic rounding keeps the stored value unbiased: it rounds up with
probability equal to the discarded fraction, so the EMA is right on average.

The random bits come from one generator per block seeded by (block id, block step, factor), so a
run is reproducible, independent of the number of ranks (a block's bits do not depend on which
other blocks share its bucket) and resumes bit-exactly from a checkpoint (the step is state).
"""

from __future__ import annotations

import zlib

import torch

#: Largest fp32 transient (bytes) a chunked low-precision update allocates at once (at least one block).
CHUNK_BYTES = 32 * 2 ** 20


def block_salt(block_id: str) -> int:
    """A stable 32-bit number per block id (``hash()`` of a str changes between processes)."""
    return zlib.crc32(block_id.encode())


def rounding_seed(salt: int, step: int, factor: int) -> int:
    """The generator seed of one block's rounding at one step for one factor."""
    return (salt * 1_000_003 + step * 7_919 + factor * 104_729) % (2 ** 63 - 1)


def chunk_slices(n: int, bytes_per_item: int, budget: int = CHUNK_BYTES) -> list[slice]:
    """Consecutive slices of ``range(n)`` whose items take at most ``budget`` bytes (>= 1 item each)."""
    per = max(1, budget // max(1, bytes_per_item))
    return [slice(a, min(a + per, n)) for a in range(0, n, per)]


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seeds: list[int]) -> None:
    """``dst[j] <- round(src[j])`` to ``dst``'s dtype (``bfloat16``), stochastically, one seed per row.

    ``src`` (contiguous fp32) is used as scratch. Adding uniform random bits below bfloat16's last
    significant bit to the fp32 bit pattern and truncating rounds up with probability equal to the
    truncated fraction (for either sign: the pattern is sign-magnitude). Other dtypes round to nearest.
    """
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        dst.copy_(src)
        return
    bits = src.view(torch.int32)
    noise = torch.empty_like(bits)
    for j, seed in enumerate(seeds):
        g = torch.Generator(device=src.device)
        g.manual_seed(seed)
        noise[j].random_(0, 1 << 16, generator=g)
    bits.add_(noise).bitwise_and_(-65536)   # clear the 16 low bits: exactly representable in bfloat16
    dst.copy_(src)


__all__ = ["CHUNK_BYTES", "block_salt", "chunk_slices", "rounding_seed", "stochastic_round_"]
