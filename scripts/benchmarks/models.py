"""The models the benchmarks share: the step benchmark's stack of Linear layers and its gradients.

``bench_step``, ``bench_checkpoint`` and ``gpu_check`` measure the same model, so their numbers in
docs/benchmarks.md compare; the training examples' models live in ``scripts/train.py`` and
``scripts/train_dlrm.py`` (import them as ``scripts.train`` / ``scripts.train_dlrm``).
"""

from __future__ import annotations

import torch
from torch import nn

#: (out, in) of every Linear layer of the step benchmark's model (~20M parameters).
SHAPES = [(1024, 1024)] * 6 + [(2048, 1024)] * 2 + [(1024, 3072)] * 2 + [(512, 512)] * 8 + [(768, 1280)]


def linear_stack(shapes: list[tuple[int, int]], device: torch.device | str = "cpu") -> nn.Module:
    """``nn.Sequential`` of ``nn.Linear(in, out)`` per ``(out, in)``, seeded (the same weights every run)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o) for o, i in shapes]).to(device)


def build_model() -> nn.Module:
    """The step benchmark's model on the CPU."""
    return linear_stack(SHAPES)


def set_grads(model: nn.Module, step: int) -> None:
    """Gradients of scale 1e-2 drawn from a generator seeded by ``step`` (reproducible steps)."""
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device)
