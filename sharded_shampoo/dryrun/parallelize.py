"""Apply tensor parallel, expert parallel and FSDP to a model, as a training job does.

Used by the dry-run over a fake process group, and usable on real meshes, so the plan the
dry-run prints is the plan of a job that calls the same function. A model describes its own
parallelization with three optional methods:

* ``fsdp_units()`` -- submodules to ``fully_shard`` before the root (default: the children of
  every ``nn.ModuleList``, the usual home of transformer blocks);
* ``tp_plan()`` -- a ``parallelize_module`` plan ``{fqn: ParallelStyle}`` (needed when tp > 1);
* ``expert_modules()`` -- modules whose own parameters are stacked expert weights
  ``[num_experts, ...]``: sharded on dim 0 over ``ep``, then by FSDP over the expert data-parallel
  mesh -- on dim 0, or on dim 1 when ``efsdp x ep`` exceeds the number of experts, as torchtitan
  0.3.0 does (:func:`expert_shard_dim`) -- and preconditioned per expert (``BlockingConfig(batch_dims=1)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from torch import nn


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Submodules to ``fully_shard`` before the root.

    A model's own ``fsdp_units()`` wins. Otherwise every child of an ``nn.ModuleList`` (the
    usual home of transformer blocks) that is not inside another chosen unit.
    """
    own = getattr(model, "fsdp_units", None)
    if callable(own):
        return list(own())
    units: list[nn.Module] = []
    chosen: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(module, nn.ModuleList) and id(child) not in chosen:
                units.append(child)
                chosen.add(id(child))
                continue
            visit(child)

    visit(model)
    return units


def expert_modules(model: nn.Module) -> list[nn.Module]:
    own = getattr(model, "expert_modules", None)
    return list(own()) if callable(own) else []


def expert_param_names(model: nn.Module) -> set[str]:
    """Fully-qualified names of the stacked expert parameters (they get per-expert blocks)."""
    ids = {id(p) for m in expert_modules(model) for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def expert_shard_dim(num_experts: int, expert_shard_ranks: int) -> int:
    """The dim FSDP shards stacked expert weights on: torchtitan 0.3.0's rule (``distributed/fsdp.py``).

    ``expert_shard_ranks`` is ``efsdp x ep`` with expert parallelism, else the FSDP mesh size (all
    its dims). When it exceeds the number of experts, sharding the expert dim would leave ranks
    empty (after EP each rank holds ``E / ep`` experts, fewer than ``efsdp``), so torchtitan shards
    dim 1 (``Shard(1)``) instead; otherwise dim 0.
    """
    return 1 if expert_shard_ranks > num_experts else 0


def _num_experts(module: nn.Module) -> int:
    """E of a module whose own parameters are stacked expert weights ``[E, ...]`` (all must agree)."""
    counts = {int(p.shape[0]) for p in module.parameters(recurse=False)}
    if len(counts) != 1:
        raise ValueError(f"expert_modules() returned a {type(module).__name__} whose own parameters do not share one "
                         f"leading (expert) dim: {sorted(counts)}; every parameter must be [num_experts, ...].")
    return counts.pop()


def _check_dim1_divides(module: nn.Module, fqn: str, shards: int, name: str) -> None:
    """FSDP shards dims other than 0 only evenly: say so before torch raises deep inside ``fully_shard``."""
    for pname, p in module.named_parameters(recurse=False):
        if p.shape[1] % shards:
            raise ValueError(f"--model {name!r}: expert weight {fqn + '.' + pname!r} {tuple(p.shape)} is sharded on "
                             f"dim 1 over {shards} FSDP ranks (torchtitan 0.3.0 does so when efsdp x ep exceeds its "
                             f"{p.shape[0]} experts), and FSDP needs dim 1 ({p.shape[1]}) divisible by {shards}; "
                             f"choose fsdp, tp and ep so that efsdp x ep <= {p.shape[0]}, or efsdp divides "
                             f"{p.shape[1]}.")


def _shard_on(dim: int) -> Callable[[nn.Parameter], Any]:
    """A ``fully_shard`` placement function: every parameter on ``dim``."""
    from torch.distributed.tensor import Shard

    def placement(param: nn.Parameter) -> Any:
        return Shard(dim)
    return placement


def apply_tp_plan(model: nn.Module, tp_mesh: Any, plan: dict[str, Any]) -> None:
    """``parallelize_module(model, tp_mesh, plan)``, one call per parent module of the plan's keys.

    torch matches every key against the children on its path, so a whole-model plan (a few
    entries per layer) costs layers x layers matches; calling it on each key's parent is what its
    own recursion does, without the quadratic search. Plans with wildcards go in one call.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    if any(c in key for key in plan for c in "*?["):
        parallelize_module(model, tp_mesh, plan)
        return
    by_parent: dict[str, dict[str, Any]] = {}
    for key, style in plan.items():
        parent, _, leaf = key.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = style
    for parent, styles in by_parent.items():
        try:
            module = model.get_submodule(parent) if parent else model
        except AttributeError:      # no such module: let torch say so, as it does for the whole plan
            module, styles = model, {f"{parent}.{leaf}": style for leaf, style in styles.items()}
        parallelize_module(module, tp_mesh, styles)


def apply_parallelism(model: nn.Module, dp_mesh: Any, *, tp_mesh: Optional[Any] = None,
                      ep_mesh: Optional[Any] = None, expert_dp_mesh: Optional[Any] = None,
                      name: str = "model") -> nn.Module:
    """Tensor parallel over ``tp_mesh``, experts over ``ep_mesh``, then FSDP over ``dp_mesh``
    (``expert_dp_mesh`` for expert modules), innermost units first."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    if tp_mesh is not None and tp_mesh.size() > 1:
        plan = getattr(model, "tp_plan", None)
        if not callable(plan):
            raise ValueError(f"--model {name!r} defines no tp_plan() (a parallelize_module plan), so it cannot be "
                             "planned with tensor parallelism; add one or drop tp from --mesh.")
        apply_tp_plan(model, tp_mesh, plan())
    experts = expert_modules(model)
    if ep_mesh is not None and ep_mesh.size() > 1:
        if not experts:
            raise ValueError(f"--model {name!r} defines no expert_modules(), so it cannot be planned with expert "
                             "parallelism; add one or drop ep from --mesh.")
        for module in experts:
            for pname, p in list(module.named_parameters(recurse=False)):
                setattr(module, pname, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                                    requires_grad=p.requires_grad))
    ep = ep_mesh.size() if ep_mesh is not None else 1
    fqns = {m: n for n, m in model.named_modules()} if experts else {}
    for module in experts:
        edp = expert_dp_mesh if expert_dp_mesh is not None and ep > 1 else dp_mesh
        dim = expert_shard_dim(_num_experts(module), edp.size(edp.ndim - 1) * ep if ep > 1 else edp.size())
        if dim == 1:
            _check_dim1_divides(module, fqns.get(module, type(module).__name__), edp.size(edp.ndim - 1), name)
        fully_shard(module, mesh=edp, shard_placement_fn=_shard_on(dim))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


__all__ = ["apply_parallelism", "apply_tp_plan", "expert_modules", "expert_shard_dim", "expert_param_names", "fsdp_units"]
