"""Local gradients of one step: collected, checked, summarised for the step's agreement.

Checks raise a ValueError naming the parameter (the optimizer turns any local failure into an
error on every rank, see ``agreement.py``). The summary per parameter is: has a gradient,
contains NaN/Inf, *overflows* (finite entries whose squared 2-norm is not finite in float32, or in
float64 for float64 factors: its factor and grafting statistics would become inf on this step)
and is non-zero (the zero-lr state-initialisation step is recognised by all-zero gradients).
"""

from __future__ import annotations

import math
from typing import cast

import torch

from .._torch_compat import foreach_norm
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


def gradient_summary(grads: dict[int, torch.Tensor], num_params: int, check: bool,
                     float64_state: set[int]) -> dict[str, torch.Tensor]:
    """Per plan index, float64 0/1 vectors ``has``, ``nonfinite``, ``overflow``, ``nonzero``.

    Norms are 2-norms in one ``foreach`` pass per dtype class (fp32 for fp16/bf16, the gradient's
    own dtype otherwise; the max-abs norm is ~7x slower on CPU). A norm is non-finite through a
    NaN/Inf entry, and a finite gradient overflows the statistics when its norm exceeds the square
    root of their dtype's largest value; only such (rare) tensors are looked at entry by entry. The
    norm is compared with that limit, not just tested for inf: an fp64 gradient has an fp64 norm
    even when its statistics are fp32, and torch's norm of a 1-element tensor is ``|x|``, which does
    not overflow where ``x * x`` does. ``check=False`` (``nonfinite_grads="ignore"``) skips the
    non-finite tests. ``float64_state``: parameters whose statistics are float64.
    """
    out = {k: torch.zeros(num_params, dtype=torch.float64) for k in ("has", "nonfinite", "overflow", "nonzero")}
    if not grads:
        return out
    idx = list(grads)
    norms = torch.zeros(len(idx), dtype=torch.float64)
    wide = [k for k, i in enumerate(idx) if grads[i].dtype in _WIDE]
    narrow = [k for k, i in enumerate(idx) if grads[i].dtype not in _WIDE]
    for ks, dtype in ((wide, None), (narrow, torch.float32)):    # fp16/bf16 norms accumulate in fp32
        if ks:
            norms[ks] = torch.stack(foreach_norm([grads[idx[k]] for k in ks], 2, dtype=dtype)).double().cpu()
    out["has"][idx] = 1.0
    if check:
        limits = torch.tensor([_NORM_LIMIT[torch.float64 if i in float64_state else torch.float32] for i in idx],
                              dtype=torch.float64)
        for k in (~(norms < limits)).nonzero().flatten().tolist():    # also catches NaN norms
            g = grads[idx[k]]
            if not bool(torch.isfinite(g).all()):
                out["nonfinite"][idx[k]] = 1.0
            elif idx[k] in float64_state and \
                    float(torch.linalg.vector_norm(g, dtype=torch.float64)) < _NORM_LIMIT[torch.float64]:
                norms[k] = 1.0           # huge but representable in the float64 statistics
            else:
                out["overflow"][idx[k]] = 1.0
    out["nonzero"][idx] = (norms != 0).double()
    return out
