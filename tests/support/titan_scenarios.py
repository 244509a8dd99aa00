"""What each gloo rank runs in the torchtitan tests (imported by forked ranks; no torchtitan at import).

Every scenario builds torchtitan's own models with torchtitan's own parallelize functions
(titan_harness.build), trains on a fixed batch, and returns plain numbers and tables for the
test to assert on.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.support import titan_harness as th

#: ShardedShampoo settings for the tests: small blocks (cheap roots on CPU), preconditioning from
#: step 1 with a root every step, so 2-4 steps exercise factors, roots and grafting state.
SHAMPOO_KW: dict[str, Any] = dict(lr=2e-3, betas=(0.9, 0.95), epsilon=1e-4, weight_decay=0.0,
                                  max_preconditioner_dim=256, precondition_frequency=1,
                                  start_preconditioning_step=1)


def shampoo_container(built: th.Built, adamw_embeddings: bool = False) -> Any:
    """torchtitan's optimizer build path with ShardedShampoo: ``Config.build(model_parts=...)``.

    ``adamw_embeddings``: the token embeddings go to torchtitan's AdamW (a group whose pattern
    matches on the first pipeline stage only), everything else to ShardedShampoo.
    """
    from torchtitan.components.optimizer import ParamGroupConfig

    from sharded_shampoo import AdamGrafting
    from sharded_shampoo.integrations.torchtitan import default_sharded_shampoo

    config = default_sharded_shampoo(**SHAMPOO_KW, grafting=AdamGrafting(beta2=0.95, epsilon=1e-8))
    if adamw_embeddings:
        config.param_groups.insert(0, ParamGroupConfig(pattern=r"tok_embeddings", optimizer_name="AdamW",
                                                       optimizer_kwargs={"lr": 1e-3, "eps": 1e-8}))
    optimizers = config.build(model_parts=built.parts)
    if built.spec.post_optimizer_build_fn is not None:  # qwen3: MoE load-balancing hook, as the Trainer does
        built.spec.post_optimizer_build_fn(optimizers, built.parts, built.parallel_dims)
    return optimizers


def adamw_container(built: th.Built) -> Any:
    from torchtitan.components.optimizer import default_adamw

    optimizers = default_adamw(lr=1e-3).build(model_parts=[built.model])
    if built.spec.post_optimizer_build_fn is not None:
        built.spec.post_optimizer_build_fn(optimizers, [built.model], built.parallel_dims)
    return optimizers


def mesh_report(built: th.Built) -> dict[str, Any]:
    """Per parameter kind: placements table row, the global ranks of its mesh, this rank's region."""
    kinds = th.kinds_table(th.placements_table(built.model))
    ranks = {}
    for name, p in built.model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        ranks[th.param_kind(name)] = mesh.mesh.tolist() if mesh is not None else None
    return {"kinds": kinds, "mesh_ranks": ranks, "regions": th.held_regions(built.model)}


def adamw_layouts(rank: int, world: int) -> dict[str, Any]:
    """torchtitan's AdamW on FSDP x TP 2x2 Llama3 and EP 2 MoE: placements, meshes, losses."""
    out = {}
    for label, spec, layout in (("llama3 fsdp2 x tp2", th.llama3_spec(), th.Layout(tp=2)),
                                ("moe fsdp4 / efsdp2 x ep2", th.moe_spec(), th.Layout(ep=2))):
        built = th.build(spec, layout)
        report = mesh_report(built)
        report["losses"] = th.train(built, adamw_container(built), 3)
        out[label] = report
    return out


def state_fingerprint(optimizers: Any) -> dict[str, tuple[float, float]]:
    """(sum, sum of squares) in float64 of every optimizer-state tensor this rank holds, by flat key.

    Block states are plain tensors held by their owner only; DTensor states (momentum) are
    gathered (the same keys on every rank of their mesh, taken in sorted order so the collectives
    match) and recorded by the first rank of their mesh (of their pipeline stage, with pp).
    """
    flat = optimizers.state_dict()
    out: dict[str, tuple[float, float]] = {}
    for key in sorted(k for k in flat if k.startswith("state.")):
        t = flat[key]
        if hasattr(t, "full_tensor"):
            first_holder = int(t.device_mesh.mesh.flatten()[0])  # rank 0 of the tensor's (stage's) mesh
            t = t.full_tensor()
            if torch.distributed.get_rank() != first_holder:
                continue
        t = t.detach().double()
        out[key] = (float(t.sum()), float((t * t).sum()))
    for key in (k for k in flat if k.startswith("param_groups.") and k.endswith(".step")):
        out[key] = (float(flat[key]), 0.0)
    return out


def train_save_resume(rank: int, world: int, folder: str, first: tuple, second: tuple,
                      build_optimizers: str = "shampoo", steps: int = 2,
                      load_optimizer: bool = True) -> dict[str, Any]:
    """Train ``steps`` on layout ``first``, save through torchtitan's CheckpointManager, train ``steps``
    more (the reference); rebuild on layout ``second``, load, train ``steps`` (the resumed run).

    ``first``/``second`` are (model name, Layout). Returns losses, per-rank state fingerprints at
    the save and right after the load, and both layouts' placements. ``load_optimizer=False``
    resumes the model and schedulers only (for comparison).
    """
    make = {"shampoo": shampoo_container, "adamw": adamw_container,
            "shampoo+adamw": lambda built: shampoo_container(built, adamw_embeddings=True)}[build_optimizers]
    specs = {"llama3": th.llama3_spec, "moe": th.moe_spec, "llama3-2layers": lambda: th.llama3_spec(n_layers=2)}
    out: dict[str, Any] = {}
    for phase, (model_name, layout) in (("first", first), ("second", second)):
        built = th.build(specs[model_name](), layout)
        optimizers = make(built)
        schedulers = th.lr_schedulers(optimizers, 2 * steps)
        state = th.TrainState()
        manager = th.checkpoint_manager(folder, built, optimizers, schedulers, state,
                                        load_optimizer=load_optimizer or phase == "first")
        out[f"{phase}_kinds"] = th.kinds_table([row for part in built.parts for row in th.placements_table(part)])
        out[f"{phase}_parts"] = [th.part_modules(part) for part in built.parts]
        out[f"{phase}_optimizers"] = [type(o).__name__ for o in optimizers.optimizers]
        if phase == "first":
            out["losses"] = th.train(built, optimizers, steps, schedulers)
            state.step = steps
            manager.save(curr_step=steps)
            out["saved_state"] = state_fingerprint(optimizers)
            out["losses"] += th.train(built, optimizers, steps, schedulers, start=steps)
        else:
            assert manager.load(), "CheckpointManager found no checkpoint to resume from"
            out["loaded_step"] = state.step
            out["loaded_state"] = state_fingerprint(optimizers)
            out["resumed_losses"] = th.train(built, optimizers, steps, schedulers, start=state.step)
        manager.close()
        del built, optimizers
    return out


def state_bytes_layouts(rank: int, world: int) -> dict[str, tuple[int, int]]:
    """Llama3 FSDP x TP 2x2 and the MoE with EP 2, ShardedShampoo through the container, one step each.

    Per layout: (bytes of optimizer state this rank really allocated, bytes the optimizer's own plan
    gives this rank); the test compares both with the dry-run of the same torchtitan model.
    """
    from sharded_shampoo import ShardedShampoo
    from tests.support.dist_scenarios import owned_state_bytes

    out: dict[str, tuple[int, int]] = {}
    for label, spec, layout in (("llama3 fsdp2 x tp2", th.llama3_spec(), th.Layout(tp=2)),
                                ("moe fsdp4 / efsdp2 x ep2", th.moe_spec(), th.Layout(ep=2))):
        built = th.build(spec, layout)
        optimizers = shampoo_container(built)
        th.train(built, optimizers, 1)
        opt = next(o for o in optimizers.optimizers if isinstance(o, ShardedShampoo))
        out[label] = (owned_state_bytes(opt), opt.plan.ranks[rank].optimizer_state_bytes)
        del built, optimizers, opt
    return out
