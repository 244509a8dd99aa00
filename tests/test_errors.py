"""Every bad input gets a clear error naming the field, and a failed call changes nothing.

Also: root failures (keep the previous root, count, raise after too many in a row), no global
torch setting is changed, and nothing is written to disk.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import math
import re

import pytest
import torch

import sharded_shampoo.compute.refresh as preconditioner_mod
from tests.support.numerics import make_params, set_grads
from sharded_shampoo import NonFiniteGradientError, RootFailureError, ShardedShampoo, unpack_symmetric
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig,
                                    EigenvalueCorrectedShampoo, EighRootConfig, RMSpropGrafting, RootInverseShampoo,
                                    SGDGrafting)
from sharded_shampoo.compute.matrix_functions import inverse_root_eigh

SHAPES = {"w": (6, 5), "b": (5,), "v": (4, 4)}


def _params(dtype=torch.float32):
    return make_params(dtype, shapes=SHAPES)


def _opt(params, **kw):
    kw.setdefault("max_preconditioner_dim", 8)
    kw.setdefault("precondition_frequency", 2)
    kw.setdefault("epsilon", 1e-6)
    return ShardedShampoo(list(params.items()), **kw)


def _snapshot(opt: ShardedShampoo, params: dict) -> dict:
    """Deep copy of parameters, every optimizer state tensor and the param-group values."""
    def copy_state(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, dict):
            return {k: copy_state(x) for k, x in v.items()}
        return copy.deepcopy(v)
    return {
        "params": {n: p.detach().clone() for n, p in params.items()},
        "state": {id(p): copy_state(dict(s)) for p, s in opt.state.items()},
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _assert_same(a: dict, b: dict) -> None:
    def eq(x, y, path):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{path} changed"
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f"{path} keys changed"
            for k in x:
                eq(x[k], y[k], f"{path}.{k}")
        else:
            assert x == y, f"{path} changed: {x!r} -> {y!r}"
    eq(a, b, "")


def _train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params.values(), t)
        opt.step()


# ----------------------------------------------------------------------------- hyperparameters


BAD_KWARGS = [
    ("lr", -1.0, "lr"), ("lr", math.nan, "lr"), ("lr", math.inf, "lr"), ("lr", "0.1", "lr"),
    ("betas", (1.0, 0.9), "betas[0]"), ("betas", (-0.1, 0.9), "betas[0]"), ("betas", (0.9, 0.0), "betas[1]"),
    ("betas", (0.9, 1.5), "betas[1]"), ("betas", (0.9,), "betas"), ("betas", (0.9, math.nan), "betas[1]"),
    ("epsilon", 0.0, "epsilon"), ("epsilon", -1e-8, "epsilon"), ("epsilon", math.nan, "epsilon"),
    ("weight_decay", -0.1, "weight_decay"), ("weight_decay", math.inf, "weight_decay"),
    ("momentum", 1.0, "momentum"), ("momentum", -0.5, "momentum"), ("dampening", 1.5, "dampening"),
    ("max_preconditioner_dim", 0, "max_preconditioner_dim"), ("max_preconditioner_dim", 2.5, "max_preconditioner_dim"),
    ("max_preconditioner_dim", True, "max_preconditioner_dim"), ("max_preconditioner_dim", -4, "max_preconditioner_dim"),
    ("precondition_frequency", 0, "precondition_frequency"), ("precondition_frequency", 1.0, "precondition_frequency"),
    ("start_preconditioning_step", 0, "start_preconditioning_step"),
    ("start_preconditioning_step", -3, "start_preconditioning_step"),
    ("start_preconditioning_step", 2.5, "start_preconditioning_step"),
    ("grafting", "adagrad", "grafting"), ("grafting", AdaGradGrafting, "grafting"),
    ("grafting", RootInverseShampoo(), "grafting"),
    ("preconditioner", "shampoo", "preconditioner"), ("preconditioner", AdaGradGrafting(), "preconditioner"),
    ("preconditioner", None, "preconditioner"),
    ("blocking", {"merge_dims": False}, "blocking"),
    ("nonfinite_grads", "explode", "nonfinite_grads"), ("comm_dtype", torch.int32, "comm_dtype"),
]


@pytest.mark.parametrize("name,value,field", BAD_KWARGS, ids=[f"{n}={v!r}" for n, v, _ in BAD_KWARGS])
def test_bad_hyperparameter_names_the_field(name, value, field):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        _opt(_params(), **{name: value})
    assert repr(value)[:20] in str(info.value) or name in ("grafting", "preconditioner", "blocking", "betas",
                                                            "comm_dtype")


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="use_nesterov"):
        _opt(_params(), use_nesterov=True)
    _opt(_params(), use_nesterov=True, momentum=0.9)  # fine with momentum


def test_bad_value_in_param_group_dict_names_the_field():
    p = _params()
    with pytest.raises(ValueError, match="epsilon"):
        ShardedShampoo([{"params": [p["w"]], "epsilon": -1.0}, {"params": [p["b"], p["v"]]}])


def test_empty_or_single_tensor_params():
    with pytest.raises(ValueError, match="empty"):
        ShardedShampoo([])
    with pytest.raises(TypeError, match="single Tensor"):
        ShardedShampoo(torch.nn.Parameter(torch.zeros(3)))


def test_complex_parameter_rejected():
    with pytest.raises(ValueError, match="complex"):
        ShardedShampoo([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))])


def test_non_float_parameter_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        ShardedShampoo([torch.zeros(3, 3, dtype=torch.int64)])


def test_duplicate_names_rejected():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="duplicate"):
        ShardedShampoo([("x", a), ("x", b)])


# ----------------------------------------------------------------------------- config dataclasses


BAD_CONFIGS = [
    (lambda: AdaGradGrafting(epsilon=0.0), "AdaGradGrafting.epsilon"),
    (lambda: AdaGradGrafting(epsilon=-1.0), "AdaGradGrafting.epsilon"),
    (lambda: AdaGradGrafting(epsilon=math.nan), "AdaGradGrafting.epsilon"),
    (lambda: RMSpropGrafting(beta2=1.0), "RMSpropGrafting.beta2"),
    (lambda: RMSpropGrafting(beta2=0.0), "RMSpropGrafting.beta2"),
    (lambda: RMSpropGrafting(epsilon=0.0), "RMSpropGrafting.epsilon"),
    (lambda: AdamGrafting(beta2=1.0), "AdamGrafting.beta2"),
    (lambda: AdamGrafting(beta2=-0.5), "AdamGrafting.beta2"),
    (lambda: AdamGrafting(epsilon=-1e-8), "AdamGrafting.epsilon"),
    (lambda: CoupledNewtonConfig(max_iterations=0), "CoupledNewtonConfig.max_iterations"),
    (lambda: CoupledNewtonConfig(max_iterations=2.5), "CoupledNewtonConfig.max_iterations"),
    (lambda: CoupledNewtonConfig(max_iterations=True), "CoupledNewtonConfig.max_iterations"),
    (lambda: CoupledNewtonConfig(tolerance=0.0), "CoupledNewtonConfig.tolerance"),
    (lambda: CoupledNewtonConfig(tolerance=2.0), "CoupledNewtonConfig.tolerance"),
    (lambda: RootInverseShampoo(factor_dtype=torch.float16), "RootInverseShampoo.factor_dtype"),
    (lambda: RootInverseShampoo(factor_dtype=torch.bfloat16), "RootInverseShampoo.factor_dtype"),
    (lambda: RootInverseShampoo(max_consecutive_root_failures=0), "RootInverseShampoo.max_consecutive_root_failures"),
    (lambda: RootInverseShampoo(root="eigh"), "RootInverseShampoo.root"),
    (lambda: RootInverseShampoo(inverse_exponent_override={0: 0.5}), "RootInverseShampoo.inverse_exponent_override"),
    (lambda: RootInverseShampoo(inverse_exponent_override={2: {2: 0.5}}),
     "RootInverseShampoo.inverse_exponent_override[2]"),
    (lambda: RootInverseShampoo(inverse_exponent_override={2: -0.5}),
     "RootInverseShampoo.inverse_exponent_override[2]"),
    (lambda: RootInverseShampoo(inverse_exponent_override=[0.5]), "RootInverseShampoo.inverse_exponent_override"),
    (lambda: RootInverseShampoo(root=CoupledNewtonConfig(), inverse_exponent_override={2: 0.3}),
     "RootInverseShampoo.inverse_exponent_override[2]"),
    (lambda: EigenvalueCorrectedShampoo(inverse_exponent_override={2: {0: 0.5, 1: 0.25}}),
     "EigenvalueCorrectedShampoo.inverse_exponent_override[2]"),
    (lambda: EigenvalueCorrectedShampoo(factor_dtype=torch.float16), "EigenvalueCorrectedShampoo.factor_dtype"),
    (lambda: EigenvalueCorrectedShampoo(max_consecutive_root_failures=-1),
     "EigenvalueCorrectedShampoo.max_consecutive_root_failures"),
]


@pytest.mark.parametrize("make,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


def test_valid_configs_construct_and_are_frozen():
    configs = [SGDGrafting(), AdaGradGrafting(epsilon=1e-3), RMSpropGrafting(beta2=0.5), AdamGrafting(beta2=0.9),
               EighRootConfig(make_positive_semidefinite=False), CoupledNewtonConfig(max_iterations=5, tolerance=1e-3),
               RootInverseShampoo(root=CoupledNewtonConfig(), inverse_exponent_override={2: 0.25, 3: {0: 0.0}}),
               EigenvalueCorrectedShampoo(inverse_exponent_override={2: {1: 0.0}}), BlockingConfig(merge_dims=False)]
    for c in configs:
        fields = dataclasses.fields(c)
        if fields:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(c, fields[0].name, getattr(c, fields[0].name))
        assert hash(c) == hash(copy.deepcopy(c)) and c == copy.deepcopy(c)
    # equality of exponent overrides does not depend on insertion order
    assert RootInverseShampoo(inverse_exponent_override={2: 0.25, 3: 0.5}) == \
        RootInverseShampoo(inverse_exponent_override={3: 0.5, 2: 0.25})


# ----------------------------------------------------------------------------- gradients


def test_sparse_gradient_names_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 2)
    named = [("emb." + n, p) for n, p in emb.named_parameters()] + [("lin." + n, p) for n, p in lin.named_parameters()]
    opt = ShardedShampoo(named, lr=0.1)
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    before = _snapshot(opt, dict(named))
    with pytest.raises(ValueError, match=r"sparse.*emb\.weight|emb\.weight.*sparse"):
        opt.step()
    _assert_same(before, _snapshot(opt, dict(named)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_raise_names_parameter_and_changes_nothing(bad):
    params = _params()
    opt = _opt(params, momentum=0.9, betas=(0.9, 0.99), grafting=AdamGrafting())
    _train(opt, params, 3)
    set_grads(params.values(), 3)
    params["v"].grad[1, 2] = bad
    before = _snapshot(opt, params)
    with pytest.raises(NonFiniteGradientError, match=r"\['v'\]") as info:
        opt.step()
    assert "'w'" not in str(info.value) and "'b'" not in str(info.value)
    _assert_same(before, _snapshot(opt, params))


def test_nonfinite_gradient_skip_leaves_params_state_and_step_untouched():
    params = _params()
    opt = _opt(params, momentum=0.9, betas=(0.9, 0.99), grafting=AdamGrafting(), nonfinite_grads="skip")
    ref_params = make_params(torch.float32, shapes=SHAPES)
    ref = _opt(ref_params, momentum=0.9, betas=(0.9, 0.99), grafting=AdamGrafting())
    _train(opt, params, 3)
    _train(ref, ref_params, 3)
    set_grads(params.values(), 99)
    params["w"].grad[0, 0] = math.nan
    before = _snapshot(opt, params)
    opt.step()
    assert opt.last_step_skipped
    _assert_same(before, _snapshot(opt, params))
    assert opt.param_groups[0]["step"] == 3
    # training continues exactly as if the bad step never happened
    _train(opt, params, 3, start=3)
    _train(ref, ref_params, 3, start=3)
    for n in params:
        assert torch.equal(params[n], ref_params[n]), n


def test_large_finite_gradient_is_not_reported_as_nonfinite():
    # 2-norm of 1e4 entries of 1e3 is 1e5 > fp16 max: the check must not overflow on finite values
    p = torch.nn.Parameter(torch.zeros(100, 100, dtype=torch.float16))
    opt = ShardedShampoo([("w", p)], lr=1e-3, max_preconditioner_dim=128)
    p.grad = torch.full((100, 100), 1000.0, dtype=torch.float16)
    opt.step()
    assert bool(torch.isfinite(p).all()) and float(p.detach().abs().max()) > 0


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_overflowing_gradient_follows_the_nonfinite_policy(factor_dtype):
    """randn * 1e30 is finite, but its squares overflow fp32: the factors would become inf and every
    later update 0 (issue: silent stall). It must follow nonfinite_grads and never reach the state."""
    pre = RootInverseShampoo(factor_dtype=factor_dtype)
    q = torch.nn.Parameter(torch.randn(10, 10))
    opt = ShardedShampoo([("q", q)], lr=1e-3, precondition_frequency=1, preconditioner=pre)
    before = q.detach().clone()
    q.grad = torch.randn(10, 10) * 1e30
    if factor_dtype == torch.float64:   # fp64 statistics hold 1e60: a legitimate (if odd) gradient
        opt.step()
        assert all(bool(torch.isfinite(t).all()) for t in opt.state[q]["block_0"].values())
        return
    with pytest.raises(NonFiniteGradientError, match="overflow"):
        opt.step()
    assert torch.equal(q.detach(), before) and int(opt.state[q]["block_0"]["step"]) == 0
    skipper = ShardedShampoo([("q", q)], lr=1e-3, nonfinite_grads="skip", precondition_frequency=1)
    skipper.step()
    assert skipper.last_step_skipped and torch.equal(q.detach(), before)
    assert float(skipper.state[q]["block_0"]["factor_0"].abs().max()) == 0.0
    q.grad = torch.randn(10, 10)
    for _ in range(3):
        skipper.step()
    state = skipper.state[q]["block_0"]
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    assert not torch.equal(q.detach(), before)


# ----------------------------------------------------------------------------- after construction


def test_add_param_group_after_construction():
    params = _params()
    opt = _opt(params)
    with pytest.raises(NotImplementedError, match="add"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("key,value", [("max_preconditioner_dim", 4), ("grafting", SGDGrafting()),
                                       ("preconditioner", EigenvalueCorrectedShampoo()),
                                       ("blocking", BlockingConfig(merge_dims=False)),
                                       ("betas", (0.0, 0.999)), ("momentum", 0.0)])
def test_structural_change_in_param_group_raises_before_anything_changes(key, value):
    params = _params()
    opt = _opt(params, betas=(0.9, 0.999), momentum=0.5)
    _train(opt, params, 2)
    opt.param_groups[0][key] = value
    set_grads(params.values(), 2)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=re.escape(key) if key not in ("betas", "momentum") else "has_"):
        opt.step()
    _assert_same(before, _snapshot(opt, params))


def test_invalid_value_set_in_param_group_is_caught_at_step():
    params = _params()
    opt = _opt(params)
    opt.param_groups[0]["lr"] = -0.1
    set_grads(params.values(), 0)
    with pytest.raises(ValueError, match="lr"):
        opt.step()


# ----------------------------------------------------------------------------- root failures


def _root_opt(params, **kw):
    return _opt(params, precondition_frequency=1, start_preconditioning_step=1,
                preconditioner=RootInverseShampoo(max_consecutive_root_failures=3), **kw)


def test_nonfinite_factor_keeps_previous_root_counts_and_raises():
    params = _params()
    opt = _root_opt(params)
    _train(opt, params, 2)
    w_state = opt.state[params["w"]]["block_0"]
    good_root0 = w_state["root_0"].clone()
    root1 = w_state["root_1"].clone()
    v_root_before = opt.state[params["v"]]["block_0"]["root_0"].clone()
    w_state["factor_0"].view(-1)[0] = math.inf  # a view into the stacked state (entry (0, 0), packed or not)
    for failures in (1, 2):
        set_grads(params.values(), 2 + failures)
        opt.step()
        assert int(w_state["root_failures"]) == failures
        # roots are kept per factor: the failed one keeps its previous value, the finite one refreshes
        assert torch.equal(w_state["root_0"], good_root0), "root_0 was not kept"
        assert not torch.equal(w_state["root_1"], root1), "root_1 should still refresh"
        root1 = w_state["root_1"].clone()
        assert all(bool(torch.isfinite(p).all()) for p in params.values())
        # other blocks keep refreshing their roots and do not count failures
        assert int(opt.state[params["v"]]["block_0"]["root_failures"]) == 0
    assert not torch.equal(opt.state[params["v"]]["block_0"]["root_0"], v_root_before)
    set_grads(params.values(), 5)
    with pytest.raises(RootFailureError, match=r"w\.block_0") as info:
        opt.step()
    assert "v.block_0" not in str(info.value) and "3" in str(info.value)


def test_root_failure_error_leaves_a_consistent_state():
    params = _params()
    opt = _root_opt(params)
    _train(opt, params, 2)
    opt.state[params["v"]]["block_0"]["factor_0"].fill_(math.inf)
    _train(opt, params, 2, start=2)  # failures 1, 2
    before = _snapshot(opt, params)
    set_grads(params.values(), 4)
    with pytest.raises(RootFailureError):
        opt.step()
    after = _snapshot(opt, params)
    advanced = opt.param_groups[0]["step"] == before["groups"][0]["step"] + 1
    for p in params.values():
        for key, s in opt.state[p].items():
            if isinstance(s, dict):
                was = int(before["state"][id(p)][key]["step"])
                assert int(s["step"]) == was + int(advanced), f"block step of {key} is inconsistent with the group"
    if not advanced:
        _assert_same(before, after)


def test_failure_counter_is_consecutive(monkeypatch):
    params = _params()
    opt = _root_opt(params)
    real = preconditioner_mod.inverse_root_eigh
    fail = {"on": False}

    def flaky(A, *args, **kwargs):
        root, ok = real(A, *args, **kwargs)
        if fail["on"]:
            root = torch.full_like(root, math.nan)
            ok = torch.zeros_like(ok)
        return root, ok

    monkeypatch.setattr(preconditioner_mod, "inverse_root_eigh", flaky)
    _train(opt, params, 2)
    counter = opt.state[params["w"]]["block_0"]["root_failures"]
    for t, on in enumerate([True, True, False, True, True, False], start=2):
        fail["on"] = on
        set_grads(params.values(), t)
        opt.step()
        assert int(counter) == (0 if not on else (1 if t in (2, 5) else 2)), t
        assert all(bool(torch.isfinite(p).all()) for p in params.values())


def test_root_failure_in_masked_bucket_names_the_right_block():
    # "a", "b", "c" share one bucket; "a" has no gradient, so the bucket runs its masked path
    params = make_params(torch.float32, shapes={"a": (4, 4), "b": (4, 4), "c": (4, 4)})
    opt = _root_opt(params)
    assert len(opt.runtime.buckets) == 1 and len(opt.runtime.buckets[0].blocks) == 3
    _train(opt, params, 1)
    opt.state[params["c"]]["block_0"]["factor_1"].fill_(math.nan)
    with pytest.raises(RootFailureError, match=r"\['c\.block_0'\]"):
        for t in range(1, 6):
            set_grads(params.values(), t, skip=(0,))
            opt.step()


def test_eigh_failure_retried_in_float64(monkeypatch):
    A = torch.randn(3, 5, 5, dtype=torch.float64)
    A = A @ A.mT + 0.1 * torch.eye(5, dtype=torch.float64)
    expected, _ = inverse_root_eigh(A, 0.25, 1e-6)
    real = torch.linalg.eigh

    def eigh_fp32_fails(X, *a, **k):
        if X.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real(X, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_fp32_fails)
    root, ok = inverse_root_eigh(A.float(), 0.25, 1e-6, EighRootConfig(retry_in_float64=True))
    assert bool(ok.all())
    torch.testing.assert_close(root.double(), expected, rtol=1e-5, atol=1e-5)
    root, ok = inverse_root_eigh(A.float(), 0.25, 1e-6, EighRootConfig(retry_in_float64=False))
    assert not bool(ok.any())


def test_block_without_root_uses_the_identity_root():
    """A parameter with no gradient on the amortized step has no root yet: its roots are still the
    initial identity (as in the reference), so its next step is M rescaled to the grafting norm."""
    params = make_params(torch.float32, shapes={"a": (6, 5), "b": (8, 8)})
    opt = ShardedShampoo(list(params.items()), lr=0.01, precondition_frequency=4, max_preconditioner_dim=8,
                         grafting=SGDGrafting(), betas=(0.0, 1.0))
    for t in range(4):
        set_grads(params.values(), t, skip=(1,) if t == 3 else ())  # "b" misses the amortized step 4
        opt.step()
    b = params["b"]
    torch.testing.assert_close(unpack_symmetric(opt.state[b]["block_0"]["root_0"]), torch.eye(8))
    set_grads(params.values(), 4)
    before = b.detach().clone()
    opt.step()
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b.detach(), before - 0.01 * b.grad, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- state dict mismatches


def _trained(shapes=SHAPES, **kw):
    params = make_params(torch.float32, shapes=shapes)
    opt = _opt(params, **kw)
    _train(opt, params, 3)
    return params, opt


@pytest.mark.parametrize("case", ["shape", "names", "count", "max_dim", "grafting", "preconditioner", "momentum",
                                  "beta1", "groups", "garbage", "tensor_shape"])
def test_load_state_dict_mismatch_raises_and_leaves_state_untouched(case):
    src_params, src = _trained()
    sd = src.state_dict()
    shapes = dict(SHAPES)
    kw = {}
    if case == "shape":
        shapes["v"] = (4, 3)
    elif case == "names":
        shapes = {"w": (6, 5), "b": (5,), "u": (4, 4)}
    elif case == "count":
        shapes["extra"] = (2,)
    elif case == "max_dim":
        kw["max_preconditioner_dim"] = 16
    elif case == "grafting":
        kw["grafting"] = AdamGrafting()
    elif case == "preconditioner":
        kw["preconditioner"] = RootInverseShampoo(factor_dtype=torch.float64)
    elif case == "momentum":
        kw["momentum"] = 0.9
    elif case == "beta1":
        kw["betas"] = (0.0, 0.999)
    elif case == "groups":
        sd = {"state": sd["state"], "param_groups": sd["param_groups"] * 2}
    elif case == "garbage":
        sd = {"foo": 1}
    elif case == "tensor_shape":
        sd = copy.deepcopy(sd)
        sd["state"][0]["block_0"]["factor_0"] = torch.zeros(3, 3)
    params = make_params(torch.float32, shapes=shapes, seed=1)
    opt = _opt(params, **kw)
    _train(opt, params, 2)
    opt.param_groups[0]["lr"] = 0.123  # a loaded checkpoint would overwrite this
    before = _snapshot(opt, params)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    msg = str(info.value)
    expected = {"shape": "v", "names": "u", "count": "parameters", "max_dim": "max_preconditioner_dim",
                "grafting": "grafting", "preconditioner": "preconditioner", "momentum": "momentum",
                "beta1": "filtered_grad", "groups": "param groups", "garbage": "state",
                "tensor_shape": "factor_0"}[case]
    assert expected in msg, msg
    _assert_same(before, _snapshot(opt, params))


# ----------------------------------------------------------------------------- global state & disk


def _globals() -> dict:
    from sharded_shampoo._torch_compat import print_options

    return {
        "default_dtype": torch.get_default_dtype(),
        "print": dict(vars(print_options())),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
        "anomaly": torch.is_anomaly_enabled(),
    }


def test_no_global_torch_setting_changed_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = []
    real_open = builtins.open

    def spy_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    before = _globals()
    configs = [dict(), dict(preconditioner=RootInverseShampoo(root=CoupledNewtonConfig())),
               dict(preconditioner=EigenvalueCorrectedShampoo(), grafting=None),
               dict(preconditioner=RootInverseShampoo(max_consecutive_root_failures=1))]
    for kw in configs:
        params = _params()
        opt = _opt(params, momentum=0.9, precondition_frequency=1, **kw)
        _train(opt, params, 3)
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        repr(opt)
    # a failing root and a non-finite gradient take their error paths
    params = _params()
    opt = _root_opt(params)
    _train(opt, params, 1)
    opt.state[params["w"]]["block_0"]["factor_0"].fill_(math.inf)
    with pytest.raises(RootFailureError):
        _train(opt, params, 4, start=1)
    params["b"].grad = torch.full((5,), math.nan)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert _globals() == before
    assert list(tmp_path.iterdir()) == []
    assert written == []


def test_mesh_argument_is_validated():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="mesh must be None, 'local' or a DeviceMesh"):
        ShardedShampoo([p], mesh="global")
    with pytest.raises(ValueError, match="mesh must be None, 'local' or a DeviceMesh"):
        ShardedShampoo([p], mesh=object())
    opt = ShardedShampoo([p], mesh="local")
    assert opt.plan.mesh.world_size == 1


def test_unsupported_placements_raise_naming_the_parameter():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from sharded_shampoo._torch_compat import StridedShard

    from sharded_shampoo.runtime.placements import check_placements

    # every Shard / _StridedShard / Replicate mix is data for the router (tensor and expert parallel)
    for placements, ndim in (((Shard(0),), 1), ((Replicate(), Shard(0)), 2), ((Shard(0), Shard(1)), 2),
                             ((StridedShard(0, split_factor=2), Shard(0)), 2), ((Shard(0), Replicate()), 2)):
        assert check_placements("w", placements, ndim) == placements
    with pytest.raises(ValueError, match=r"'layers.0.w'.*Partial"):
        check_placements("layers.0.w", (Shard(0), Partial()), 2)
    with pytest.raises(ValueError, match=r"'layers.0.w'"):
        check_placements("layers.0.w", (Shard(3),), 2)
