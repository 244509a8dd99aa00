"""What the dry-run learns from parallelizing a model over a fake process group (one record per stage).

Its own module because two model sources fill it: our parallelization of a preset or factory
(``build.py``) and torchtitan's own ``parallelize_fn`` / ``pipelining_fn`` (``titan_source.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..planning.layout import MeshSpec, ParamSpec


@dataclass
class ShardedModel:
    """What the dry-run learned from the fake-process-group run: specs, the plan mesh, expert params.

    With pipeline parallelism there is one per stage: ``mesh`` is then a stage's ``dp x fsdp x tp``
    mesh and ``modules`` the stage's module names.
    """

    specs: list[ParamSpec]
    mesh: MeshSpec
    experts: set[str]
    modules: list[str] = field(default_factory=list)


__all__ = ["ShardedModel"]
