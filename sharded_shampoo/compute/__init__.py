"""Stage 3, compute: the preconditioner math of the blocks a rank owns, batched per bucket.

Inputs: stacks of full block gradients ``[B, *block_shape]`` (blocks of equal shape and
exponents), the bucket's hyperparameters and its stacked state (the fields its preconditioner kind
declares, :mod:`.kinds`). Outputs: the search directions ``[B, *block_shape]`` and the updated state
(factors, roots or eigenbases, grafting and filtered-gradient state, counters). Local: no process
group, no routing. May import ``sharded_shampoo.config``, ``planning.blocking`` (the block
description) and ``profiling`` (the named ranges of the bucket's phases); never ``runtime``, ``optimizer``, ``dryrun``, ``integrations``, ``checkpointing`` or the
rest of ``planning`` (which reads ``compute.kinds`` for the state and costs it plans).
"""
