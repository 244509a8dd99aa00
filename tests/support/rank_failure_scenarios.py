"""Multi-rank scenarios of the hardening tests (imported by spawned ranks): a failure on one rank
must become an error on every rank within seconds, never a wait in a collective."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from sharded_shampoo import NonFiniteGradientError, RankFailureError, ShardedShampoo


def _params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.nn.Parameter(torch.randn(6, 4, generator=gen)),
            "b": torch.nn.Parameter(torch.randn(4, generator=gen))}


def _grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)


def _step(opt: ShardedShampoo) -> None:
    """One step and its documented reporting point: a steady step decides on the device and reports its
    error (on every rank, the failing rank with its own cause) at the next host-visible point, here
    ``opt.check()`` (docs/user_guide.md, "When errors are reported")."""
    opt.step()
    opt.check()


def _outcome(fn: Callable[[], Any]) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    try:
        fn()
        kind, msg = "ok", ""
    except Exception as err:  # noqa: BLE001 - the test inspects it
        kind, msg = type(err).__name__, str(err)
    return kind, msg, time.perf_counter() - t0


def scenario_local_failures(rank: int, world: int) -> dict[str, tuple[str, str, float]]:
    out: dict[str, tuple[str, str, float]] = {}
    params = _params()
    opt = ShardedShampoo(list(params.items()), lr=0.01, precondition_frequency=2)

    def wrong_size() -> None:
        _grads(params, 0)
        if rank == 1:
            params["w"].grad.data = torch.zeros(7, 4)
        _step(opt)
    out["wrong_size"] = _outcome(wrong_size)

    def bad_lr() -> None:
        _grads(params, 1)
        opt.param_groups[0]["lr"] = -1.0 if rank == 1 else 0.01
        _step(opt)
    out["bad_lr"] = _outcome(bad_lr)

    def different_lr() -> None:
        _grads(params, 2)
        opt.param_groups[0]["lr"] = 0.02 if rank == 1 else 0.01
        _step(opt)
    out["different_lr"] = _outcome(different_lr)
    opt.param_groups[0]["lr"] = 0.01

    def nan_skip() -> None:
        skip = ShardedShampoo(list(params.items()), lr=0.01, nonfinite_grads="skip")
        _grads(params, 3)
        if rank == 1:
            params["b"].grad[0] = float("nan")
        skip.step()
        if not skip.last_step_skipped:
            raise AssertionError("the step was not skipped")
    out["nan_skip"] = _outcome(nan_skip)

    def nan_raise() -> None:
        _grads(params, 4)
        if rank == 0:
            params["w"].grad[0, 0] = float("inf")
        _step(opt)
    out["nan_raise"] = _outcome(nan_raise)

    def different_frequency() -> None:
        ShardedShampoo(list(params.items()), precondition_frequency=10 if rank == 0 else 20)
    out["different_frequency"] = _outcome(different_frequency)

    def bad_state_dict_on_one_rank() -> None:
        sd = opt.state_dict()
        if rank == 1:
            sd["param_groups"][0]["lr"] = float("nan")
        before = [t.clone() for s in opt.state.values() for t in _tensors(s)]
        try:
            opt.load_state_dict(sd)
        finally:
            after = [t for s in opt.state.values() for t in _tensors(s)]
            if not all(torch.equal(a, b) for a, b in zip(before, after)):
                raise AssertionError("a failed load changed the state")
    out["bad_state_dict"] = _outcome(bad_state_dict_on_one_rank)

    out.update(_param_list_edits(rank, params, opt))
    out["lowered_start"] = _lowered_start()

    def still_works() -> None:
        _grads(params, 5)
        _step(opt)
    out["still_works"] = _outcome(still_works)

    def wrong_size_at_refresh() -> None:     # step 2 == start_preconditioning_step: the others refresh roots
        _grads(params, 9)
        if rank == 1:
            params["w"].grad.data = torch.zeros(7, 4)
        _step(opt)
    out["wrong_size_at_refresh"] = _outcome(wrong_size_at_refresh)
    out["_types"] = (RankFailureError.__name__, NonFiniteGradientError.__name__, 0.0)
    return out


def _param_list_edits(rank: int, params: dict[str, torch.nn.Parameter],
                      opt: ShardedShampoo) -> dict[str, tuple[str, str, float]]:
    """Issue 18 items 2 and 4: an edited param list or a failing load pre-hook on one rank (or on
    all) raises on every rank before anything changes; each edit is undone afterwards."""
    out: dict[str, tuple[str, str, float]] = {}
    group = opt.param_groups[0]
    built = (list(group["params"]), list(group["param_names"]))
    extra = torch.nn.Parameter(torch.ones(3))

    def restore() -> None:
        group["params"], group["param_names"] = list(built[0]), list(built[1])

    def unchanged(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            before = [p.detach().clone() for p in params.values()] + \
                [t.clone() for s in opt.state.values() for t in _tensors(s)]
            try:
                return fn()
            finally:
                after = [p.detach() for p in params.values()] + [t for s in opt.state.values() for t in _tensors(s)]
                restore()
                if not all(torch.equal(a, b) for a, b in zip(before, after)):
                    raise AssertionError("a refused step or load changed parameters or state")
        return run

    def append_on_rank1() -> None:
        _grads(params, 6)
        if rank == 1:
            group["params"].append(extra)
            group["param_names"].append("extra")
        _step(opt)
    out["edit_one_rank"] = _outcome(unchanged(append_on_rank1))

    def remove_everywhere() -> None:
        _grads(params, 7)
        group["params"].pop()
        group["param_names"].pop()
        _step(opt)
    out["edit_every_rank"] = _outcome(unchanged(remove_everywhere))

    def partial_gradients() -> None:
        _grads(params, 8)
        if rank == 1:
            params["b"].grad = None
        _step(opt)
    out["partial_gradients"] = _outcome(unchanged(partial_gradients))

    sd = opt.state_dict()

    def load_after_edit_on_rank1() -> None:
        if rank == 1:
            group["params"].reverse()
            group["param_names"].reverse()
        opt.load_state_dict(sd)
    out["load_edit_one_rank"] = _outcome(unchanged(load_after_edit_on_rank1))

    def load_pre_hook_fails_on_rank1() -> None:
        def hook(o: Any, d: Any) -> None:
            if rank == 1:
                raise RuntimeError("load pre-hook failed on rank 1")
        handle = opt.register_load_state_dict_pre_hook(hook)
        try:
            opt.load_state_dict(sd)
        finally:
            handle.remove()
    out["load_pre_hook_fails"] = _outcome(unchanged(load_pre_hook_fails_on_rank1))
    return out


def _lowered_start() -> tuple[str, str, float]:
    """Issue 18 item 3 on 2 ranks: start lowered below the current step after 3 steps computes the roots
    at step 4, as a one-process run that started at 4 (the amortized-step decision agrees on every rank)."""
    def run(start: int, lowered: bool, mesh: Any) -> dict[str, torch.nn.Parameter]:
        params = _params()
        opt = ShardedShampoo(list(params.items()), lr=0.05, epsilon=1e-6, precondition_frequency=50,
                             start_preconditioning_step=start, mesh=mesh)
        for t in range(6):
            if t == 3 and lowered:
                opt.param_groups[0]["start_preconditioning_step"] = 1
            _grads(params, 10 + t)
            _step(opt)
        return params

    lowered, reference = run(100, True, None), run(4, False, "local")
    diff = max(float((lowered[n] - reference[n]).detach().abs().max()) for n in lowered)
    return ("ok" if diff <= 1e-6 else "mismatch", f"max difference {diff:.3e}", diff)


def _tensors(d: Any) -> list[torch.Tensor]:
    if isinstance(d, torch.Tensor):
        return [d]
    if isinstance(d, dict):
        return [t for v in d.values() for t in _tensors(v)]
    return []
