"""Randomized multi-rank fuzzing, part 3: what one rank (or the parent process) executes.

A *job* is one run of one case: ``ref`` (the 1-process run, no events), ``main`` (the case's
layout, with its NaN/Inf injection and checkpoint save) or ``load`` (another layout loads the
checkpoint and trains to the end). A launch of ``W`` gloo ranks executes *rounds*; a round places
jobs on disjoint rank ranges (a 2-rank FSDP job on ranks 0-1 beside another on 2-3, a 1-process
job on rank 3 beside a 3-rank job), so one launch serves many cases. Every job writes its result
file as soon as it ends and every rank writes which job it is running, so a launch that dies or
hangs still tells which seed did it.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from tests.support.fuzz_cases import Case, draw
from tests.support.fuzz_models import Meshes, build, family, feed, local_box, make_model
from sharded_shampoo import NonFiniteGradientError, ShardedShampoo


@dataclass(frozen=True)
class Job:
    id: int
    seed: int
    kind: str                  # "ref" | "main" | "load"
    layout: str
    ckpt_root: Optional[str] = None
    chaotic: bool = False

    @property
    def world(self) -> int:
        from tests.support.fuzz_cases import LAYOUT_WORLD

        return LAYOUT_WORLD[self.layout]


@dataclass(frozen=True)
class LaunchPlan:
    world: int
    rounds: tuple[tuple[tuple[int, Job], ...], ...]    # per round: (first rank, job)
    timeout_s: float

    def ranges(self) -> list[tuple[int, int]]:
        out = {(0, self.world)}
        for rnd in self.rounds:
            out.update((first, job.world) for first, job in rnd if job.world > 1 and family(job.layout) is None)
        return sorted(out)

    def families(self) -> list[str]:
        return sorted({f for rnd in self.rounds for _, job in rnd if (f := family(job.layout)) is not None})


def ckpt_path(job: Job) -> str:
    assert job.ckpt_root is not None
    return os.path.join(job.ckpt_root, f"seed{job.seed}")


# ----------------------------------------------------------------------------- one job


def local_params(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Every parameter's local data on this rank and its global offset (replicas included)."""
    out = {}
    for n, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[n] = (local.detach().clone(), local_box(p)[1])
    return out


def snapshot(model: torch.nn.Module, opt: ShardedShampoo) -> list[torch.Tensor]:
    """Everything a step could change on this rank: local parameters, optimizer state, step counters."""
    out = [t.clone() for t, _ in local_params(model).values()]
    for state in opt.state.values():
        stack: list[Any] = [state]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v[k] for k in sorted(v))
            elif isinstance(v, torch.Tensor):
                out.append(v.clone())
    out.append(torch.tensor([g["step"] for g in opt.param_groups]))
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _inject(model: torch.nn.Module, case: Case, group_rank: int) -> Optional[str]:
    """Put the drawn bad value into one local gradient on the drawn rank; the parameter it hit (or None)."""
    nf = case.nonfinite
    assert nf is not None
    if group_rank != nf.rank:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    names = [n for n, _ in named]
    start = names.index(nf.param) if nf.param in names else 0
    for n, p in named[start:] + named[:start]:
        module = next(m for m in case.modules if m.name == n.split(".")[0])
        settings = dict(case.config.second_group if module.group == 1 else case.config.kwargs)
        factor64 = settings["preconditioner"][1]["factor_dtype"] == "float64"
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if g.numel() == 0:
            continue
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}.get(nf.kind)
        if value is None:   # "overflow": finite, but its square is not representable in the statistics
            value = 1e30 if not factor64 else (1e200 if g.dtype == torch.float64 else float("inf"))
        g[tuple(int(i) for i in torch.unravel_index(torch.tensor(g.numel() // 2), g.shape))] = value
        return n
    return None


def _bad_step(model: torch.nn.Module, opt: ShardedShampoo, case: Case, group_rank: int) -> dict[str, Any]:
    hit = _inject(model, case, group_rank)
    before = snapshot(model, opt)
    outcome = "stepped"
    try:
        opt.step()
        opt.check()        # the documented reporting point of a steady step's error (one step late)
    except NonFiniteGradientError:
        outcome = "raised"
    except Exception as err:  # noqa: BLE001 - reported to the parent as a wrong outcome
        outcome = f"{type(err).__name__}: {err}"
    return {"hit": hit, "outcome": outcome, "skipped": opt.last_step_skipped,
            "unchanged": _same(before, snapshot(model, opt)),
            "any_grad": any(p.grad is not None for p in model.parameters() if p.requires_grad)}


def _train(model: torch.nn.Module, opt: ShardedShampoo, case: Case, start: int, group_rank: int,
           events: dict[str, Any], job: Job) -> Any:
    handle = None
    for step in range(start, case.steps):
        ck = case.checkpoint
        if job.kind == "main" and ck is not None and step == ck.save_step:
            from sharded_shampoo.checkpointing import save_checkpoint

            events["saved_steps"] = [g["step"] for g in opt.param_groups]
            handle = save_checkpoint(ckpt_path(job), step, model, opt, extra={"step": step}, async_=ck.async_save,
                                     flatten_optimizer_state_dict=ck.flatten)
        feed(model, case, step)
        if job.kind == "main" and case.nonfinite is not None and step == case.nonfinite.step:
            bad = events["nonfinite"] = _bad_step(model, opt, case, group_rank)
            if bad["outcome"] == "stepped" and not bad["skipped"]:
                # no rank held a non-empty gradient to corrupt (the drawn rank's pieces are all
                # empty): that step had this step's clean gradients and was the real one
                continue
            feed(model, case, step)          # training goes on with the clean gradient of this step
        opt.step()
    if handle is not None:
        handle.wait()
    return [g["step"] for g in opt.param_groups]


def run_job(job: Job, meshes: Optional[Meshes], first: int, group_rank: int) -> dict[str, Any]:
    """Run ``job`` on this rank (ranks ``[first, first + world)`` run it together); its result."""
    if job.kind == "hang":   # the harness's self-test: rank 0 waits in a collective nobody else joins
        if group_rank == 0 and meshes is not None:
            dist.barrier(group=meshes.ranges[(first, job.world)].get_group())
        return {"params": {}, "events": {}, "seconds": 0.0}
    case = draw(job.seed, job.chaotic)
    layout = "single" if job.kind == "ref" else job.layout
    t0 = time.perf_counter()
    model, opt = build(case, layout, meshes, first)
    init = {n: p.detach() for n, p in make_model(case).named_parameters()}
    for n, (local, offset) in local_params(model).items():   # the harness laid out what it meant to
        region = init[n]
        for d, (o, s) in enumerate(zip(offset, local.shape)):
            region = region.narrow(d, o, s)
        if not torch.equal(local, region):
            raise AssertionError(f"harness: {n}'s local data on this rank is not its region of the initial value")
    events: dict[str, Any] = {}
    start = 0
    if job.kind == "load":
        from sharded_shampoo.checkpointing import load_checkpoint

        extra = load_checkpoint(ckpt_path(job), model, opt, extra={"step": -1})
        start = int(extra["step"])
        events["loaded_steps"] = [g["step"] for g in opt.param_groups]
        events["loaded_at"] = start
    events["final_steps"] = _train(model, opt, case, start, group_rank, events, job)
    return {"params": local_params(model), "events": events, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- a launch


def _write(out_dir: str, name: str, value: Any) -> None:
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, os.path.join(out_dir, name))


def launch(rank: int, world: int, plan: LaunchPlan, out_dir: str) -> str:
    """A launch's entry point on every rank: its rounds in order; stop everyone after a failed round."""
    warnings.filterwarnings("ignore", category=FutureWarning)      # torch's own deprecation notes
    meshes = Meshes.create(world, plan.ranges(), plan.families())
    # status exchange on its own group, so a misaligned job collective cannot poison it; twice the
    # job timeout, so a job that hangs is reported by its own ranks' timeout first
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=2 * plan.timeout_s))
    for index, rnd in enumerate(plan.rounds):
        mine = [(first, job) for first, job in rnd if first <= rank < first + job.world]
        error: Optional[str] = None
        for first, job in mine:
            with open(os.path.join(out_dir, f"progress{rank}"), "w") as f:
                f.write(f"{index} {job.id}")
            try:
                result: dict[str, Any] = run_job(job, meshes, first, rank - first)
            except BaseException:  # noqa: BLE001 - reported to the parent
                error = traceback.format_exc()
                result = {"error": error}
            _write(out_dir, f"job{job.id}_rank{rank - first}.pkl", result)
        statuses: list[Any] = [None] * world
        dist.all_gather_object(statuses, error is not None, group=control)
        if any(statuses):
            return f"aborted after round {index}"
    return "done"
