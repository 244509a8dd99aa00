"""Checkpoints across storage layouts: a state dict or DCP checkpoint with full ``(d, d)`` matrices (written
before packing, or with ``symmetric_packing=False``) loads into a packed optimizer and vice versa; the
fingerprint does not depend on packing; real structural differences still fail."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.support import ckpt_scenarios as cs
from tests.support import dist_scenarios
from tests.support import pre_packing_fixture as fixture
from sharded_shampoo import RootInverseShampoo, pack_symmetric
from sharded_shampoo.checkpointing import (LayoutAdaptingLoadPlanner, TrainState, describe, load_checkpoint,
                                           save_checkpoint)
from sharded_shampoo.compute.packing import to_layout

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


#: epsilon and first refresh of the runs continued across layouts (see _with_packing)
EPS, START = 1e-3, 18


def _with_packing(opt_kwargs: dict, packed: bool) -> dict:
    """The toy config with ``symmetric_packing=packed`` in the well-conditioned regime: fp64 factors, epsilon
    :data:`EPS` and the first refresh at :data:`START`, when every factor is full rank. (The toy's own first
    refresh comes at step 2, where an eigenbasis of a rank-deficient factor is arbitrary: the exact symmetry
    of a packed factor changes it, and the layouts' runs drift apart chaotically.)"""
    pre = dataclasses.replace(opt_kwargs["preconditioner"], symmetric_packing=packed, factor_dtype=torch.float64)
    return dict(opt_kwargs, preconditioner=pre, epsilon=EPS, start_preconditioning_step=START)


@pytest.fixture(scope="module")
def pre_packing() -> dict:
    """A state dict written by the code before packing (commit 426c08e; see tests/support/pre_packing_fixture.py)."""
    return torch.load(fixture.FIXTURE, weights_only=True)


def _fixture_optimizer(saved: dict, packing: bool):
    params = fixture.initial_params()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved["params"][n])
    return params, fixture.build(params, packing)


@pytest.mark.parametrize("packing", [True, False])
def test_a_state_dict_from_before_packing_loads_and_training_continues(pre_packing, packing):
    params, opt = _fixture_optimizer(pre_packing, packing)
    saved_state = pre_packing["state_dict"]["state"]
    opt.load_state_dict(pre_packing["state_dict"])
    for i, p in enumerate(params.values()):
        for key, value in saved_state[i]["block_0"].items():
            live = opt.state[p]["block_0"][key]
            expected = pack_symmetric(value) if packing and live.shape != value.shape else value
            assert torch.equal(live, expected.to(live.dtype)), key
        if packing:
            assert opt.state[p]["block_0"]["factor_0"].ndim == 1
    for t in range(fixture.STEPS, fixture.STEPS + fixture.MORE):
        fixture.set_grads(params, t)
        opt.step()
    for n, p in params.items():
        ref = pre_packing["continued"][n]
        diff = float((p.detach() - ref).norm() / ref.norm())
        # full matrices: the old code's own arithmetic; packed: the roots are symmetrised (fp64 round-off)
        assert diff == 0.0 if not packing else diff < 1e-12, (n, diff)


def test_the_fingerprint_of_a_default_optimizer_is_the_one_before_packing(pre_packing):
    """Old checkpoints carry fingerprints computed without symmetric_packing: the guard key still matches."""
    _, packed = _fixture_optimizer(pre_packing, True)
    _, full = _fixture_optimizer(pre_packing, False)
    assert describe(packed)["fingerprint"] == describe(full)["fingerprint"] == pre_packing["fingerprint"]


@pytest.mark.parametrize("config", ["root_inverse", "eigen_corrected"])
@pytest.mark.parametrize("saved_packed", [True, False])
def test_state_dict_loads_across_packing(config, saved_packed):
    """Either layout loads into the other; the state is the same matrices, and training continues alike."""
    kw = _with_packing(dist_scenarios.CONFIGS[config], saved_packed)
    model, opt = cs.build("single", config, **kw)
    cs.feed(model, opt, 0, 6)
    sd = opt.state_dict()
    model2, opt2 = cs.build("single", config, **_with_packing(dist_scenarios.CONFIGS[config], not saved_packed))
    with torch.no_grad():
        for a, b in zip(model2.parameters(), model.parameters()):
            a.copy_(b)
    opt2.load_state_dict(sd)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key, s in opt.state[p].items():
            if not isinstance(s, dict):
                continue
            for k, v in s.items():
                v2 = opt2.state[p2][key][k]
                assert torch.equal(to_layout(v, tuple(v2.shape)), v2), (key, k)
    cs.feed(model, opt, 6, START + 6)
    cs.feed(model2, opt2, 6, START + 6)
    assert dist_scenarios.max_rel_diff(cs.full_params(model2), cs.full_params(model)) < 1e-10


@pytest.mark.parametrize("saved_packed", [True, False])
def test_dcp_checkpoint_loads_across_packing(tmp_path, saved_packed):
    """load_checkpoint reads a symmetric matrix in the layout it was saved in and converts it."""
    toy = dist_scenarios.CONFIGS["root_inverse"]
    model, opt = cs.build("single", "root_inverse", **_with_packing(toy, saved_packed))
    cs.feed(model, opt, 0, 5)
    save_checkpoint(str(tmp_path), 5, model, opt)
    expected = opt.state_dict()
    model2, opt2 = cs.build("single", "root_inverse", **_with_packing(toy, not saved_packed))
    load_checkpoint(str(tmp_path), model2, opt2)
    got = opt2.state_dict()
    for i, entry in expected["state"].items():
        for key, s in entry.items():
            if isinstance(s, dict):
                for k, v in s.items():
                    converted = got["state"][i][key][k]
                    # the live layout of the saved value (packing keeps the upper triangle of a full root)
                    assert torch.equal(to_layout(v, tuple(converted.shape)), converted), (key, k)
    # a plain dcp.load of the TrainState needs the layout-adapting planner (DCP plans by the live shapes)
    step_dir = os.path.join(str(tmp_path), "step_5")
    other = _with_packing(toy, not saved_packed)
    model3, opt3 = cs.build("single", "root_inverse", **other)
    with pytest.raises(BaseException, match="Size mismatch"):
        dcp.load({"app": TrainState(model3, opt3)}, checkpoint_id=step_dir)
    dcp.load({"app": TrainState(model3, opt3)}, checkpoint_id=step_dir, planner=LayoutAdaptingLoadPlanner())
    assert cs.same(cs.opt_snapshot(opt3)["state"], cs.opt_snapshot(opt2)["state"])


def test_a_real_structural_difference_still_fails(pre_packing):
    params, opt = _fixture_optimizer(pre_packing, True)
    sd = pre_packing["state_dict"]
    bad = dict(sd, param_groups=[dict(g) for g in sd["param_groups"]])
    bad["param_groups"][0]["preconditioner"] = dict(bad["param_groups"][0]["preconditioner"],
                                                    max_consecutive_root_failures=3)
    with pytest.raises(ValueError, match="preconditioner differs"):
        opt.load_state_dict(bad)
    # the live config still tells them apart
    assert RootInverseShampoo(symmetric_packing=False) != RootInverseShampoo()


@pytest.mark.parametrize("kind", ["eigendecomposed", "eigenvalue_corrected"])
def test_a_run_resumes_with_another_refresh_tolerance(tmp_path, kind):
    """The adaptive refresh ``tolerance`` only decides when a refresh decomposes: a checkpoint loads into an
    optimizer with another tolerance (same fingerprint; the state bit for bit as saved), which continues with
    its own tolerance. Other family options (trace scaling) still must match."""
    from sharded_shampoo import EigendecomposedShampoo, EigenvalueCorrectedShampoo
    from sharded_shampoo.checkpointing import IncompatibleCheckpointError

    cls = EigendecomposedShampoo if kind == "eigendecomposed" else EigenvalueCorrectedShampoo
    base = dict(dist_scenarios.CONFIGS["root_inverse"], momentum=0.0)

    def build(pre):
        return cs.build("single", "root_inverse", **dict(base, preconditioner=pre))

    model, opt = build(cls(tolerance=0.05))
    cs.feed(model, opt, 0, cs.SAVE_AT)
    save_checkpoint(str(tmp_path / "ck"), cs.SAVE_AT, model, opt, extra={"step": cs.SAVE_AT})
    saved = cs.snapshot(model, opt)
    runs = {}
    for tolerance in (0.05, 0.3):
        model2, opt2 = build(cls(tolerance=tolerance))
        assert describe(opt2)["fingerprint"] == describe(opt)["fingerprint"]
        load_checkpoint(str(tmp_path / "ck"), model2, opt2, extra={"step": -1})
        assert opt2.param_groups[0]["preconditioner"].tolerance == tolerance
        assert cs.same(cs.snapshot(model2, opt2)["state"], saved["state"])
        cs.feed(model2, opt2, cs.SAVE_AT, cs.END)
        counts = [b.refresh_counts for b in opt2.runtime.buckets]
        runs[tolerance] = (cs.full_params(model2), sum(c.skipped for c in counts), sum(c.checked for c in counts))
    assert runs[0.05][2] == runs[0.3][2] > 0                   # the same refreshes checked ...
    assert runs[0.3][1] > runs[0.05][1]                         # ... the larger tolerance keeps more bases
    assert dist_scenarios.max_rel_diff(runs[0.3][0], runs[0.05][0]) > 1e-4
    model3, opt3 = build(cls(tolerance=0.3, trace_scaling_exponent=0.5))
    with pytest.raises(IncompatibleCheckpointError, match="preconditioner differs"):
        load_checkpoint(str(tmp_path / "ck"), model3, opt3)
