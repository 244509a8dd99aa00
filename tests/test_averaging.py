"""Iterate averaging and weight-decay types: train()/eval(), state dicts, aliases and every bad input.

The update rules themselves are checked against textbook math in test_averaging_dense.py, against
the reference implementation by scripts/benchmarks/parity_vs_reference.py, and across world sizes and
checkpoints in test_distributed.py / test_checkpointing_dist.py.
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from typing import Any

import pytest
import torch

from tests.support.numerics import grad_for
from sharded_shampoo import (AdaGradGrafting, ClassicMomentum, GeneralizedPrimalAveraging, ScheduleFree,
                             ShardedShampoo, WeightDecayType)
from sharded_shampoo.planning.plan import PlanSettings, make_plan
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec

SHAPES = {"w": (6, 5), "b": (7,)}
GPA = GeneralizedPrimalAveraging(eval_interp_coeff=0.9, train_interp_coeff=0.8)
SF = ScheduleFree(train_interp_coeff=0.8)


def _params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}


def _opt(params: dict[str, torch.nn.Parameter], **kw: Any) -> ShardedShampoo:
    kw = dict(dict(lr=0.05, max_preconditioner_dim=8, precondition_frequency=2, epsilon=1e-6,
                   grafting=AdaGradGrafting(epsilon=1e-8)), **kw)
    return ShardedShampoo(list(params.items()), **kw)


def _train(opt: ShardedShampoo, params: dict[str, torch.nn.Parameter], start: int, stop: int) -> None:
    for t in range(start, stop):
        for i, p in enumerate(params.values()):
            p.grad = grad_for(p, i, t)
        opt.step()


def _snapshot(opt: ShardedShampoo, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    def clone(v: Any) -> Any:
        return {k: clone(x) for k, x in v.items()} if isinstance(v, dict) else v.clone()
    return {"params": {n: p.detach().clone() for n, p in params.items()},
            "state": [clone(dict(s)) for s in opt.state.values()],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in copy.deepcopy(opt.param_groups)]}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ----------------------------------------------------------------------------- train / eval


@pytest.mark.parametrize("averaging", [GPA, SF])
def test_eval_and_train_are_idempotent_and_round_trip(averaging):
    params = _params()
    opt = _opt(params, iterate_averaging=averaging)
    _train(opt, params, 0, 5)
    y = {n: p.detach().clone() for n, p in params.items()}
    opt.eval()
    x = {n: p.detach().clone() for n, p in params.items()}
    assert all(float((x[n] - y[n]).abs().max()) > 1e-3 for n in params)     # x really differs from y
    assert opt.eval() is opt and all(torch.equal(p, x[n]) for n, p in params.items())   # idempotent
    assert opt.param_groups[0]["train_mode"] is False
    opt.train()
    opt.train()
    assert opt.param_groups[0]["train_mode"] is True
    for n, p in params.items():
        assert float((p.detach() - y[n]).abs().max()) <= 1e-6 * float(y[n].abs().max())


def test_before_the_first_step_train_and_eval_only_flip_the_mode():
    params = _params()
    opt = _opt(params, iterate_averaging=GPA)
    before = _snapshot(opt, params)
    opt.eval()
    assert opt.param_groups[0]["train_mode"] is False
    opt.train()
    assert _same(before, _snapshot(opt, params))


def test_z_starts_at_the_first_step_from_weights_loaded_after_construction():
    params, loaded = _params(0), _params(1)
    late = _opt(params, iterate_averaging=SF)
    with torch.no_grad():                   # e.g. model.load_state_dict(...) after building the optimizer
        for n, p in params.items():
            p.copy_(loaded[n])
    fresh = _opt(loaded, iterate_averaging=SF)
    for opt, ps in ((late, params), (fresh, loaded)):
        _train(opt, ps, 0, 4)
        opt.eval()
    for n in params:
        assert torch.equal(params[n], loaded[n])
        assert torch.equal(late.state[params[n]]["z"], fresh.state[loaded[n]]["z"])


def test_only_averaging_groups_switch_and_step_raises_in_eval_mode_before_anything_changes():
    params = _params()
    opt = ShardedShampoo([{"params": [("w", params["w"])], "iterate_averaging": SF},
                          {"params": [("b", params["b"])]}], lr=0.05, max_preconditioner_dim=8)
    _train(opt, params, 0, 3)
    b_before = params["b"].detach().clone()
    opt.eval()
    assert torch.equal(params["b"], b_before) and "train_mode" not in opt.param_groups[1]
    before = _snapshot(opt, params)
    for i, p in enumerate(params.values()):
        p.grad = grad_for(p, i, 3)
    with pytest.raises(RuntimeError, match=r"eval mode.*opt\.train\(\)"):
        opt.step()
    assert _same(before, _snapshot(opt, params))   # step counts, lr_sum, statistics, parameters
    opt.train()
    opt.step()
    assert opt.param_groups[0]["step"] == 4 and opt.param_groups[0]["lr_sum"] > 0


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(iterate_averaging=ClassicMomentum(0.9))])
def test_eval_without_averaging_raises_and_changes_nothing_train_is_a_no_op(kw):
    params = _params()
    opt = _opt(params, **kw)
    _train(opt, params, 0, 2)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"iterate_averaging=GeneralizedPrimalAveraging\(\.\.\.\) or "
                                           r"ScheduleFree\(\.\.\.\).*drop the opt\.eval\(\) call"):
        opt.eval()
    assert opt.train() is opt
    assert _same(before, _snapshot(opt, params))


def test_schedule_free_with_zero_learning_rates_stays_finite():
    params = _params()
    opt = _opt(params, iterate_averaging=SF, lr=0.0)
    before = {n: p.detach().clone() for n, p in params.items()}
    for t in range(3):
        for i, p in enumerate(params.values()):
            p.grad = grad_for(p, i, t) + 1.0        # non-zero: a real step, not the init step
        opt.step()
    assert opt.param_groups[0]["lr_sum"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    opt.param_groups[0]["lr"] = 0.05
    _train(opt, params, 3, 5)
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


# ----------------------------------------------------------------------------- aliases


def test_classic_momentum_config_is_the_momentum_arguments():
    a, b = _params(), _params()
    new = _opt(a, iterate_averaging=ClassicMomentum(0.9, dampening=0.1, use_nesterov=True), weight_decay=0.01)
    old = _opt(b, momentum=0.9, dampening=0.1, use_nesterov=True, weight_decay=0.01)
    g = new.param_groups[0]
    assert (g["momentum"], g["dampening"], g["use_nesterov"], g["iterate_averaging"]) == (0.9, 0.1, True, None)
    _train(new, a, 0, 4)
    _train(old, b, 0, 4)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_group_setting_replaces_the_constructors_other_update_stage():
    p = _params()
    opt = ShardedShampoo([{"params": [p["w"]], "momentum": 0.9, "use_nesterov": True},
                          {"params": [p["b"]]}], lr=0.1, iterate_averaging=SF)
    g0, g1 = opt.param_groups
    assert (g0["iterate_averaging"], g0["momentum"], g0["use_nesterov"]) == (None, 0.9, True)
    assert (g1["iterate_averaging"], g1["momentum"]) == (SF, 0.0) and "z" in opt.state[p["b"]]
    opt = ShardedShampoo([{"params": [p["w"]], "iterate_averaging": GPA}, {"params": [p["b"]]}], lr=0.1,
                         momentum=0.9, dampening=0.1)
    g0, g1 = opt.param_groups
    assert (g0["iterate_averaging"], g0["momentum"], g0["dampening"]) == (GPA, 0.0, 0.0)
    assert (g1["iterate_averaging"], g1["momentum"]) == (None, 0.9) and "momentum" in opt.state[p["b"]]
    with pytest.raises(ValueError, match=r"param group 0: iterate_averaging=.* are both set"):
        ShardedShampoo([{"params": [p["w"]], "iterate_averaging": GPA, "momentum": 0.5}], lr=0.1)


@pytest.mark.parametrize("legacy,kind", [(True, WeightDecayType.DECOUPLED), (False, WeightDecayType.L2)])
def test_use_decoupled_weight_decay_is_a_deprecated_alias(legacy, kind):
    a, b = _params(), _params()
    with pytest.warns(FutureWarning, match=f"use_decoupled_weight_decay is deprecated.*weight_decay_type="
                                           f"WeightDecayType.{kind.name}"):
        old = _opt(a, weight_decay=0.1, use_decoupled_weight_decay=legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = _opt(b, weight_decay=0.1, weight_decay_type=kind.value.lower())
    assert old.param_groups[0]["weight_decay_type"] is kind and "use_decoupled_weight_decay" not in old.param_groups[0]
    _train(old, a, 0, 4)
    _train(new, b, 0, 4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.warns(FutureWarning):           # in a group dict too
        grouped = ShardedShampoo([{"params": [a["w"]], "use_decoupled_weight_decay": legacy}], lr=0.1)
    assert grouped.param_groups[0]["weight_decay_type"] is kind


def test_l2_weight_decay_leaves_the_gradient_alone():
    params = _params()
    opt = _opt(params, weight_decay=0.1, weight_decay_type=WeightDecayType.L2)
    grads = {n: grad_for(p, i, 0) for i, (n, p) in enumerate(params.items())}
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    assert all(torch.equal(p.grad, grads[n]) for n, p in params.items())


def test_peak_lr_is_each_groups_lr_at_construction_unless_set():
    p = _params()
    opt = ShardedShampoo([{"params": [p["w"]], "lr": 0.3}, {"params": [p["b"]], "peak_lr": 0.7}], lr=0.1)
    assert [g["peak_lr"] for g in opt.param_groups] == [0.3, 0.7]
    opt = ShardedShampoo([p["w"]], lr=0.1, peak_lr=0.5)
    assert opt.param_groups[0]["peak_lr"] == 0.5


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("make,match", [
    (lambda: ClassicMomentum(momentum=0.0), r"ClassicMomentum\.momentum must be a finite number in \(0.0, 1.0\)"),
    (lambda: ClassicMomentum(momentum=1.0), r"ClassicMomentum\.momentum"),
    (lambda: ClassicMomentum(dampening=1.0), r"ClassicMomentum\.dampening .*\[0.0, 1.0\)"),
    (lambda: ClassicMomentum(use_nesterov=1), r"ClassicMomentum\.use_nesterov must be True or False"),
    (lambda: GeneralizedPrimalAveraging(eval_interp_coeff=1.0), r"eval_interp_coeff .*\[0.0, 1.0\)"),
    (lambda: GeneralizedPrimalAveraging(eval_interp_coeff=-0.1), r"eval_interp_coeff"),
    (lambda: GeneralizedPrimalAveraging(train_interp_coeff=0.0), r"train_interp_coeff .*\(0.0, 1.0\]"),
    (lambda: GeneralizedPrimalAveraging(train_interp_coeff=float("nan")), r"train_interp_coeff"),
    (lambda: ScheduleFree(train_interp_coeff=1.5), r"ScheduleFree\.train_interp_coeff"),
    (lambda: ScheduleFree(eval_coeff_lr_power=-1), r"ScheduleFree\.eval_coeff_lr_power .*\[0.0, inf\]"),
    (lambda: WeightDecayType.parse("l1"), r"weight_decay_type must be .*\['L2', 'DECOUPLED', 'CORRECTED', "
                                          r"'INDEPENDENT'\].*'l1'"),
])
def test_bad_config_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kw,match", [
    (dict(weight_decay_type="decoupled_l2"), r"ShardedShampoo\.weight_decay_type must be"),
    (dict(weight_decay_type=3), r"ShardedShampoo\.weight_decay_type must be"),
    (dict(use_decoupled_weight_decay="yes"), r"use_decoupled_weight_decay must be True or False.*weight_decay_type"),
    (dict(use_decoupled_weight_decay=False, weight_decay_type="DECOUPLED"),
     r"use_decoupled_weight_decay=False .*contradicts weight_decay_type='DECOUPLED'; pass only weight_decay_type"),
    (dict(iterate_averaging=GPA, momentum=0.9), r"iterate_averaging=.* and \{'momentum': 0.9\} are both set"),
    (dict(iterate_averaging=ClassicMomentum(0.9), use_nesterov=True), r"both set.*replaces the momentum"),
    (dict(iterate_averaging="schedule-free"), r"iterate_averaging must be None, ClassicMomentum"),
    (dict(weight_decay=0.1, weight_decay_type="CORRECTED", peak_lr=0.0), r"CORRECTED divides .* set peak_lr"),
    (dict(peak_lr=-1.0), r"ShardedShampoo\.peak_lr must be a finite number"),
])
def test_bad_constructor_arguments_raise_naming_the_argument(kw, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match=match):
            _opt(_params(), **kw)


@pytest.mark.parametrize("key,value,match", [
    ("iterate_averaging", SF, r"changed \['iterate_averaging'\]"),
    ("weight_decay_type", "l3", r"weight_decay_type must be"),
    ("use_decoupled_weight_decay", False, r"use_decoupled_weight_decay is deprecated and read only at "
                                          r"construction; set the group's 'weight_decay_type'"),
    ("peak_lr", float("inf"), r"peak_lr"),
    ("train_mode", "yes", r"'train_mode' must be True or False"),
])
def test_bad_values_set_in_a_group_raise_at_step_before_anything_changes(key, value, match):
    params = _params()
    opt = _opt(params, iterate_averaging=GPA, weight_decay=0.1)
    _train(opt, params, 0, 2)
    opt.param_groups[0][key] = value
    for i, p in enumerate(params.values()):
        p.grad = grad_for(p, i, 2)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert _same(before, _snapshot(opt, params))


# ----------------------------------------------------------------------------- state dicts


def _roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)     # enums and configs are stored as plain values


@pytest.mark.parametrize("averaging", [GPA, SF])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_state_dict_saved_in_either_mode_resumes_exactly(averaging, mode):
    params = _params()
    opt = _opt(params, iterate_averaging=averaging, weight_decay=0.01, weight_decay_type="INDEPENDENT")
    _train(opt, params, 0, 4)
    if mode == "eval":
        opt.eval()
    sd = _roundtrip(opt.state_dict())
    model_sd = {n: p.detach().clone() for n, p in params.items()}       # saved with it, in the same mode
    assert [g["train_mode"] for g in sd["param_groups"]] == [mode == "train"]
    opt.train()
    _train(opt, params, 4, 8)                                           # the uninterrupted run

    resumed = _params(7)
    new = _opt(resumed, iterate_averaging=averaging, weight_decay=0.01, weight_decay_type="INDEPENDENT")
    with torch.no_grad():
        for n, p in resumed.items():
            p.copy_(model_sd[n])
    new.load_state_dict(sd)
    assert new.param_groups[0]["train_mode"] is (mode == "train")     # the checkpoint's mode is adopted
    assert all(torch.equal(p, model_sd[n]) for n, p in resumed.items())  # loading never moves parameters
    new.train()
    _train(new, resumed, 4, 8)
    for n in params:
        assert torch.equal(resumed[n], params[n]), n


def test_state_dict_checks_mode_and_averaging_before_anything_changes():
    params = _params()
    opt = ShardedShampoo([{"params": [("w", params["w"])], "iterate_averaging": GPA},
                          {"params": [("b", params["b"])], "iterate_averaging": SF}], lr=0.05)
    _train(opt, params, 0, 2)
    sd = opt.state_dict()
    before = _snapshot(opt, params)
    mixed = copy.deepcopy(sd)
    mixed["param_groups"][1]["train_mode"] = False
    with pytest.raises(ValueError, match="different modes"):
        opt.load_state_dict(mixed)
    other = copy.deepcopy(sd)
    other["param_groups"][0]["iterate_averaging"] = {"__config__": "GeneralizedPrimalAveraging",
                                                     "eval_interp_coeff": 0.5}
    with pytest.raises(ValueError, match=r"param group 0: iterate_averaging differs"):
        opt.load_state_dict(other)
    assert _same(before, _snapshot(opt, params))


def test_state_dict_written_before_weight_decay_type_loads():
    params = _params()
    opt = _opt(params, weight_decay=0.1, weight_decay_type="L2")
    _train(opt, params, 0, 2)
    sd = opt.state_dict()
    for g in sd["param_groups"]:          # what earlier versions wrote
        for key in ("weight_decay_type", "peak_lr", "iterate_averaging"):
            g.pop(key)
        g["use_decoupled_weight_decay"] = False
    new = _opt(_params(), weight_decay=0.1)
    new.load_state_dict(sd)
    g = new.param_groups[0]
    assert g["weight_decay_type"] is WeightDecayType.L2 and "use_decoupled_weight_decay" not in g


# ----------------------------------------------------------------------------- planner


def test_planned_z_bytes_are_the_allocated_ones():
    params = {"w": torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)),
              "b": torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))}
    opt = ShardedShampoo([{"params": [("w", params["w"])], "iterate_averaging": SF},
                          {"params": [("b", params["b"])]}], lr=0.05)
    (rank,) = opt.plan.ranks
    assert rank.state_bytes_by_kind["averaging"] == 6 * 5 * 8 == opt.state[params["w"]]["z"].nbytes
    assert "z" not in opt.state[params["b"]]
    plan = make_plan([ParamSpec("w", (64, 32), torch.bfloat16, True)], MeshSpec((4,)),
                     PlanSettings(primal_averaging=True))
    assert [r.state_bytes_by_kind["averaging"] for r in plan.ranks] == [16 * 32 * 2] * 4
    with pytest.raises(ValueError, match=re.escape("PlanSettings.momentum=0.9 and PlanSettings.primal_averaging")):
        PlanSettings(primal_averaging=True, momentum=0.9)


def test_plan_command_counts_z_and_refuses_it_with_momentum(tmp_path, capsys):
    import json

    from sharded_shampoo.dryrun.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--iterate-averaging", "schedule-free",
                 "--json", str(out), "--json-no-blocks"]) == 0
    ranks = json.loads(out.read_text())["ranks"]
    assert all(r["optimizer_state_breakdown"]["averaging"] == r["param_bytes"] > 0 for r in ranks)
    assert all(r["optimizer_state_breakdown"]["momentum"] == 0 for r in ranks)
    assert "averaging" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--iterate-averaging", "gpa",
                 "--momentum", "0.9"]) == 2
    assert "--momentum=0.9 and --iterate-averaging gpa/schedule-free exclude each other" in capsys.readouterr().err
