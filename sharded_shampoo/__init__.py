"""sharded-shampoo: Distributed Shampoo native to DTensor, FSDP2, HSDP and DCP."""

from .planning.blocking import Block, plan_blocks
from .config import (AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                     EighRootConfig, QREigenbasisConfig, RMSpropGrafting, RootInverseShampoo, SGDGrafting,
                     WarmStartRootConfig)
from .planning.layout import Layout, MeshSpec, ParamSpec, SubMesh
from .optimizer import NonFiniteGradientError, ShardedShampoo
from .runtime.agreement import RankFailureError
from .compute.preconditioner import RootFailureError
from .compute.packing import pack as pack_symmetric, unpack as unpack_symmetric

__version__ = "0.1.0"

__all__ = [
    "AdaGradGrafting", "AdamGrafting", "Block", "BlockingConfig", "CoupledNewtonConfig", "EigenvalueCorrectedShampoo",
    "EighRootConfig", "QREigenbasisConfig", "WarmStartRootConfig", "Layout", "MeshSpec", "NonFiniteGradientError", "ParamSpec", "RMSpropGrafting", "RankFailureError", "RootFailureError",
    "RootInverseShampoo", "SGDGrafting", "ShardedShampoo", "SubMesh", "pack_symmetric", "plan_blocks",
    "unpack_symmetric", "__version__",
]
