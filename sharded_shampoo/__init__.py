"""sharded-shampoo: Distributed Shampoo native to DTensor, FSDP2, HSDP and DCP."""

from .planning.blocking import Block, plan_blocks
from .averaging_config import ClassicMomentum, GeneralizedPrimalAveraging, ScheduleFree, WeightDecayType
from .config import (AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig, EigenvalueCorrectedShampoo,
                     EighRootConfig, ElementwiseMode, NonFinitePolicy, QREigenbasisConfig, RMSpropGrafting,
                     RootInverseShampoo, SGDGrafting, WarmStartRootConfig)
from .planning.layout import Layout, MeshSpec, ParamSpec, SubMesh
from .optimizer import NonFiniteGradientError, ShardedShampoo
from .runtime.agreement import RankFailureError
from .runtime.policy import PartialGradientsError, StepOutcome
from .compute.preconditioner import RootFailureError
from .compute.kinds.kl_shampoo import KLShampoo
from .compute.packing import pack as pack_symmetric, unpack as unpack_symmetric

__version__ = "0.1.0"

__all__ = [
    "AdaGradGrafting", "AdamGrafting", "Block", "BlockingConfig", "ClassicMomentum", "CoupledNewtonConfig",
    "EigenvalueCorrectedShampoo", "EighRootConfig", "ElementwiseMode", "GeneralizedPrimalAveraging", "KLShampoo",
    "Layout", "MeshSpec", "NonFiniteGradientError", "NonFinitePolicy", "ParamSpec", "PartialGradientsError",
    "QREigenbasisConfig", "RMSpropGrafting",
    "RankFailureError", "RootFailureError", "ScheduleFree", "WarmStartRootConfig", "WeightDecayType",
    "RootInverseShampoo", "SGDGrafting", "ShardedShampoo", "StepOutcome", "SubMesh", "pack_symmetric", "plan_blocks",
    "unpack_symmetric", "__version__",
]
