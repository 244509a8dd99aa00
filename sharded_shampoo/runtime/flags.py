"""The flags of one step's agreement: their layout, how a rank fills its own, and their typed host view.

Every rank fills one float64 vector per step and the ranks all-reduce it with MAX (one collective,
issued asynchronously: ``agreement.py``); the step policy (``policy.py``) reads the result on the
device during the step and on the host one step later. MAX makes every comparison exact for any
world size (a sum of squares of digests needed a modulus to stay exact in float64). With ``P``
trainable parameters (plan order) and ``W`` ranks, the sections are:

filled on the host (known without reading a device value):

* ``LACKS[P]`` / ``HAS[P]``: 1 where this rank has no gradient / has one. After MAX, ``LACKS == 0``:
  a gradient on every rank; ``HAS == 1``: on some rank;
* ``FAILED[W]``: 1 in this rank's slot when one of its local checks raised;
* ``DIGEST[2]``: ``d`` and ``-d`` for the digest ``d`` of the step-varying settings (every
  hyperparameter that may change between steps, lr included, and the step counters): equal on
  every rank iff ``max(d) == -max(-d)``;

filled on the device (from the gradients, never read on the host during the step):

* ``NAN[P]``: 1 where this rank's gradient has a NaN 2-norm (a NaN entry);
* ``BAD[P]``: 1 where its norm is not below the limit of the parameter's statistics (``gradients.py``):
  NaN/Inf entries, or finite entries whose squared norm overflows (the statistics would become inf);
* ``NONZERO[P]``: 1 where its gradient is non-zero (the zero-lr initialisation step has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Section names in vector order (host-filled first), and their lengths in units of (P, W, 1).
_SECTIONS = (("lacks", (1, 0, 0)), ("has", (1, 0, 0)), ("failed", (0, 1, 0)), ("digest", (0, 0, 2)),
             ("nan", (1, 0, 0)), ("bad", (1, 0, 0)), ("nonzero", (1, 0, 0)))
#: The first device-filled section.
_FIRST_DEVICE = "nan"


@dataclass(frozen=True)
class FlagLayout:
    """Where each section of the flags vector lies, for ``params`` parameters and ``world`` ranks."""

    params: int
    world: int

    def section(self, name: str) -> slice:
        start = 0
        for key, (p, w, c) in _SECTIONS:
            length = p * self.params + w * self.world + c
            if key == name:
                return slice(start, start + length)
            start += length
        raise KeyError(name)

    @property
    def host_size(self) -> int:
        """Length of the host-filled part (the vector's head)."""
        return self.section(_FIRST_DEVICE).start

    @property
    def size(self) -> int:
        return self.section(_SECTIONS[-1][0]).stop

    def host_part(self, present: Sequence[bool], failed: bool, rank: int, digest: int) -> list[float]:
        """This rank's host-filled head: ``present[k]`` (a local gradient), a failed local check, the
        settings digest (below 2**53, so exact in float64)."""
        if len(present) != self.params:
            raise ValueError(f"FlagLayout.host_part: {len(present)} presence flags for {self.params} parameters")
        failed_slots = [0.0] * self.world
        if failed:
            failed_slots[rank] = 1.0
        d = float(digest)
        return [0.0 if h else 1.0 for h in present] + [1.0 if h else 0.0 for h in present] + failed_slots + [d, -d]


@dataclass(frozen=True)
class GradientFlags:
    """What all ranks agreed about one step (per trainable parameter in plan order), read on the host."""

    on_every_rank: tuple[bool, ...]       # a gradient on every rank (the parameter can step)
    on_some_rank: tuple[bool, ...]        # a gradient on at least one rank
    nan: tuple[bool, ...]                 # a NaN entry on some rank
    unrepresentable: tuple[bool, ...]     # NaN/Inf entries or an overflowing squared norm on some rank
    nonzero: tuple[bool, ...]             # a non-zero gradient on some rank
    failed_ranks: tuple[int, ...]         # ranks whose local checks raised
    settings_agree: bool                  # the same step-varying hyperparameters and step counters everywhere

    @property
    def partial(self) -> tuple[bool, ...]:
        """A gradient on some ranks but not on others."""
        return tuple(s and not e for s, e in zip(self.on_some_rank, self.on_every_rank))

    @classmethod
    def read(cls, values: Sequence[float], layout: FlagLayout) -> "GradientFlags":
        """The typed view of an agreed flags vector held in host memory (a list of floats)."""
        def part(name: str) -> Sequence[float]:
            return values[layout.section(name)]

        digest = part("digest")
        return cls(on_every_rank=tuple(x == 0 for x in part("lacks")),
                   on_some_rank=tuple(x > 0 for x in part("has")),
                   nan=tuple(x > 0 for x in part("nan")), unrepresentable=tuple(x > 0 for x in part("bad")),
                   nonzero=tuple(x > 0 for x in part("nonzero")),
                   failed_ranks=tuple(r for r, x in enumerate(part("failed")) if x > 0),
                   settings_agree=digest[0] == -digest[1])


__all__ = ["FlagLayout", "GradientFlags"]
