"""Regression tests of issue 18 (hardening, round 2) on the optimizer contract, one process.

* item 2: an edit of a group's parameter list (append, remove, replace, reorder, move, rename,
  a group added or dropped) raises at the next step / state_dict / load_state_dict, naming the
  group and the parameter, before anything changes (multi-rank: ``test_hardening_dist.py``);
* item 3: lowering ``start_preconditioning_step`` below the current step (at run time or by a
  resume with ``hyperparameters="current"``) computes the root when preconditioning starts;
* item 4: torch's state-dict hooks (and the step hooks, which already fired) run with torch's
  semantics;
* item 9: an invalid ``expert_module_pattern`` names the setting.

Each test failed on the code before the fix, except the ones marked as guarding a sibling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.support.numerics import grad_for, max_rel_diff
from tests.test_dense_reference import DenseShampoo
from sharded_shampoo import AdaGradGrafting, EigenvalueCorrectedShampoo, RootInverseShampoo, ShardedShampoo

SHAPES = {"w": (6, 4), "b": (4,), "v": (3, 5)}


def _params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}


def _two_groups(params: dict[str, torch.nn.Parameter], **kw: Any) -> ShardedShampoo:
    groups = [{"params": [("w", params["w"]), ("b", params["b"])]}, {"params": [("v", params["v"])], "lr": 0.02}]
    return ShardedShampoo(groups, lr=0.01, precondition_frequency=2, **kw)


def _grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    for i, p in enumerate(params.values()):
        p.grad = grad_for(p, i, step)


def _snapshot(params: dict[str, torch.nn.Parameter], opt: ShardedShampoo,
              groups: list[dict[str, Any]] | None = None) -> list[torch.Tensor]:
    """Parameters, state and the step counters of ``groups`` (default: the optimizer's)."""
    out = [p.detach().clone() for p in params.values()]
    for s in opt.state.values():
        out.extend(_tensors(s))
    return out + [torch.tensor([g["step"] for g in (opt.param_groups if groups is None else groups)])]


def _tensors(d: Any) -> list[torch.Tensor]:
    if isinstance(d, torch.Tensor):
        return [d.detach().clone()]
    if isinstance(d, dict):
        return [t for v in d.values() for t in _tensors(v)]
    return []


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- item 2: edits of the param lists

EXTRA = torch.nn.Parameter(torch.randn(5, 2))


def _append(opt):
    opt.param_groups[0]["params"].append(EXTRA)
    opt.param_groups[0]["param_names"].append("extra")


def _append_unnamed(opt):
    opt.param_groups[1]["params"].append(EXTRA)


def _remove(opt):
    opt.param_groups[0]["params"].pop(1)
    opt.param_groups[0]["param_names"].pop(1)


def _remove_keep_names(opt):
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][:1]


def _replace(opt):
    opt.param_groups[0]["params"][0] = torch.nn.Parameter(torch.zeros(6, 4))


def _reorder(opt):
    g = opt.param_groups[0]
    g["params"].reverse()
    g["param_names"].reverse()


def _move(opt):
    v = opt.param_groups[1]["params"].pop()
    opt.param_groups[1]["param_names"].pop()
    opt.param_groups[0]["params"].append(v)
    opt.param_groups[0]["param_names"].append("v")


def _rename(opt):
    opt.param_groups[1]["param_names"][0] = "renamed"


def _drop_names(opt):
    del opt.param_groups[1]["param_names"]


def _group_appended(opt):
    opt.param_groups.append(dict(opt.param_groups[1], params=[EXTRA], param_names=["extra"]))


def _group_dropped(opt):
    opt.param_groups.pop()


def _duplicate(opt):
    opt.param_groups[0]["params"].append(opt.param_groups[0]["params"][0])


def _as_tuple(opt):
    opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])   # same tensors, same order: fine


EDITS: dict[str, tuple[Callable[[ShardedShampoo], None], str]] = {
    "append": (_append, r"param_groups\[0\].*a new tensor of shape \(5, 2\) named 'extra' was added at position 2"),
    "append_unnamed": (_append_unnamed, r"param_groups\[1\].*\(5, 2\)"),
    "remove": (_remove, r"param_groups\[0\].*'b'"),
    "remove_keep_names": (_remove_keep_names, r"param_groups\[0\].*'b'"),
    "replace": (_replace, r"param_groups\[0\].*position 0 holds a new tensor of shape \(6, 4\) instead of 'w'"),
    "reorder": (_reorder, r"param_groups\[0\].*'b'.*'w'|param_groups\[0\].*'w'.*'b'"),
    "move": (_move, r"param_groups\[0\].*'v'|param_groups\[1\].*'v'"),
    "rename": (_rename, r"param_groups\[1\].*'renamed'.*'v'|param_groups\[1\].*'v'.*'renamed'"),
    "duplicate": (_duplicate, r"param_groups\[0\].*'w' appears twice"),
    "drop_names": (_drop_names, r"param_groups\[1\].*param_names"),
    "group_appended": (_group_appended, r"3 param group\(s\) but was built with 2"),
    "group_dropped": (_group_dropped, r"1 param group\(s\) but was built with 2"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_param_list_edits_raise_before_anything_changes(edit: str) -> None:
    apply, message = EDITS[edit]
    params = _params()
    opt = _two_groups(params, momentum=0.9)
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    built = list(opt.param_groups)
    before = _snapshot(params, opt, built)
    saved_groups = [dict(g, params=list(g["params"]), param_names=list(g.get("param_names", []))) for g in built]
    apply(opt)
    _grads(params, 1)
    EXTRA.grad = torch.ones_like(EXTRA)
    for call in (opt.step, opt.state_dict, lambda: opt.load_state_dict(sd)):
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "new ShardedShampoo" in str(info.value)
        assert _same(_snapshot(params, opt, built), before), f"{edit}: something changed"
    opt.param_groups[:] = saved_groups            # undone: the optimizer works again
    opt.step()
    assert opt.param_groups[0]["step"] == 2 and not _same(_snapshot(params, opt), before)


def test_same_tensors_in_a_new_container_are_not_an_edit() -> None:
    """Sibling guard: replacing the list by an equal one (a tuple, a copy) is not a change."""
    params = _params()
    opt = _two_groups(params)
    _as_tuple(opt)
    opt.param_groups[1]["param_names"] = list(opt.param_groups[1]["param_names"])
    _grads(params, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["step"] == 1


def test_param_list_edit_message_names_the_fix() -> None:
    params = _params()
    opt = _two_groups(params)
    _append(opt)
    with pytest.raises(ValueError) as info:
        opt.step()
    text = str(info.value)
    assert "param_groups[0]['params']" in text and "'extra'" in text and "nothing was updated" in text.lower()


# ----------------------------------------------------------------------------- item 3: start lowered mid-run


def _run_start(start0: int, lowered: int | None, at: int, steps: int, preconditioner: Any,
               eps: float = 1e-6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``steps`` steps of one 2-D parameter; before step ``at + 1`` the start is set to ``lowered``.
    Returns the parameter after every step and the first root/eigenbasis factor after every step."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    opt = ShardedShampoo([("w", p)], lr=0.05, betas=(0.9, 0.95), epsilon=eps, precondition_frequency=50,
                         start_preconditioning_step=start0, grafting=AdaGradGrafting(epsilon=1e-8),
                         preconditioner=preconditioner)
    trail, roots = [], []
    key = "eigenbasis_0" if isinstance(preconditioner, EigenvalueCorrectedShampoo) else "root_0"
    for t in range(steps):
        if t == at and lowered is not None:
            opt.param_groups[0]["start_preconditioning_step"] = lowered
        p.grad = grad_for(p, 0, t)
        opt.step()
        trail.append(p.detach().clone())
        roots.append(opt.state[p]["block_0"][key].clone())
    return trail, roots


PRECONDITIONERS = {"root_inverse": RootInverseShampoo(factor_dtype=torch.float64),
                   "eigenvalue_corrected": EigenvalueCorrectedShampoo(factor_dtype=torch.float64)}


@pytest.mark.parametrize("kind", sorted(PRECONDITIONERS))
@pytest.mark.parametrize("lowered", [1, 3])
def test_lowered_start_computes_the_root_when_preconditioning_starts(kind: str, lowered: int) -> None:
    pre = PRECONDITIONERS[kind]
    # 5 steps with a start far away, then the start is lowered below the current step: preconditioning
    # starts at step 6 and must use roots of step 6's factors, exactly as a run that started at 6
    late, late_roots = _run_start(100, lowered, 5, 8, pre)
    ref, ref_roots = _run_start(6, None, 5, 8, pre)
    assert not torch.equal(late_roots[5], torch.eye(5, dtype=torch.float64)), "step 6 preconditioned with identity"
    for t in range(8):
        assert float((late[t] - ref[t]).abs().max()) <= 1e-12, f"step {t + 1}"
        assert torch.equal(late_roots[t], ref_roots[t]), f"step {t + 1}"


def test_lowered_start_matches_the_dense_math() -> None:
    """Against the dense float64 reference of test_dense_reference.py started at step 6."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    kw = dict(lr=0.05, beta1=0.0, beta2=1.0, eps=1e-10, grafting=AdaGradGrafting(epsilon=1e-8), freq=50)
    ref = DenseShampoo(p, (6, 5), 8, (0.25, 0.25), start=6, **kw)
    opt = ShardedShampoo([("w", p)], lr=0.05, betas=(0.0, 1.0), epsilon=1e-10, max_preconditioner_dim=8,
                         precondition_frequency=50, start_preconditioning_step=40,
                         grafting=AdaGradGrafting(epsilon=1e-8),
                         preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    for t in range(8):
        if t == 5:
            opt.param_groups[0]["start_preconditioning_step"] = 2
        p.grad = grad_for(p, 0, t)
        opt.step()
        ref.step(grad_for(ref.p, 0, t))
        assert max_rel_diff(p, ref.p) <= 1e-9, f"step {t + 1}"


def _lowered_then_saved(load: Callable[[ShardedShampoo, dict], None]) -> tuple[list[torch.Tensor], dict]:
    """5 steps with start 100, the start lowered to 2, a state dict taken *before* the next step and
    loaded into a fresh optimizer by ``load``; 3 more steps there."""
    pre = PRECONDITIONERS["root_inverse"]

    def build() -> tuple[torch.nn.Parameter, ShardedShampoo]:
        p = torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        return p, ShardedShampoo([("w", p)], lr=0.05, betas=(0.9, 0.95), epsilon=1e-6, precondition_frequency=50,
                                 start_preconditioning_step=100, grafting=AdaGradGrafting(epsilon=1e-8),
                                 preconditioner=pre)

    a, opt_a = build()
    for t in range(5):
        a.grad = grad_for(a, 0, t)
        opt_a.step()
    opt_a.param_groups[0]["start_preconditioning_step"] = 2
    sd = opt_a.state_dict()
    b, opt_b = build()
    with torch.no_grad():
        b.copy_(a)
    load(opt_b, sd)
    trail = []
    for t in range(5, 8):
        b.grad = grad_for(b, 0, t)
        opt_b.step()
        trail.append(b.detach().clone())
    return trail, sd


def test_state_dict_between_the_lowering_and_the_next_step_keeps_the_schedule() -> None:
    """The roots are due at step 6; a state dict taken before it records start 6 (the effective start),
    so a resume (torch's convention: hyperparameters from the dict) computes them at step 6 too."""
    ref, _ = _run_start(6, None, 5, 8, PRECONDITIONERS["root_inverse"])
    resumed, sd = _lowered_then_saved(lambda opt, d: opt.load_state_dict(d))
    assert sd["param_groups"][0]["start_preconditioning_step"] == 6
    assert all(torch.equal(x, y) for x, y in zip(resumed, ref[5:]))

    def keep_live_start(opt: ShardedShampoo, d: dict) -> None:     # what hyperparameters="current" does
        opt.param_groups[0]["start_preconditioning_step"] = 2
        live = dict(opt.param_groups[0])
        opt.load_state_dict(d)
        opt.param_groups[0].update({k: v for k, v in live.items() if k not in ("params", "param_names", "step")})
    current, _ = _lowered_then_saved(keep_live_start)
    assert all(torch.equal(x, y) for x, y in zip(current, ref[5:]))
    # once the roots exist, the state dict carries the start as set
    params = _params()
    opt = _two_groups(params, start_preconditioning_step=100)
    _grads(params, 0)
    opt.step()
    opt.param_groups[0]["start_preconditioning_step"] = 1
    assert opt.state_dict()["param_groups"][0]["start_preconditioning_step"] == 2
    _grads(params, 1)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["start_preconditioning_step"] == 1


def test_no_extra_refresh_when_roots_exist() -> None:
    """Sibling guard: lowering the start after preconditioning began does not refresh the roots again."""
    pre = PRECONDITIONERS["root_inverse"]
    moved, moved_roots = _run_start(3, 1, 5, 8, pre)
    ref, ref_roots = _run_start(3, None, 5, 8, pre)
    assert all(torch.equal(a, b) for a, b in zip(moved, ref))
    assert all(torch.equal(a, b) for a, b in zip(moved_roots, ref_roots))


def test_state_copied_in_place_without_load_state_dict_refreshes_no_extra_root() -> None:
    """Sibling guard: state restored by a path that bypasses load_state_dict (torchrec's KeyedOptimizer
    copies tensors in place and sets the group step) keeps the schedule of the run it came from."""
    pre = PRECONDITIONERS["root_inverse"]

    def build() -> tuple[torch.nn.Parameter, ShardedShampoo]:
        p = torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        return p, ShardedShampoo([("w", p)], lr=0.05, epsilon=1e-6, precondition_frequency=50,
                                 start_preconditioning_step=3, preconditioner=pre)

    a, opt_a = build()
    for t in range(5):
        a.grad = grad_for(a, 0, t)
        opt_a.step()
    b, opt_b = build()
    with torch.no_grad():
        b.copy_(a)
        for dst, src in zip(_tensor_refs(opt_b.state[b]), _tensor_refs(opt_a.state[a])):
            dst.copy_(src)
    opt_b.param_groups[0]["step"] = opt_a.param_groups[0]["step"]
    for t in range(5, 8):
        for p, opt in ((a, opt_a), (b, opt_b)):
            p.grad = grad_for(p, 0, t)
            opt.step()
        assert torch.equal(a, b), f"step {t + 1}"


def _tensor_refs(d: Any) -> list[torch.Tensor]:
    if isinstance(d, torch.Tensor):
        return [d]
    return [t for v in d.values() for t in _tensor_refs(v)] if isinstance(d, dict) else []


def _ckpt_run(tmp_path, start_before: int, start_after: int, mode: str) -> list[torch.Tensor]:
    """5 steps with ``start_before``, a checkpoint, a fresh optimizer with ``start_after`` resumed
    with ``hyperparameters=mode``, 3 more steps."""
    from sharded_shampoo.checkpointing import load_checkpoint, save_checkpoint

    def build(start: int) -> tuple[torch.nn.Module, ShardedShampoo]:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4, bias=False).double()
        opt = ShardedShampoo(model.named_parameters(), lr=0.05, betas=(0.9, 0.95), epsilon=1e-6,
                             precondition_frequency=50, start_preconditioning_step=start,
                             grafting=AdaGradGrafting(epsilon=1e-8),
                             preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
        return model, opt

    model, opt = build(start_before)
    for t in range(5):
        model.weight.grad = grad_for(model.weight, 0, t)
        opt.step()
    root = str(tmp_path / f"ckpt_{start_before}_{start_after}_{mode}")
    save_checkpoint(root, 5, model, opt)
    model, opt = build(start_after)
    load_checkpoint(root, model, opt, hyperparameters=mode)
    out = []
    for t in range(5, 8):
        model.weight.grad = grad_for(model.weight, 0, t)
        opt.step()
        out.append(model.weight.detach().clone())
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resume_with_current_lowered_start_computes_the_root(tmp_path) -> None:
    resumed = _ckpt_run(tmp_path, 100, 2, "current")     # preconditioning starts at step 6 after the resume
    reference = _ckpt_run(tmp_path, 6, 6, "checkpoint")  # a run that started at 6 from the beginning
    assert all(float((a - b).abs().max()) <= 1e-12 for a, b in zip(resumed, reference))
    # sibling guard: roots computed before the checkpoint are not recomputed on resume
    kept = _ckpt_run(tmp_path, 3, 3, "current")
    straight = _ckpt_run(tmp_path, 3, 1, "current")
    assert all(torch.equal(a, b) for a, b in zip(kept, straight))


# ----------------------------------------------------------------------------- item 4: hooks


def test_state_dict_hooks_run_with_torchs_semantics() -> None:
    params = _params()
    opt = _two_groups(params)
    calls: list[str] = []

    def pre(o: torch.optim.Optimizer) -> None:
        assert o is opt
        calls.append("pre")
        o.param_groups[0]["lr"] = 0.123          # a pre-hook runs before the dict is made

    def post_in_place(o: torch.optim.Optimizer, sd: dict) -> None:
        calls.append("post_in_place")
        sd["tag"] = "in place"

    def post_returns(o: torch.optim.Optimizer, sd: dict) -> dict:
        calls.append("post_returns")
        return {"state": sd["state"], "param_groups": sd["param_groups"], "tag": sd["tag"] + " + returned"}

    handles = [opt.register_state_dict_pre_hook(pre), opt.register_state_dict_post_hook(post_in_place),
               opt.register_state_dict_post_hook(post_returns)]
    first = opt.register_state_dict_pre_hook(lambda o: calls.append("prepended"), prepend=True)
    sd = opt.state_dict()
    assert calls == ["prepended", "pre", "post_in_place", "post_returns"]
    assert sd["tag"] == "in place + returned" and sd["param_groups"][0]["lr"] == 0.123
    for h in [*handles, first]:
        h.remove()
    calls.clear()
    assert "tag" not in opt.state_dict() and calls == []


def test_load_state_dict_hooks_run_with_torchs_semantics() -> None:
    params = _params()
    opt = _two_groups(params)
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    original_groups = sd["param_groups"]
    calls: list[str] = []

    def pre_in_place(o: torch.optim.Optimizer, d: dict) -> None:
        calls.append("pre_in_place")
        d["param_groups"] = copy.deepcopy(d["param_groups"])   # a shallow copy: the caller's dict keeps its own
        d["param_groups"][0]["lr"] = 0.5

    def pre_returns(o: torch.optim.Optimizer, d: dict) -> dict:
        calls.append("pre_returns")
        new = dict(d)
        new["param_groups"] = copy.deepcopy(d["param_groups"])
        new["param_groups"][1]["lr"] = 0.25
        return new

    def post(o: torch.optim.Optimizer) -> None:
        calls.append(f"post lr={o.param_groups[0]['lr']},{o.param_groups[1]['lr']}")

    handles = [opt.register_load_state_dict_pre_hook(pre_in_place), opt.register_load_state_dict_pre_hook(pre_returns),
               opt.register_load_state_dict_post_hook(post)]
    opt.load_state_dict(sd)
    assert calls == ["pre_in_place", "pre_returns", "post lr=0.5,0.25"]
    assert sd["param_groups"] is original_groups and original_groups[0]["lr"] == 0.01   # caller's dict untouched
    assert (opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]) == (0.5, 0.25)
    for h in handles:
        h.remove()


def test_load_pre_hook_result_is_validated_and_a_failed_load_runs_no_post_hook() -> None:
    params = _params()
    opt = _two_groups(params)
    sd = opt.state_dict()
    calls: list[str] = []
    opt.register_load_state_dict_pre_hook(lambda o, d: dict(d, param_groups=d["param_groups"][:1]))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match="1 param groups but the optimizer has 2"):
        opt.load_state_dict(sd)
    assert calls == [] and _same(_snapshot(params, opt), before)


def test_step_hooks_fire() -> None:
    """Sibling guard (these already fired): per-optimizer and global step pre/post hooks."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = _params()
    opt = _two_groups(params)
    calls: list[str] = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append(f"post step={o.param_groups[0]['step']}")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        _grads(params, 0)
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post step=1", "global post"]


# ----------------------------------------------------------------------------- item 9: expert_module_pattern


def test_invalid_expert_module_pattern_names_the_setting() -> None:
    from sharded_shampoo.integrations.trainer_groups import split_expert_groups

    params = _params()
    group = {"params": list(params.values()), "param_names": list(params)}
    with pytest.raises(ValueError, match=r"expert_module_pattern 'experts\[' is not a valid regular expression"):
        split_expert_groups([group], "experts[")
    with pytest.raises(ValueError, match="expert_module_pattern must be a string"):
        split_expert_groups([group], 3)   # type: ignore[arg-type]


def test_invalid_expert_module_pattern_in_the_container_config() -> None:
    pytest.importorskip("torchtitan")
    from sharded_shampoo.integrations.torchtitan import ShardedShampooContainer

    with pytest.raises(ValueError, match=r"ShardedShampooContainer.Config.expert_module_pattern '\(experts'"):
        ShardedShampooContainer.Config(expert_module_pattern="(experts")
    assert ShardedShampooContainer.Config(expert_module_pattern=None).expert_module_pattern is None
