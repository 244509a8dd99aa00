"""A Mixture-of-Experts transformer (Mixtral-style) in plain torch.nn, experts stacked per layer.

Mixtral-8x7B (Jiang et al. 2024): dim 4096, 32 layers, 32 heads, 8 kv heads, 8 experts of ffn 14336,
top-2 routing, vocab 32000, untied output: 46.7B parameters. Each layer's experts are three stacked
weights ``w1, w3: [E, dim, ffn]``, ``w2: [E, ffn, dim]`` (as torchtitan's ``GroupedExperts``), so expert
parallelism shards dim 0 and the optimizer preconditions each expert's matrix on its own.
``expert_modules()`` lists them; ``tp_plan()`` parallelizes attention, norms, embeddings and the
head (the experts and the router are not tensor-parallel: they are expert-parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..stages import llm_stage_modules
from .llama import LlamaAttention, LlamaConfig, transformer_tp_plan


@dataclass(frozen=True)
class MoEConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6

    def attention(self) -> LlamaConfig:
        return LlamaConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           ffn_dim=self.ffn_dim, vocab_size=self.vocab_size, norm_eps=self.norm_eps,
                           rope_theta=self.rope_theta)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU feed-forwards with stacked weights."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, ffn_dim) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, ffn_dim, dim) * ffn_dim ** -0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, dim, ffn_dim) * dim ** -0.5)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return (F.silu(x @ self.w1[expert]) * (x @ self.w3[expert])) @ self.w2[expert]


class MoEFeedForward(nn.Module):
    """Top-k routing over the experts (a loop over experts: clear, not fast)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(F.softmax(self.router(flat), dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.experts.w1.shape[0]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, self.experts(flat[rows], e) * weights[rows, slot, None])
        return out.view_as(x)


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attention = LlamaAttention(cfg.attention())
        self.moe = MoEFeedForward(cfg)
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.moe(self.ffn_norm(x))


class MoETransformer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.layers)

    def expert_modules(self) -> list[nn.Module]:
        return [cast(Any, layer).moe.experts for layer in self.layers]

    def tp_plan(self) -> dict[str, Any]:
        return transformer_tp_plan(len(self.layers))

    def pipeline_stages(self, num_stages: int) -> list[list[str]]:
        """Module names per pipeline stage, as torchtitan splits a decoder (``dryrun/stages.py``)."""
        return llm_stage_modules(num_stages, len(self.layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


MIXTRAL_8X7B = MoEConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, num_experts=8, top_k=2,
                         vocab_size=32000)
#: A few-hundred-thousand-parameter MoE for tests and quick demos.
MOE_TINY = MoEConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, num_experts=4, top_k=2,
                     vocab_size=256)
