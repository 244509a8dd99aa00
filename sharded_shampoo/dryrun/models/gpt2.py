"""GPT-2 (Radford et al. 2019) in plain torch.nn: pre-LN, learned positions, output tied to the token
embedding, GPT-2's initialisation. Small: 12 layers, 12 heads, width 768, context 1024, vocab 50257."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- GPT-2


class GPT2Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 (pre-LN, learned positions, output tied to the token embedding)."""

    def __init__(self, n_layers: int = 12, width: int = 768, heads: int = 12, context: int = 1024,
                 vocab_size: int = 50257) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(GPT2Block(width, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights and embeddings, zero biases, residual projections
        scaled by 1/sqrt(2 n_layers). (torch's default N(0, 1) embedding, tied to the output head, starts
        a byte-level model at ~65 nats instead of ln(256) = 5.5.)"""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.h:
            for proj in (block.attn_proj, block.mlp_proj):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
