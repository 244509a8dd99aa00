"""Llama 3 in plain torch.nn (Meta, "The Llama 3 Herd of Models", 2024; the params.json of each release).

8B: dim 4096, 32 layers, 32 heads, 8 kv heads, ffn 14336, vocab 128256; 70B: dim 8192, 80 layers,
64 heads, 8 kv heads, ffn 28672; 405B: dim 16384, 126 layers, 128 heads, 8 kv heads, ffn 53248.
Untied input embedding and output projection, RMSNorm weights, no biases. ``tp_plan()`` gives the
parameter placements of torchtitan's tensor-parallel plan (the dry-run reads placements only; the
forward is written for unsharded activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..stages import llm_stage_modules

# ----------------------------------------------------------------------------- Llama 3


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on (batch, heads, seq, head_dim), rotating interleaved halves."""
    seq, hd = x.shape[-2], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), freqs)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.cfg
        q = self.wq(x).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = _rope(q, c.rope_theta), _rope(k, c.rope_theta)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class LlamaFeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention = LlamaAttention(cfg)
        self.feed_forward = LlamaFeedForward(cfg)
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama 3 decoder (untied embeddings, RMSNorm, GQA, SwiGLU)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.layers)

    def tp_plan(self) -> dict[str, Any]:
        return transformer_tp_plan(len(self.layers), ffn=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))

    def pipeline_stages(self, num_stages: int) -> list[list[str]]:
        """Module names per pipeline stage, as torchtitan splits a decoder (``dryrun/stages.py``)."""
        return llm_stage_modules(num_stages, len(self.layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def transformer_tp_plan(n_layers: int, ffn: tuple[str, ...] = ()) -> dict[str, Any]:
    """torchtitan's Llama tensor-parallel plan: embeddings rowwise (dim 0), q/k/v and w1/w3 colwise,
    wo and w2 rowwise, norms sequence-parallel, the output head colwise. ``ffn``: (w1, w2, w3) names."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan: dict[str, Any] = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
                            "norm": SequenceParallel(),
                            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(n_layers):
        p = f"layers.{i}."
        plan.update({p + "attention_norm": SequenceParallel(), p + "attention.wq": ColwiseParallel(),
                     p + "attention.wk": ColwiseParallel(), p + "attention.wv": ColwiseParallel(),
                     p + "attention.wo": RowwiseParallel(output_layouts=Shard(1)), p + "ffn_norm": SequenceParallel()})
        if ffn:
            plan.update({p + ffn[0]: ColwiseParallel(), p + ffn[1]: RowwiseParallel(output_layouts=Shard(1)),
                         p + ffn[2]: ColwiseParallel()})
    return plan


LLAMA3_8B = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)
LLAMA3_70B = LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
LLAMA3_405B = LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248)
#: A few-million-parameter Llama for tests and quick demos.
LLAMA_TINY = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=1000)
