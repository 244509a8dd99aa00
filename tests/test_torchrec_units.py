"""torchrec integration in one process: KeyedOptimizer hooks, errors, and the planner reservation."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest

from tests.support.torchrec_required import require_torchrec

require_torchrec()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology  # noqa: E402
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation  # noqa: E402
from torchrec.distributed.planner.types import PlannerError  # noqa: E402
from torchrec.optim.keyed import CombinedOptimizer  # noqa: E402

from tests.support import torchrec_scenarios  # noqa: E402
from sharded_shampoo import ScheduleFree, ShardedShampoo  # noqa: E402
from sharded_shampoo.integrations.torchrec import (STEP_KEY, DMPTrainState, ShampooDenseOptimizer,  # noqa: E402
                                                   combined_optimizer, dense_bytes_per_rank, dense_named_parameters,
                                                   dense_tensor_estimate, load_dmp, storage_reservation)

CONFIG = dict(torchrec_scenarios.CONFIG, start_preconditioning_step=3, precondition_frequency=2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(opt: ShampooDenseOptimizer, model: nn.Module, steps: range) -> None:
    for step in range(steps.start, steps.stop):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()


def _keyed(model: nn.Module) -> ShampooDenseOptimizer:
    return ShampooDenseOptimizer(dict(model.named_parameters()), **CONFIG)


def test_state_dict_round_trip_restores_the_step_counter() -> None:
    model, twin = _model(), _model()
    opt, opt2 = _keyed(model), _keyed(twin)
    _train(opt, model, range(0, 2))
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"state"}, "torchrec's default: no param_groups"
    entry = saved["state"]["0.weight"]
    assert int(entry[STEP_KEY]) == 2 and "block_0" in entry and "momentum" in entry
    twin.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)   # KeyedOptimizer's in-place copy, then post_load_state_dict
    assert opt2.shampoo.param_groups[0]["step"] == 2
    _train(opt, model, range(2, 6))   # preconditioning starts at step 3: the counter decides it
    _train(opt2, twin, range(2, 6))
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_init_state_does_not_step() -> None:
    model = _model()
    opt = _keyed(model)
    before = {k: v.clone() for k, v in torchrec_scenarios.flat_state(opt.shampoo.state).items()}
    opt.init_state()
    assert opt.shampoo.param_groups[0]["step"] == 0
    assert all(p.grad is None for p in model.parameters())
    after = torchrec_scenarios.flat_state(opt.shampoo.state)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_param_groups_round_trip() -> None:
    model = _model()
    opt = _keyed(model)
    _train(opt, model, range(0, 1))
    opt.save_param_groups(True)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["lr"] == CONFIG["lr"]
    opt.shampoo.param_groups[0]["lr"] = 1.0
    opt.load_state_dict(saved)
    assert opt.shampoo.param_groups[0]["lr"] == CONFIG["lr"] and opt.shampoo.param_groups[0]["step"] == 1


def test_combined_with_another_keyed_optimizer() -> None:
    """CombinedOptimizer steps both, prefixes keys, and one LR scheduler scales both groups."""
    a, b = _model(), _model()
    combined = CombinedOptimizer([("a", _keyed(a)), ("b", _keyed(b))])
    sched = torch.optim.lr_scheduler.StepLR(combined, step_size=1, gamma=0.5)
    for m in (a, b):
        m(torch.randn(4, 6)).sum().backward()
    combined.step()
    sched.step()
    assert sorted(combined.state_dict()["state"])[:2] == ["a.0.bias", "a.0.weight"]
    assert [g["lr"] for g in combined.param_groups] == [CONFIG["lr"] / 2] * 2
    with pytest.raises(ValueError, match="several ShampooDenseOptimizers"):
        DMPTrainState(a, combined)


def test_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="got no parameters"):
        ShampooDenseOptimizer({})
    with pytest.raises(TypeError, match="DistributedModelParallel"):
        combined_optimizer(_model())
    model = _model()
    with pytest.raises(TypeError, match="KeyedOptimizer"):
        DMPTrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FileNotFoundError, match="neither a DCP checkpoint"):   # a CheckpointNotFoundError
        load_dmp(str(tmp_path / "missing"), model, _keyed(model))
    with pytest.raises(ValueError, match="does not support iterate_averaging=.*Use ClassicMomentum"):
        ShampooDenseOptimizer(dict(model.named_parameters()),
                              **dict(CONFIG, momentum=0.0, iterate_averaging=ScheduleFree()))
    dlrm = torchrec_scenarios.build_model()
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        dense_bytes_per_rank(dlrm, 0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_precond_dim'"):
        dense_bytes_per_rank(dlrm, 2, max_precond_dim=16)
    with pytest.raises(ValueError, match="percentage must be a fraction"):
        storage_reservation(dlrm, 2, percentage=1.5)
    with pytest.raises(ValueError, match="no dense trainable parameters"):
        dense_bytes_per_rank(dlrm.model.sparse_arch, 2)


def test_estimate_equals_one_process_allocation() -> None:
    """World size 1: the estimate is what a ShardedShampoo over the dense parameters allocates."""
    dlrm = torchrec_scenarios.build_model()
    params, buffer_bytes = dense_named_parameters(dlrm)
    assert [n for n, _ in params][0] == "model.dense_arch.model._mlp.0._linear.weight" and len(params) == 8
    assert buffer_bytes == 2 * 10 * 8, "DLRM's interaction keeps its 2 x 10 int64 triangle indices"
    opt = ShardedShampoo(params, **torchrec_scenarios.CONFIG)
    for _, p in params:
        p.grad = torch.zeros_like(p)
    real = sum(2 * p.numel() * p.element_size() for _, p in params) + torchrec_scenarios.unique_bytes(opt.state) + buffer_bytes
    assert dense_bytes_per_rank(dlrm, 1, **torchrec_scenarios.CONFIG) == [real]
    # mesh="local" repeats everything on every rank
    assert dense_bytes_per_rank(dlrm, 3, mesh="local", **torchrec_scenarios.CONFIG) == [real] * 3
    split = dense_bytes_per_rank(dlrm, 2, **torchrec_scenarios.CONFIG)
    assert max(split) < real and dense_tensor_estimate(dlrm, 2, **torchrec_scenarios.CONFIG) == max(split)


def _available(reservation: object, cap: int, model: nn.Module, device: str = "cpu") -> int:
    """Per-device memory the reservation leaves for tables (DDR on CPU topologies, HBM on GPU ones)."""
    kind = "ddr" if device == "cpu" else "hbm"
    topology = Topology(world_size=2, compute_device=device, local_world_size=2, **{f"{kind}_cap": cap})
    reserved = reservation.reserve(topology, torchrec_scenarios.BATCH, model, [EmbeddingBagCollectionSharder()])
    (left,) = {getattr(d.storage, kind) for d in reserved.devices}   # the same on every device
    return left


def _plans(reservation: object, cap: int, model: nn.Module) -> bool:
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=cap, local_world_size=2)
    planner = EmbeddingShardingPlanner(topology=topology, storage_reservation=reservation, batch_size=torchrec_scenarios.BATCH)
    try:
        planner.plan(model, [EmbeddingBagCollectionSharder()])
    except PlannerError:
        return False
    return True


def test_planner_reserves_the_estimate() -> None:
    model = torchrec_scenarios.build_model()
    ours = storage_reservation(model, 2, percentage=0.0, **torchrec_scenarios.CONFIG)
    estimate = dense_tensor_estimate(model, 2, **torchrec_scenarios.CONFIG)
    params, buffer_bytes = dense_named_parameters(model)
    six_x = 6 * sum(p.numel() * p.element_size() for _, p in params) + buffer_bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        default = HeuristicalStorageReservation(percentage=0.0)
    cap = 10**9
    kjt = cap - _available(default, cap, model) - six_x   # the planner's input-batch reservation
    assert _available(ours, cap, model) == cap - kjt - estimate
    # Shampoo's real need (21,396 B on the busier rank) is 30% above torchrec's 6x guess (16,504 B)
    assert estimate > six_x
    # torchrec applies the percentage margin to HBM only (GPU topologies)
    margin = storage_reservation(model, 2, percentage=0.15, **torchrec_scenarios.CONFIG)
    assert _available(margin, cap, model, "cuda") == int(0.85 * cap) - kjt - estimate
    assert _available(margin, cap, model) == cap - kjt - estimate
    # The planner's success depends only on what the reservation leaves for the tables. Find the
    # smallest such amount (64-byte resolution) with the 6x guess, then give both reservations the
    # device size where the 6x guess just fits: it plans tables into memory Shampoo needs, ours refuses.
    logging.disable(logging.WARNING)
    try:
        lo, hi = 0, 1 << 14
        while hi - lo > 64:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _plans(default, kjt + six_x + mid, model) else (mid, hi)
        tight = kjt + six_x + hi
        assert _plans(default, tight, model) and not _plans(ours, tight, model)
        assert _plans(ours, kjt + estimate + hi, model)
    finally:
        logging.disable(logging.NOTSET)
