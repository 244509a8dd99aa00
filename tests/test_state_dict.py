"""state_dict round trips, config serialisation, per-group hyperparameters and LR schedulers."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.support.numerics import grad_for, make_params, set_grads
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig,
                                    EigenvalueCorrectedShampoo, EighRootConfig, RMSpropGrafting, RootInverseShampoo,
                                    SGDGrafting, config_from_dict, config_to_dict)

SHAPES = {"w": (6, 5), "conv": (4, 3, 3, 2), "b": (5,), "big": (20, 6), "scalar": (), "empty": (0, 4)}

CONFIGS = {
    "default": dict(),
    "adam-momentum": dict(betas=(0.9, 0.99), grafting=AdamGrafting(), momentum=0.9, use_nesterov=True,
                          weight_decay=0.01),
    "newton-l2": dict(preconditioner=RootInverseShampoo(root=CoupledNewtonConfig()), weight_decay=0.01,
                      use_decoupled_weight_decay=False, grafting=RMSpropGrafting()),
    "eigen": dict(preconditioner=EigenvalueCorrectedShampoo(), grafting=None, betas=(0.9, 0.95)),
    "override-1d-off": dict(preconditioner=RootInverseShampoo(inverse_exponent_override={2: {0: 0.0}}),
                            blocking=BlockingConfig(precondition_1d=False), grafting=SGDGrafting()),
}


def _make(params, **kw):
    kw.setdefault("max_preconditioner_dim", 8)
    kw.setdefault("precondition_frequency", 3)
    kw.setdefault("epsilon", 1e-6)
    kw.setdefault("lr", 0.01)
    return ShardedShampoo(list(params.items()), **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_continues_bitwise(name):
    kw = CONFIGS[name]
    params = make_params(torch.float32, shapes=SHAPES)
    opt = _make(params, **kw)
    for t in range(5):
        set_grads(params.values(), t)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    params2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt2 = _make(params2, **kw)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["step"] == 5
    for t in range(5, 10):
        set_grads(params.values(), t)
        set_grads(params2.values(), t)
        opt.step()
        opt2.step()
        for n in params:
            assert torch.equal(params[n], params2[n]), f"{name}: {n} differs after step {t + 1}"
    # and the whole state is identical too
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    assert torch.equal(vv, s2["state"][i][k][kk]), (i, k, kk)
            else:
                assert torch.equal(v, s2["state"][i][k]), (i, k)


def test_state_dict_is_a_snapshot_safe_copy_after_save():
    """What torch.save wrote does not change when training continues."""
    params = make_params(torch.float32, shapes=SHAPES)
    opt = _make(params)
    set_grads(params.values(), 0)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = buf.getvalue()
    set_grads(params.values(), 1)
    opt.step()
    again = torch.load(io.BytesIO(saved), weights_only=True)
    assert int(again["state"][0]["block_0"]["step"]) == 1
    assert again["param_groups"][0]["step"] == 1


def test_state_dict_keys_and_layout():
    params = make_params(torch.float32, shapes=SHAPES)
    opt = _make(params, momentum=0.5, betas=(0.9, 0.999))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3, 4, 5]
    assert sd["param_groups"][0]["param_names"] == list(SHAPES)
    # "big" (20, 6) with max 8 -> 3 x 1 blocks; keys never contain a rank
    assert sorted(k for k in sd["state"][3] if k.startswith("block_")) == ["block_0", "block_1", "block_2"]
    assert "momentum" in sd["state"][3]
    assert set(sd["state"][0]["block_0"]) >= {"step", "factor_0", "factor_1", "root_0", "root_1", "grafting",
                                               "filtered_grad", "root_failures"}
    # configs are plain data (loadable with weights_only=True)
    assert isinstance(sd["param_groups"][0]["grafting"], dict)
    assert isinstance(sd["param_groups"][0]["preconditioner"], dict)


CONFIG_OBJECTS = [
    SGDGrafting(), AdaGradGrafting(epsilon=1e-7), RMSpropGrafting(beta2=0.5, epsilon=1e-4),
    AdamGrafting(beta2=0.9), EighRootConfig(make_positive_semidefinite=False, retry_in_float64=False),
    CoupledNewtonConfig(max_iterations=7, tolerance=1e-3), BlockingConfig(precondition_1d=False, merge_dims=False),
    RootInverseShampoo(), RootInverseShampoo(root=CoupledNewtonConfig(max_iterations=3),
                                             inverse_exponent_override={2: {0: 0.0, 1: 0.5}, 3: 0.25},
                                             factor_dtype=torch.float64, max_consecutive_root_failures=4),
    EigenvalueCorrectedShampoo(inverse_exponent_override={2: {1: 0.0}}, factor_dtype=torch.float64),
    None,
]


@pytest.mark.parametrize("config", CONFIG_OBJECTS, ids=[type(c).__name__ for c in CONFIG_OBJECTS])
def test_config_round_trip(config):
    data = config_to_dict(config)
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    back = config_from_dict(torch.load(buf, weights_only=True))
    assert back == config and type(back) is type(config)
    if config is not None:
        assert hash(back) == hash(config)
        if hasattr(config, "inverse_exponent_override"):
            assert dict(back.inverse_exponent_override) == dict(config.inverse_exponent_override)
            assert back.factor_dtype == config.factor_dtype


def test_unknown_config_class_in_checkpoint():
    with pytest.raises(ValueError, match="unknown config class"):
        config_from_dict({"__config__": "os.system"})


# ----------------------------------------------------------------------------- param groups & schedulers


def test_param_groups_with_own_hyperparameters_match_separate_optimizers():
    params = make_params(torch.float64, shapes=SHAPES)
    g1 = dict(lr=0.05, betas=(0.9, 0.99), grafting=AdamGrafting(), weight_decay=0.1, precondition_frequency=2)
    g2 = dict(lr=0.01, betas=(0.0, 1.0), grafting=AdaGradGrafting(), momentum=0.9, precondition_frequency=3,
              max_preconditioner_dim=4)
    names1, names2 = ["w", "b", "scalar"], ["conv", "big", "empty"]
    common = dict(max_preconditioner_dim=8, epsilon=1e-6,
                  preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    opt = ShardedShampoo([{"params": [(n, params[n]) for n in names1], **g1},
                          {"params": [(n, params[n]) for n in names2], **g2}], **common)
    sep_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    sep1 = ShardedShampoo([(n, sep_params[n]) for n in names1], **{**common, **g1})
    sep2 = ShardedShampoo([(n, sep_params[n]) for n in names2], **{**common, **g2})
    assert opt.param_groups[1]["max_preconditioner_dim"] == 4
    order = list(SHAPES)
    for t in range(7):
        for i, n in enumerate(order):
            params[n].grad = grad_for(params[n], i, t)
            sep_params[n].grad = grad_for(sep_params[n], i, t)
        opt.step()
        sep1.step()
        sep2.step()
        for n in order:
            torch.testing.assert_close(params[n], sep_params[n], rtol=1e-10, atol=1e-10, msg=f"{n} step {t}")


def test_step_lr_scheduler_changes_effective_lr():
    # SGD grafting before preconditioning starts: update = -lr * grad exactly
    params = make_params(torch.float64, shapes={"w": (6, 5), "b": (5,)})
    opt = _make(params, lr=0.1, betas=(0.0, 1.0), grafting=SGDGrafting(), start_preconditioning_step=10**6,
                preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    expected_lrs = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    for t, lr in enumerate(expected_lrs):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        set_grads(params.values(), t)
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        sched.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), before[n] - lr * p.grad, rtol=0, atol=1e-12)
    # the scheduler's state round-trips with the optimizer's
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == pytest.approx(0.0125)
    params2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt2 = _make(params2, lr=0.1, betas=(0.0, 1.0), grafting=SGDGrafting(), start_preconditioning_step=10**6,
                 preconditioner=RootInverseShampoo(factor_dtype=torch.float64))
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_zero_grad_and_closure():
    params = make_params(torch.float32, shapes={"w": (6, 5)})
    opt = _make(params)
    w = params["w"]
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(10)]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert w.grad is None


def test_tensor_learning_rate_matches_float_learning_rate():
    a = make_params(torch.float64, shapes={"w": (5, 4), "b": (3,)})
    b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in a.items()}
    opt_a = ShardedShampoo(list(a.items()), lr=0.01, precondition_frequency=2)
    opt_b = ShardedShampoo(list(b.items()), lr=torch.tensor(0.01, dtype=torch.float64), precondition_frequency=2)
    for t in range(4):
        set_grads(a.values(), t)
        set_grads(b.values(), t)
        opt_a.step()
        opt_b.step()
    for n in a:
        assert torch.equal(a[n], b[n])
