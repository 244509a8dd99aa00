"""Multi-rank checkpoint scenarios (imported by spawned ranks and by the parent test process).

A run trains the toy model of ``dist_scenarios`` with the shared deterministic gradients for
steps ``[0, 10)``, saves, and a *new* set of ranks (another world size or mesh) loads and
trains steps ``[10, 20)``. The parent computes the uninterrupted single-process run, so the
tests assert that a resumed run equals an uninterrupted one (world-size invariance of the step
itself is established by test_distributed.py).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tests.support import dist_scenarios
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpointing import (IncompatibleCheckpointError, TrainState, load_checkpoint,
                                           save_checkpoint)

SAVE_AT = 10
END = 20


# ----------------------------------------------------------------------------- building blocks


class Net(nn.Module):
    """Parameters of the given shapes (names without dots), for shape/structure mismatch cases."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g) * 0.1))


def build(layout: str, config: str, mesh_shape: tuple[int, ...] = (1,), model: Optional[nn.Module] = None,
          **overrides: Any) -> tuple[nn.Module, ShardedShampoo]:
    """The toy model (or ``model``) under ``layout`` ('single', 'fsdp', 'hsdp') and its optimizer."""
    model = dist_scenarios.make_model() if model is None else model
    mesh = None
    if layout != "single":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.named_parameters(), mesh=mesh, **dict(dist_scenarios.CONFIGS[config], **overrides))
    return model, opt


def feed(model: nn.Module, opt: ShardedShampoo, start: int, stop: int) -> None:
    """Optimizer steps ``[start, stop)`` with the shared gradients of those step indices."""
    from torch.distributed.tensor import distribute_tensor

    for step in range(start, stop):
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = dist_scenarios.grad_for(name, p.shape, step)
                p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g
        opt.step()
    opt.zero_grad(set_to_none=True)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: dist_scenarios.full(p.detach()).clone() for n, p in model.named_parameters()}


def reference(config: str, steps: int, **overrides: Any) -> tuple[dict[str, torch.Tensor], ShardedShampoo]:
    """The uninterrupted single-process run (parent process, no process group)."""
    model, opt = build("single", config, **overrides)
    feed(model, opt, 0, steps)
    return full_params(model), opt


def opt_snapshot(opt: ShardedShampoo) -> dict[str, Any]:
    """A deep copy of the optimizer's state (by parameter name) and param groups."""
    def clone(v: Any) -> Any:
        return {k: clone(x) for k, x in v.items()} if isinstance(v, dict) else v.clone()

    name = {id(rec.param): rec.name for rec in opt.runtime.params}
    return {"state": {name[id(p)]: clone(dict(s)) for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def snapshot(model: nn.Module, opt: ShardedShampoo) -> dict[str, Any]:
    """A deep copy of everything a load could change: local parameter shards, state, param groups."""
    from sharded_shampoo.runtime.placements import local_tensor

    return {"params": {n: local_tensor(p.detach()).clone() for n, p in model.named_parameters()},
            **opt_snapshot(opt)}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """Like :func:`same`, but tensors may differ by ``tol`` relative to their max magnitude."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12)) if a.numel() else True
    return a == b


def raw_save(model: nn.Module, opt: ShardedShampoo, path: str, flatten: bool) -> None:
    """torch's documented path: get_state_dict + dcp.save (no sharded_shampoo.checkpointing)."""
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def raw_load(model: nn.Module, opt: ShardedShampoo, path: str, flatten: bool) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)


def well_conditioned(packed: bool) -> dict[str, Any]:
    """Overrides of the root-inverse toy config for runs compared across storage layouts: fp64 factors,
    epsilon 1e-3 and the first root at step 16, when every factor is full rank (the toy's own first root
    comes at step 2, where eigh's null-space basis -- which the exact symmetry of packed storage changes --
    makes runs of the two layouts drift apart chaotically)."""
    from sharded_shampoo import RootInverseShampoo

    return dict(preconditioner=RootInverseShampoo(factor_dtype=torch.float64, symmetric_packing=packed),
                epsilon=1e-3, start_preconditioning_step=16)


def resume_diff(layout: str, config: str, mesh_shape: tuple[int, ...], path: str, ref: dict[str, torch.Tensor],
                how: str = "pair", **overrides: Any) -> float:
    """Build on the current world, load ``path`` (pair API or raw get/set_state_dict), train to END."""
    model, opt = build(layout, config, mesh_shape, **overrides)
    if how == "pair":
        extra = load_checkpoint(path, model, opt, extra={"step": -1})
        assert extra["step"] == SAVE_AT, extra
    else:
        raw_load(model, opt, path, flatten=(how == "raw_flat"))
    assert all(g["step"] == SAVE_AT for g in opt.param_groups)
    feed(model, opt, SAVE_AT, END)
    return dist_scenarios.max_rel_diff(full_params(model), ref)


# ----------------------------------------------------------------------------- iterate averaging

#: (config, mode the checkpoint is saved in, how it is written and read)
AVERAGING_CASES = (("gpa", "train", "pair"), ("gpa", "eval", "pair"), ("schedule_free", "eval", "pair"),
                   ("schedule_free", "eval", "raw_flat"), ("schedule_free", "train", "raw_nested"))


def averaging_path(root: str, config: str, mode: str, how: str) -> str:
    return os.path.join(root, f"AVG_{config}_{mode}_{how}")


def averaging_reference(config: str, mode: str) -> dict[str, torch.Tensor]:
    """The uninterrupted single-process run; with ``mode='eval'`` it evaluates (eval(), train()) at SAVE_AT."""
    model, opt = build("single", config)
    feed(model, opt, 0, SAVE_AT)
    if mode == "eval":
        opt.eval()
        opt.train()
    feed(model, opt, SAVE_AT, END)
    return full_params(model)


def save_averaging(root: str, layout: str, mesh_shape: tuple[int, ...]) -> None:
    """Every AVERAGING_CASES checkpoint, trained to SAVE_AT under ``layout`` and saved in its mode."""
    for config, mode, how in AVERAGING_CASES:
        model, opt = build(layout, config, mesh_shape)
        feed(model, opt, 0, SAVE_AT)
        if mode == "eval":
            opt.eval()
        path = averaging_path(root, config, mode, how)
        if how == "pair":
            save_checkpoint(path, SAVE_AT, model, opt, extra={"step": SAVE_AT})
        else:
            raw_save(model, opt, path, flatten=(how == "raw_flat"))


def resume_averaging(layout: str, mesh_shape: tuple[int, ...], root: str, config: str, mode: str, how: str,
                     ref: dict[str, torch.Tensor]) -> float:
    """Load an AVERAGING_CASES checkpoint: the optimizer takes the checkpoint's mode (the model was saved
    in it too); opt.train() -- a no-op for a train-mode checkpoint -- then training goes on to END."""
    model, opt = build(layout, config, mesh_shape)
    path = averaging_path(root, config, mode, how)
    if how == "pair":
        load_checkpoint(path, model, opt, extra={"step": -1})
    else:
        raw_load(model, opt, path, flatten=(how == "raw_flat"))
    modes = {g["train_mode"] for g in opt.param_groups if "train_mode" in g}
    assert modes == {mode == "train"}, (modes, mode)
    opt.train()
    feed(model, opt, SAVE_AT, END)
    return dist_scenarios.max_rel_diff(full_params(model), ref)


# ----------------------------------------------------------------------------- other preconditioners

#: kinds without factors (their state: filtered gradient, grafting, momentum) saved sharded, resumed elsewhere
STATELESS_KINDS = ("spectral", "sign")


def save_kinds(root: str, layout: str, mesh_shape: tuple[int, ...]) -> None:
    """Each STATELESS_KINDS config trained to SAVE_AT under ``layout`` and saved to ``root/KIND_<config>``."""
    for config in STATELESS_KINDS:
        model, opt = build(layout, config, mesh_shape)
        feed(model, opt, 0, SAVE_AT)
        save_checkpoint(os.path.join(root, f"KIND_{config}"), SAVE_AT, model, opt, extra={"step": SAVE_AT})


# ----------------------------------------------------------------------------- launches


def scenario_four(rank: int, world: int, root: str, refs: dict[str, dict]) -> dict[str, Any]:
    """4 ranks: save FSDP-4 (pair + raw nested + raw flat) and HSDP 2x2; HSDP -> FSDP 4; init step."""
    out: dict[str, Any] = {}
    model, opt = build("fsdp", "root_inverse", (4,))
    feed(model, opt, 0, SAVE_AT)
    save_checkpoint(os.path.join(root, "A"), SAVE_AT, model, opt, extra={"step": SAVE_AT})
    raw_save(model, opt, os.path.join(root, "A_raw_nested"), flatten=False)
    raw_save(model, opt, os.path.join(root, "A_raw_flat"), flatten=True)
    out["owners_A"] = opt.plan.owner_of()
    out["local_momentum_A"] = {n: tuple(s["momentum"].shape) for n, s in
                               ((r.name, opt.state.get(r.param, {})) for r in opt.runtime.params) if "momentum" in s}

    model, opt = build("hsdp", "root_inverse", (2, 2))
    feed(model, opt, 0, SAVE_AT)
    save_checkpoint(os.path.join(root, "B"), SAVE_AT, model, opt, extra={"step": SAVE_AT})
    out["owners_B"] = opt.plan.owner_of()
    dist.barrier()
    out["hsdp2x2->fsdp4"] = resume_diff("fsdp", "root_inverse", (4,), os.path.join(root, "B"), refs["root_inverse"])

    # a plan where 3 of 4 ranks own no block and hold no momentum: torch's get_state_dict must not
    # issue its init step (a collective) on those ranks only, and the explicit init step must be a no-op
    model, opt = build("fsdp", "eigen_corrected", (4,), model=Net({"w": (8, 4)}))
    feed(model, opt, 0, 3)
    out["owned_blocks"] = sum(1 for s in opt.state.values() for k in s if k.startswith("block_"))
    before = snapshot(model, opt)
    for flatten in (True, False):
        path = os.path.join(root, f"small_{flatten}")
        raw_save(model, opt, path, flatten)
        raw_load(model, opt, path, flatten)
    out["small_roundtrip_unchanged"] = same(before, snapshot(model, opt))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    out["init_step_flag"] = opt.last_step_was_init
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    out["init_step_unchanged"] = same(before, snapshot(model, opt))
    return out


def scenario_two(rank: int, world: int, root: str, refs: dict[str, dict]) -> dict[str, Any]:
    """2 ranks: 4->2 (pair, raw nested, raw flat), 1->2 (also from full to packed matrices); async save of C;
    saves of the averaging cases and of K (KL-Shampoo) for 2->1; incompatibility errors."""
    out: dict[str, Any] = {}
    for how, name in (("pair", "A"), ("raw_nested", "A_raw_nested"), ("raw_flat", "A_raw_flat")):
        out[f"fsdp4->fsdp2 {how}"] = resume_diff("fsdp", "root_inverse", (2,), os.path.join(root, name),
                                                 refs["root_inverse"], how)
    out["single->fsdp2"] = resume_diff("fsdp", "eigen_corrected", (2,), os.path.join(root, "D"),
                                       refs["eigen_corrected"])
    save_averaging(root, "fsdp", (2,))      # read back on one process by test_checkpointing_dist.py
    model, opt = build("fsdp", "kl", (2,))   # KL-Shampoo, read back on one process too
    feed(model, opt, 0, SAVE_AT)
    save_checkpoint(os.path.join(root, "K"), SAVE_AT, model, opt, extra={"step": SAVE_AT})
    save_kinds(root, "fsdp", (2,))          # likewise
    # E: full matrices (the layout before packing, symmetric_packing=False) -> packed, on 2 ranks
    out["single full->fsdp2 packed"] = resume_diff("fsdp", "root_inverse", (2,), os.path.join(root, "E"),
                                                   refs["packing"], **well_conditioned(True))

    # async save: the state at SAVE_AT is staged before save_checkpoint returns; training goes on
    model, opt = build("fsdp", "eigen_corrected", (2,))
    feed(model, opt, 0, SAVE_AT)
    at_save = snapshot(model, opt)
    handle = save_checkpoint(os.path.join(root, "C"), SAVE_AT, model, opt, extra={"step": SAVE_AT}, async_=True)
    feed(model, opt, SAVE_AT, SAVE_AT + 3)   # mutates the live state while the save runs
    out["latest_before_wait"] = open(os.path.join(root, "C", "latest")).read().strip() \
        if os.path.exists(os.path.join(root, "C", "latest")) else None
    handle.wait()
    dist.barrier()
    out["latest_after_wait"] = open(os.path.join(root, "C", "latest")).read().strip()
    model, opt = build("fsdp", "eigen_corrected", (2,))
    load_checkpoint(os.path.join(root, "C"), model, opt)
    out["async_snapshot_equal"] = same(at_save, snapshot(model, opt))

    # incompatible settings: every rank raises the same readable error before touching anything
    errors = {}
    for case, kw in (("max_dim", dict(max_preconditioner_dim=8)), ("kind", dict(config="eigen_corrected"))):
        config = kw.pop("config", "root_inverse")
        model, opt = build("fsdp", config, (2,), **kw)
        feed(model, opt, 0, 2)
        before = snapshot(model, opt)
        try:
            load_checkpoint(os.path.join(root, "A"), model, opt)
            errors[case] = None
        except IncompatibleCheckpointError as err:
            errors[case] = str(err)
        # the Stateful used directly with dcp.load fails in DCP's planning (guard key), before any read
        try:
            dcp.load({"app": TrainState(model, opt)}, checkpoint_id=os.path.join(root, "A", "step_10"))
            errors[case + " dcp"] = None
        except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            errors[case + " dcp"] = str(err)
        errors[case + " unchanged"] = same(before, snapshot(model, opt))
    out["errors"] = errors
    # eigendecomposed Shampoo (eigenpairs, adaptive refresh, beta3): saved by 2 ranks, resumed on 3 and on 1
    model, opt = build("fsdp", "eigendecomposed", (2,))
    feed(model, opt, 0, SAVE_AT)
    save_checkpoint(os.path.join(root, "EIG"), SAVE_AT, model, opt, extra={"step": SAVE_AT})
    # eigendecomposed KL-Shampoo (the KL update reads roots formed from the eigenpairs): resumed on 1
    model, opt = build("fsdp", "eigendecomposed_kl", (2,))
    feed(model, opt, 0, SAVE_AT)
    save_checkpoint(os.path.join(root, "EIGKL"), SAVE_AT, model, opt, extra={"step": SAVE_AT})
    return out


def scenario_three(rank: int, world: int, root: str, refs: dict[str, dict]) -> dict[str, Any]:
    """3 ranks: 2->3 from the asynchronously saved C, and from EIG (eigendecomposed Shampoo)."""
    return {"fsdp2->fsdp3": resume_diff("fsdp", "eigen_corrected", (3,), os.path.join(root, "C"),
                                        refs["eigen_corrected"]),
            "eigendecomposed fsdp2->fsdp3": resume_diff("fsdp", "eigendecomposed", (3,), os.path.join(root, "EIG"),
                                                        refs["eigendecomposed"])}


def scenario_killed_save(rank: int, world: int, root: str) -> None:
    """Save step 5, then die on rank 1 in the middle of saving step 10 (after writing its file)."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, opt = build("fsdp", "root_inverse", (2,))
    feed(model, opt, 0, 5)
    save_checkpoint(root, 5, model, opt, extra={"step": 5})
    feed(model, opt, 5, 10)
    if rank == 1:
        real = FileSystemWriter.write_data

        def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
            real(self, plan, planner).wait()   # this rank's data file is on disk ...
            os._exit(17)                       # ... and the rank dies before DCP's final gather

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]
    save_checkpoint(root, 10, model, opt, extra={"step": 10})
    raise AssertionError("unreachable: rank 1 dies during the save")


# ----------------------------------------------------------------------------- scripts/train.py


TRAIN_ARGS = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq", "16", "--batch", "4",
              "--corpus-bytes", "100000", "--precondition-frequency", "2", "--no-progress", "--log-every", "100"]


def scenario_train(rank: int, world: int, argv: list[str]) -> list[float]:
    from scripts import train

    return train.train(train.parse_args(TRAIN_ARGS + argv))
