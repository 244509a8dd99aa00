"""Local gradients of one step: collected, checked on the host, summarised on the device for the agreement.

Checks raise a ValueError naming the parameter (the optimizer turns any local failure into an
error on every rank, see ``agreement.py``). The summary per parameter is: has a gradient (host),
and on the device: has a NaN entry, is *not representable* (NaN/Inf entries, or finite entries whose
squared 2-norm is not finite in float32, or in float64 for float64 factors: its factor and grafting
statistics would become inf on this step) and is non-zero (the zero-lr state-initialisation step is
recognised by all-zero gradients). Nothing of it is read on the host during the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, cast

import torch

from .._torch_compat import foreach_norm
from .host_transfer import to_device
from .placements import local_tensor
from .records import RankRuntime

_WIDE = (torch.float32, torch.float64)


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if fp32/fp64, else an fp32 copy: fp16/bf16 arithmetic in place would round
    differently depending on how a tensor is sharded (and lose precision)."""
    return t if t.dtype in _WIDE else t.float()
#: a gradient with a larger 2-norm has a squared norm (a bound on every statistic of one step) that
#: is not representable in fp32 / fp64 statistics
_NORM_LIMIT = {torch.float32: math.sqrt(torch.finfo(torch.float32).max),
               torch.float64: math.sqrt(torch.finfo(torch.float64).max)}


def local_gradients(rt: RankRuntime) -> dict[int, torch.Tensor]:
    """Local gradient of every trainable parameter that has one, by plan index."""
    grads: dict[int, torch.Tensor] = {}
    for rec in rt.params:
        g = rec.param.grad
        if g is None:
            continue
        if not rec.trainable:
            raise ValueError(f"parameter {rec.name!r} was frozen (requires_grad=False) when the optimizer was built, "
                             "so it has no blocks or state, but now has a gradient. Build the optimizer after "
                             "unfreezing, or set its .grad to None.")
        if g.is_sparse:
            raise ValueError(f"ShardedShampoo does not support sparse gradients (parameter {rec.name!r}); use a "
                             "dense embedding or a sparse optimizer for it.")
        lg = local_tensor(g)
        expected = tuple(rec.local().shape)
        if tuple(lg.shape) != expected:
            raise ValueError(f"the gradient of parameter {rec.name!r} has shape {tuple(lg.shape)} on this rank but "
                             f"the parameter's shard has shape {expected}; a gradient must have its parameter's "
                             "shape (and placements).")
        grads[cast(int, rec.plan_index)] = lg          # trainable (checked above): an int
    return grads


@dataclass(frozen=True)
class GradientSummary:
    """This rank's gradients summarised for the step's agreement (typed: what ``flags.py`` lays out).

    ``present`` is host knowledge (which trainable parameters have a local gradient, in plan order);
    ``rows`` is the device-filled part, float64 ``[3 * P]`` (the ``NAN``, ``BAD`` and ``NONZERO``
    sections of :class:`~.flags.FlagLayout`), computed on the device and never read on the host.
    """

    present: tuple[bool, ...]
    rows: torch.Tensor


@dataclass(frozen=True)
class _Pattern:
    """Device constants of one set of present gradients (cached: the set rarely changes between steps)."""

    order: Optional[torch.Tensor]        # permutation from the norm groups' order to plan order (None: identity)
    limits: torch.Tensor                 # per present gradient, the norm its statistics can square
    index: Optional[torch.Tensor]        # plan index of each present gradient (None: all P present, in order)


class GradientSummarizer:
    """Computes :class:`GradientSummary` on the device: one ``foreach`` 2-norm pass per dtype class.

    Norms: a gradient's own dtype for fp32/fp64, fp32 for fp16/bf16 (their norms accumulate in fp32),
    fp64 for parameters whose statistics are fp64 (a finite fp32 gradient can have a norm that
    overflows fp32 yet squares fine in fp64). Per present gradient ``k``:

    * ``NAN``: ``isnan(norm)`` (a NaN entry);
    * ``BAD``: ``not norm < limit`` where ``limit`` is the square root of the largest value of its
      statistics' dtype: NaN/Inf entries give a NaN/inf norm, and a finite gradient with a larger norm
      has a squared norm (a bound on every statistic of one step) that is not representable. The norm
      is compared with the limit, not just tested for inf: an fp64 gradient has an fp64 norm even when
      its statistics are fp32, and torch's norm of a 1-element tensor is ``|x|``, which does not
      overflow where ``x * x`` does;
    * ``NONZERO``: ``norm != 0``.

    ``check=False`` (``nonfinite_grads="ignore"``) leaves ``NAN`` and ``BAD`` at 0. Nothing is read
    on the host; a NaN/Inf entry cannot be told from an overflowing finite gradient without a second
    pass over the gradients, so the flags keep the two apart only for NaN (see ``policy.py``'s message).
    """

    def __init__(self, num_params: int, check: bool, float64_state: set[int], device: torch.device) -> None:
        self.num_params = num_params
        self.check = check
        self.float64_state = frozenset(float64_state)
        self.device = device
        self._patterns: dict[tuple[tuple[int, torch.dtype], ...], _Pattern] = {}
        self.empty = torch.zeros(3 * num_params, dtype=torch.float64, device=device)

    def _norm_dtype(self, k: int, g: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype of ``k``'s norm (None: the gradient's own)."""
        if k in self.float64_state and g.dtype != torch.float64:
            return torch.float64
        return None if g.dtype in _WIDE else torch.float32

    def __call__(self, grads: dict[int, torch.Tensor]) -> GradientSummary:
        present = tuple(k in grads for k in range(self.num_params))
        if not grads:
            return GradientSummary(present, self.empty)
        idx = sorted(grads)
        classes: dict[tuple[torch.dtype, Optional[torch.dtype]], list[int]] = {}
        for k in idx:          # one foreach call per (gradient dtype, norm dtype): homogeneous lists
            classes.setdefault((grads[k].dtype, self._norm_dtype(k, grads[k])), []).append(k)
        pattern = self._pattern(tuple((k, grads[k].dtype) for k in idx), classes)
        parts = [torch.stack(foreach_norm([grads[k] for k in ks], 2, dtype=dtype)).to(torch.float64)
                 for (_, dtype), ks in classes.items()]
        norms = parts[0] if len(parts) == 1 else torch.cat(parts)
        if pattern.order is not None:
            norms = norms.index_select(0, pattern.order)
        nonzero = norms != 0
        if self.check:
            rows = torch.stack([torch.isnan(norms), ~(norms < pattern.limits), nonzero]).to(torch.float64)
        else:
            rows = torch.stack([torch.zeros_like(nonzero), torch.zeros_like(nonzero), nonzero]).to(torch.float64)
        if pattern.index is not None:
            rows = torch.zeros(3, self.num_params, dtype=torch.float64, device=self.device).index_copy_(
                1, pattern.index, rows)
        return GradientSummary(present, rows.flatten())

    def _pattern(self, key: tuple[tuple[int, torch.dtype], ...],
                 classes: dict[tuple[torch.dtype, Optional[torch.dtype]], list[int]]) -> _Pattern:
        pattern = self._patterns.get(key)
        if pattern is None:
            idx = [k for k, _ in key]
            grouped = [k for ks in classes.values() for k in ks]
            order = None if grouped == idx else to_device([grouped.index(k) for k in idx], torch.int64, self.device)
            limits = to_device([_NORM_LIMIT[torch.float64 if k in self.float64_state else torch.float32] for k in idx],
                               torch.float64, self.device)
            index = None if idx == list(range(self.num_params)) else to_device(idx, torch.int64, self.device)
            pattern = self._patterns[key] = _Pattern(order, limits, index)
        return pattern
