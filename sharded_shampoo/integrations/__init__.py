"""Optional integrations with other libraries.

Nothing here is imported by ``import sharded_shampoo``: each submodule imports its library when
it is itself imported, so the core package keeps ``torch`` as its only dependency.

- :mod:`sharded_shampoo.integrations.torchrec`: ShardedShampoo as the dense optimizer of a
  torchrec ``DistributedModelParallel`` model, the planner's dense-memory reservation and DCP
  checkpoints of the combined model + optimizers (install the ``torchrec`` extra, see
  docs/torchrec.md).
"""
