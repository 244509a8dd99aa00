"""A ShampooDenseOptimizer (a torchrec KeyedOptimizer) over a small plain model, in one process.

``DMPTrainState`` / ``save_dmp`` / ``load_dmp`` accept any module with a KeyedOptimizer, so the
torchrec checkpoint path can be tested here without a DistributedModelParallel launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support import torchrec_scenarios as sc
from sharded_shampoo.integrations.torchrec import ShampooDenseOptimizer

CONFIG = dict(sc.CONFIG, start_preconditioning_step=3, precondition_frequency=2)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def keyed(m: nn.Module) -> ShampooDenseOptimizer:
    return ShampooDenseOptimizer(dict(m.named_parameters()), **CONFIG)


def train(opt: ShampooDenseOptimizer, m: nn.Module, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        m(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()


def keyed_model(seed: int = 0, steps: int = 4) -> tuple[nn.Module, ShampooDenseOptimizer]:
    """A model (seeded) and its keyed optimizer after ``steps`` steps (a seed-dependent state)."""
    m = model(seed)
    opt = keyed(m)
    train(opt, m, range(seed * 100, seed * 100 + steps))
    return m, opt


def snapshot(m: nn.Module, opt: ShampooDenseOptimizer) -> dict[str, Any]:
    """Everything a load could change: parameters, ShardedShampoo's state tensors, group steps."""
    return {"params": {n: p.detach().clone() for n, p in m.named_parameters()},
            "state": sc.flat_state(opt.shampoo.state),
            "steps": [g["step"] for g in opt.shampoo.param_groups]}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["steps"] == b["steps"] and a["params"].keys() == b["params"].keys()
            and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
            and a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k])
                                                               for k in a["state"]))
