"""Shared helpers for the numerical optimizer tests: deterministic parameters and gradients.

Gradients are a deterministic function of (parameter values, parameter index, step), so two
optimizers that should follow the same trajectory see the same gradients as long as their
parameters agree, and any divergence shows up and grows instead of being masked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch


class DenseStepper(Protocol):
    """A dense test reference: its parameter ``p`` and one step on a gradient."""

    p: torch.Tensor

    def step(self, grad: torch.Tensor) -> None: ...

# Several orders: 1-d (bias), 2-d, 3-d, 4-d conv weights, and one that is larger than the
# max_preconditioner_dim used in the tests (8), so it is split into several blocks.
PARAM_SHAPES: dict[str, tuple[int, ...]] = {
    "bias": (7,),
    "weight": (6, 5),
    "conv3d": (4, 3, 5),
    "conv4d": (4, 2, 3, 3),
    "big": (20, 6),
}


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0,
                shapes: dict[str, tuple[int, ...]] = PARAM_SHAPES) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
            for name, shape in shapes.items()}


def clone_params(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}


def grad_for(p: torch.Tensor, index: int, step: int) -> torch.Tensor:
    """A gradient that depends on the parameter (so trajectories couple) plus seeded noise."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    x = p.detach().to(torch.float64)
    g = torch.sin(3.0 * x + 0.7 * step) + 0.5 * noise + 0.1 * x
    return g.to(p.dtype)


def set_grads(params: Iterable[torch.Tensor], step: int, skip: Sequence[int] = ()) -> None:
    for i, p in enumerate(params):
        p.grad = None if i in skip else grad_for(p, i, step)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max|b|): absolute for small values, relative for large ones."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def assert_params_close(ours: Iterable[torch.Tensor], ref: Iterable[torch.Tensor], tol: float,
                        what: str = "") -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        d = max_rel_diff(a, b)
        assert d <= tol, f"{what} parameter {i} (shape {tuple(a.shape)}): max diff {d:.3e} > {tol:.1e}"


def step_in_lockstep(opt: torch.optim.Optimizer, p: torch.Tensor, ref: DenseStepper, steps: int,
                     tol: float) -> None:
    """Step ``opt`` (owning ``p``) and a dense reference side by side on the same deterministic gradients,
    asserting after every step that they agree, and that ``p`` moved (a run that stands still proves nothing)."""
    p0 = p.detach().clone()
    for t in range(steps):
        p.grad = grad_for(p, 0, t)
        opt.step()
        ref.step(grad_for(ref.p, 0, t))
        d = max_rel_diff(p, ref.p)
        assert d <= tol, f"step {t + 1}: max diff to the dense reference {d:.3e} > {tol:.0e}"
    assert float((p.detach() - p0).abs().max()) > 1e-3


def chunks(size: int, limit: int) -> list[tuple[int, int]]:
    return [(s, min(s + limit, size)) for s in range(0, size, limit)]


def block_boxes(merged: Sequence[int], limit: int) -> list[tuple[slice, ...]]:
    """Row-major boxes of a merged shape split into chunks of at most ``limit`` (written here, not imported)."""
    import itertools
    grid = [chunks(d, limit) for d in merged]
    return [tuple(slice(a, b) for a, b in box) for box in itertools.product(*grid)]


def kron_all(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out.contiguous(), m.contiguous())
    return out


def prod(xs: Iterable[int]) -> int:
    return math.prod(xs)
