"""Adapters that plug ShardedShampoo into training frameworks.

Each framework gets its own module, imported explicitly (``sharded_shampoo.integrations.torchtitan``)
so that importing ``sharded_shampoo`` never imports a framework. Framework-free helpers shared by
the adapters live in ``param_groups``.
"""
