"""What a Python block of the docs may assume exists (``<!-- doc-test: context=NAME -->``).

A user reading a snippet brings their own model, optimizer and data; the doc test brings these
small stand-ins, so the snippet itself runs unchanged. Each context returns the names it defines
and a function that undoes what it set up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Context = tuple[dict[str, Any], Callable[[], None]]


class Experts(nn.Module):
    """Stacked expert weights ``[num_experts, d, d]`` (what a MoE layer holds)."""

    def __init__(self, num_experts: int, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_experts, d, d) / d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.mean(0)


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(d, d)
        self.experts = Experts(2, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.experts(torch.tanh(self.mlp(x)))


class TinyModel(nn.Module):
    """``model.layers`` like a transformer's, one MoE layer each (parameter names contain ``.experts.``)."""

    def __init__(self, d: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def model() -> Context:
    """``model``, ``optimizer`` (a ShardedShampoo), ``loader`` (3 batches) and ``loss(output)``."""
    from sharded_shampoo import ShardedShampoo

    torch.manual_seed(0)
    net = TinyModel()
    names = {"model": net, "optimizer": ShardedShampoo(net.named_parameters(), lr=1e-3),
             "loader": [torch.randn(4, 16) for _ in range(3)], "loss": lambda out: out.pow(2).mean()}
    return names, lambda: None


def fsdp() -> Context:
    """``model``, ``loader`` and ``loss`` as :func:`model`, inside a one-rank gloo process group (for fully_shard)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    names, _ = model()
    del names["optimizer"]
    return names, dist.destroy_process_group


def torchtitan() -> Context:
    """``config``: torchtitan's Llama3 debug ``Trainer.Config`` (and ``llama3_debugmodel`` itself).

    Building a config needs only the stand-in for torchtitan's Triton kernels (not in CPU builds of
    torch), not the harness's process-wide workarounds: other tests may have imported torchtitan.
    """
    from tests.support.titan_harness import install_triton_stub

    install_triton_stub()
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return {"config": llama3_debugmodel(), "llama3_debugmodel": llama3_debugmodel}, lambda: None


CONTEXTS: dict[str, Callable[[], Context]] = {"model": model, "fsdp": fsdp, "torchtitan": torchtitan}
