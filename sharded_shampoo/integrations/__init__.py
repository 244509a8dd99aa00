"""Adapters that plug ShardedShampoo into training frameworks.

Nothing here is imported by ``import sharded_shampoo``: each framework gets its own module, imported
explicitly, which imports its library, so the core package keeps ``torch`` as its only dependency.

- :mod:`sharded_shampoo.integrations.torchtitan`: an ``OptimizersContainer`` for torchtitan
  (docs/parallelism.md); framework-free param-group helpers in ``param_groups``.
- :mod:`sharded_shampoo.integrations.torchrec`: ShardedShampoo as the dense optimizer of a
  torchrec ``DistributedModelParallel`` model, the planner's dense-memory reservation and DCP
  checkpoints of the combined model + optimizers (docs/torchrec.md).

Contract: inputs are a framework's objects (torchtitan configs and model parts, torchrec DMP
models); outputs ShardedShampoo optimizers, param groups, memory reservations and checkpoints in
that framework's terms. The outermost stage: may import anything of ``sharded_shampoo`` (and its
framework, only here); nothing in the library imports it.
"""
