"""The dry-run's presets: names -> zero-argument model factories (models in ``dryrun/models``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .models import (GPT2, LLAMA3_8B, LLAMA3_70B, LLAMA3_405B, LLAMA_TINY, MIXTRAL_8X7B, MOE_TINY, Llama,
                     MoETransformer, ResNet50)
from .parallelize import fsdp_units

PRESETS: dict[str, Callable[[], nn.Module]] = {
    "llama3-8b": lambda: Llama(LLAMA3_8B),
    "llama3-70b": lambda: Llama(LLAMA3_70B),
    "llama3-405b": lambda: Llama(LLAMA3_405B),
    "llama-tiny": lambda: Llama(LLAMA_TINY),
    "mixtral-8x7b": lambda: MoETransformer(MIXTRAL_8X7B),
    "moe-tiny": lambda: MoETransformer(MOE_TINY),
    "gpt2-small": lambda: GPT2(),
    "resnet50": lambda: ResNet50(),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


__all__ = ["GPT2", "LLAMA3_405B", "LLAMA3_70B", "LLAMA3_8B", "LLAMA_TINY", "Llama", "PRESETS", "ResNet50",
           "fsdp_units", "preset_names"]
