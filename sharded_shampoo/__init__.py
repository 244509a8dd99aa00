"""sharded-shampoo: Distributed Shampoo native to DTensor, FSDP2, HSDP and DCP."""

from .planning.blocking import Block, plan_blocks
from .config import (AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                     EighRootConfig, RMSpropGrafting, RootInverseShampoo, SGDGrafting)
from .planning.layout import MeshSpec, ParamSpec
from .optimizer import NonFiniteGradientError, ShardedShampoo
from .compute.preconditioner import RootFailureError

__version__ = "0.1.0"

__all__ = [
    "AdaGradGrafting", "AdamGrafting", "Block", "BlockingConfig", "CoupledNewtonConfig", "EigenvalueCorrectedShampoo",
    "EighRootConfig", "MeshSpec", "NonFiniteGradientError", "ParamSpec", "RMSpropGrafting", "RootFailureError",
    "RootInverseShampoo", "SGDGrafting", "ShardedShampoo", "plan_blocks", "__version__",
]
