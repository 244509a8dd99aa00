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
from .compute.kinds.scale_functions import register_scale_by_dims_fn, register_sign_scale_fn
from .compute.kinds.sign import SignDescent
from .compute.kinds.spectral import SVD, NewtonSchulz, SpectralDescent
from .compute.kinds.eigendecomposed import EigendecomposedShampoo
from .compute.kinds.eigendecomposed_kl import EigendecomposedKLShampoo
from .shampoo_options import PseudoInverse

__version__ = "0.1.0"

__all__ = [
    "AdaGradGrafting", "AdamGrafting", "Block", "BlockingConfig", "ClassicMomentum", "CoupledNewtonConfig",
    "EigenvalueCorrectedShampoo", "EighRootConfig", "ElementwiseMode", "GeneralizedPrimalAveraging", "KLShampoo",
    "Layout", "MeshSpec", "NonFiniteGradientError", "NonFinitePolicy", "ParamSpec", "PartialGradientsError",
    "QREigenbasisConfig", "RMSpropGrafting",
    "RankFailureError", "RootFailureError", "ScheduleFree", "WarmStartRootConfig", "WeightDecayType",
    "RootInverseShampoo", "SGDGrafting", "ShardedShampoo", "StepOutcome", "SubMesh", "pack_symmetric", "plan_blocks",
    "unpack_symmetric", "__version__",
    "NewtonSchulz", "SVD", "SignDescent", "SpectralDescent", "register_scale_by_dims_fn", "register_sign_scale_fn",
    "EigendecomposedShampoo", "EigendecomposedKLShampoo", "PseudoInverse",
]
