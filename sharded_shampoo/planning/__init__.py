"""Stage 1, planning: what every rank will own and what it costs, decided before any tensor exists.

Inputs: ``ParamSpec``s (name, global shape, dtype, placements as regions), a ``MeshSpec`` and the
``PlanSettings`` of each param group. Outputs: a ``ShampooPlan`` (blocks, owner per block, per-rank
bytes/FLOPs/communication report), the same on every rank and in the dry-run. Pure: no process
group, no live tensors, deterministic. May import ``sharded_shampoo.config``, ``_torch_compat``,
torch's tensor/placement types and ``compute.kinds`` (the preconditioner kinds' own description of
a block's state fields and costs, so the planner prices exactly what a bucket allocates); never
``runtime``, the rest of ``compute``, ``optimizer`` or ``dryrun``.
"""
