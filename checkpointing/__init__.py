"""Distributed checkpointing of ShardedShampoo state with torch.distributed.checkpoint.

Installed as ``sharded_shampoo.checkpointing`` (see pyproject ``package-dir``), never as a
top-level ``checkpointing`` package, so it cannot collide with other projects' modules.
"""
