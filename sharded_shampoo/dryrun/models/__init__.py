"""The dry-run's model zoo in plain torch.nn (no torchvision, no transformers): shapes follow the
published configs; each model says how a job parallelizes it (``fsdp_units``, ``tp_plan``,
``expert_modules``; see ``dryrun/parallelize.py``)."""

from .gpt2 import GPT2, GPT2Block
from .llama import LLAMA3_8B, LLAMA3_70B, LLAMA3_405B, LLAMA_TINY, Llama, LlamaConfig, transformer_tp_plan
from .moe import MIXTRAL_8X7B, MOE_TINY, MoEConfig, MoETransformer
from .resnet import ResNet50

__all__ = ["GPT2", "GPT2Block", "LLAMA3_405B", "LLAMA3_70B", "LLAMA3_8B", "LLAMA_TINY", "Llama", "LlamaConfig",
           "MIXTRAL_8X7B", "MOE_TINY", "MoEConfig", "MoETransformer", "ResNet50", "transformer_tp_plan"]
