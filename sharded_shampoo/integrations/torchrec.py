"""torchrec integration: ShardedShampoo as the dense optimizer of a ``DistributedModelParallel`` model.

Install the ``torchrec`` extra (docs/torchrec.md). Three pieces, one module each:

- :mod:`.torchrec_optim`: :class:`ShampooDenseOptimizer` (a torchrec ``KeyedOptimizerWrapper``
  whose preconditioner work is split across the DMP ranks), :func:`dense_parameters`,
  :func:`combined_optimizer`;
- :mod:`.torchrec_memory`: :func:`storage_reservation` / :func:`dense_tensor_estimate`, the
  per-rank dense memory for torchrec's planner from the optimizer's own plan;
- :mod:`.torchrec_checkpoint`: :class:`DMPTrainState`, :func:`save_dmp`, :func:`load_dmp` (DCP,
  resumable on another number of ranks).
"""

from .torchrec_checkpoint import DMPTrainState, find_shampoo, load_dmp, save_dmp
from .torchrec_memory import dense_bytes_per_rank, dense_named_parameters, dense_tensor_estimate, storage_reservation
from .torchrec_optim import STEP_KEY, ShampooDenseOptimizer, combined_optimizer, dense_parameters

__all__ = [
    "DMPTrainState", "STEP_KEY", "ShampooDenseOptimizer", "combined_optimizer", "dense_bytes_per_rank",
    "dense_named_parameters", "dense_parameters", "dense_tensor_estimate", "find_shampoo", "load_dmp", "save_dmp",
    "storage_reservation",
]
