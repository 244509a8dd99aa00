"""Stage 2, runtime: this rank's share of the plan, built once, and the step that executes it.

Inputs: the live parameters (plain tensors or DTensors), their param groups and the
``ShampooPlan``. Outputs: typed records (``RankRuntime``: a record per parameter and per owned
block, the buckets), the static routing schedule, one executed step (gather -> ``compute`` ->
scatter -> apply), the cross-rank agreement and the state-dict I/O. The only stage that talks to
other ranks. May import ``planning``, ``compute``, ``config``, ``param_groups``, ``profiling`` and
``_torch_compat``; never ``optimizer``, ``dryrun``, ``integrations`` or ``checkpointing``.
"""
