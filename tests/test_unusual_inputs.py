"""Regression tests of the hardening issue: no silent wrong update, clear errors, no hang.

Each test failed on the code before the fix (the defect it names), single-process here; the
multi-rank "no hang" cases are in ``test_hardening_dist.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sharded_shampoo import AdamGrafting, SGDGrafting, ShardedShampoo
from sharded_shampoo.config import AdaGradGrafting


def _same_grads(pairs, gen):
    """Give both members of every (contiguous, strided) parameter pair the same gradient values."""
    for a, b in pairs:
        g = torch.randn(a.shape, generator=gen)
        a.grad = g.clone()
        b.grad = torch.empty_like(b).copy_(g)      # keeps b's memory format / strides


# ----------------------------------------------------------------------------- 1. non-contiguous parameters


@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=0.1), dict(use_decoupled_weight_decay=False,
                                                                           weight_decay=0.1, momentum=0.5)])
def test_channels_last_conv_follows_its_contiguous_twin(kw):
    torch.manual_seed(0)
    a = torch.nn.Conv2d(8, 16, 3)
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert not b.weight.is_contiguous()
    start = a.weight.detach().clone()
    opts = [ShardedShampoo(m.named_parameters(), lr=0.1, precondition_frequency=2, epsilon=1e-4, **kw)
            for m in (a, b)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        _same_grads([(a.weight, b.weight), (a.bias, b.bias)], gen)
        for o in opts:
            o.step()
    assert float((a.weight.detach() - start).abs().max()) > 1e-2          # it moved (it stayed at 0.0 before the fix)
    assert float((a.weight - b.weight).abs().max()) <= 1e-6
    assert float(opts[1].state[b.weight]["momentum"].abs().max()) > 0
    assert torch.equal(opts[0].state[a.weight]["momentum"], opts[1].state[b.weight]["momentum"])


def test_transposed_leaf_is_updated():
    p = torch.nn.Parameter(torch.randn(3, 4).t())
    q = torch.nn.Parameter(p.detach().contiguous())
    start = q.detach().clone()
    opts = [ShardedShampoo([x], lr=0.1, momentum=0.9) for x in (p, q)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        _same_grads([(q, p)], gen)
        for o in opts:
            o.step()
    assert not p.is_contiguous()
    assert float((p - q).abs().max()) == 0.0 and float((p - start).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- 2. state never edited as a direction


@pytest.mark.parametrize("grafting", [None, SGDGrafting()])
@pytest.mark.parametrize("extra", [dict(weight_decay=0.5), dict(momentum=0.9, use_nesterov=True, dampening=0.3)])
def test_filtered_gradient_is_not_modified_by_the_update(grafting, extra):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = ShardedShampoo([("p", p)], lr=0.1, betas=(0.9, 0.999), use_bias_correction=False, grafting=grafting,
                         precondition_frequency=100, **extra)
    g = torch.randn(4, 3)
    p.grad = g.clone()
    opt.step()
    assert torch.allclose(opt.state[p]["block_0"]["filtered_grad"], 0.1 * g.reshape(12), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- 3. a tensor passed twice


def test_duplicate_tensor_is_rejected_naming_both_entries():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*param_groups\[0\]\['params'\]\[1\]"):
        ShardedShampoo([p, p])
    with pytest.raises(ValueError, match="'a'.*'b'"):
        ShardedShampoo([("a", p), ("b", p)])
    with pytest.raises(ValueError, match="twice"):
        ShardedShampoo([{"params": [p]}, {"params": [p], "lr": 0.1}])


# ----------------------------------------------------------------------------- 5. tensor learning rates


@pytest.mark.parametrize("lr", [torch.tensor(-1.0), torch.tensor(math.nan), torch.tensor(math.inf),
                                torch.tensor([0.1, 0.2]), torch.tensor([0.1])])
def test_bad_tensor_lr_rejected_at_construction_and_at_step(lr):
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="lr"):
        ShardedShampoo([p], lr=lr)
    opt = ShardedShampoo([p], lr=torch.tensor(0.1))
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = lr
    p.grad = torch.randn(3, 2)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.param_groups[0]["step"] == 0


def test_zero_d_tensor_lr_matches_float_lr():
    ps = [torch.nn.Parameter(torch.ones(3, 2)) for _ in range(2)]
    opts = [ShardedShampoo([ps[0]], lr=torch.tensor(0.05)), ShardedShampoo([ps[1]], lr=0.05)]
    for p, o in zip(ps, opts):
        p.grad = torch.arange(6.0).view(3, 2)
        o.step()
    assert torch.equal(ps[0], ps[1])


# ----------------------------------------------------------------------------- 10. clear errors


def test_empty_param_group_is_named():
    with pytest.raises(ValueError, match="param group 0 has no parameters"):
        ShardedShampoo([{"params": []}])
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="param group 1 has no parameters"):
        ShardedShampoo([{"params": [p]}, {"params": []}])


def test_wrong_gradient_size_names_parameter_and_shapes():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = ShardedShampoo([("layer.w", p)])
    p.grad = torch.zeros(4, 3)
    p.grad.data = torch.zeros(5, 3)     # torch checks p.grad = ..., not this (or a DTensor's local grad)
    with pytest.raises(ValueError, match=r"'layer\.w' has shape \(5, 3\).*\(4, 3\)"):
        opt.step()
    assert opt.param_groups[0]["step"] == 0


def test_meta_parameters_fail_at_construction():
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="meta device"):
        ShardedShampoo(lin.named_parameters())


def test_comm_dtype_message_lists_what_is_accepted():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"float32, bfloat16, float16, float64"):
        ShardedShampoo([p], comm_dtype=torch.int8)
    for ok in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ShardedShampoo([p], comm_dtype=ok)


@pytest.mark.parametrize("name", ["use_bias_correction", "use_nesterov", "use_decoupled_weight_decay"])
def test_boolean_settings_must_be_bools(name):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        ShardedShampoo([p], **{name: "no"})


def _trained():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = ShardedShampoo([("p", p)], lr=0.1, grafting=AdamGrafting())
    p.grad = torch.randn(4, 3)
    opt.step()
    return p, opt


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["param_groups"][0].pop("grafting"), "no 'grafting'"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), "lr"),
    (lambda sd: sd["param_groups"][0].update(lr=float("nan")), "lr"),
    (lambda sd: sd["param_groups"][0].update(step=2.5), "step"),
    (lambda sd: sd["param_groups"][0].update(step=-1), "step"),
    (lambda sd: sd["param_groups"][0].update(use_bias_correction="no"), "use_bias_correction"),
])
def test_bad_state_dict_is_rejected_and_changes_nothing(edit, match):
    p, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    p2, opt2 = _trained()
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)
    after = opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, v in before["state"][0]["block_0"].items():
        assert torch.equal(after["state"][0]["block_0"][k], v)


def test_adagrad_grafting_default_still_trains():
    # guard: the stricter checks above must not reject the defaults
    p = torch.nn.Parameter(torch.randn(5, 5))
    opt = ShardedShampoo([p], grafting=AdaGradGrafting(), precondition_frequency=2)
    for _ in range(3):
        p.grad = torch.randn(5, 5)
        opt.step()
    assert opt.param_groups[0]["step"] == 3


def test_training_example_starts_at_ln_256():
    """The training example's byte-level GPT-2 starts near ln(256) = 5.55 nats (it started at ~65)."""

    from scripts import train

    losses = train.train(train.parse_args(["--steps", "1", "--no-progress", "--batch", "4",
                                           "--corpus-bytes", "200000"]))
    assert abs(losses[0] - math.log(256)) < 0.1 * math.log(256), losses[0]


def test_step_without_any_gradient_changes_nothing_and_reports_skipped():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = ShardedShampoo(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    model(torch.randn(8, 6)).square().mean().backward()
    opt.step()
    assert not opt.last_step_skipped and opt.param_groups[0]["step"] == 1
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()                                   # no gradient anywhere: weight decay must not act alone
    assert opt.last_step_skipped and opt.param_groups[0]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("key,value", [("overlap_chunks", 1), ("comm_dtype", torch.bfloat16),
                                       ("nonfinite_grads", "skip"), ("mesh", "local")])
def test_optimizer_wide_setting_in_a_param_group_is_rejected(key, value):
    """It would be silently ignored: these apply to the whole optimizer (constructor arguments)."""
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=f"'{key}' in a param group would be ignored.*ShardedShampoo\\(\\.\\.\\., {key}="):
        ShardedShampoo([{"params": [p], key: value}])
