"""Profiler ranges (issue 15 item 2): a profiled step shows every phase as ``ShardedShampoo::<phase>``;
without a profiler no range is opened."""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from sharded_shampoo import ShardedShampoo, profiling


def _step_events(opt: ShardedShampoo, model: torch.nn.Module, t: int) -> Counter:
    gen = torch.Generator().manual_seed(t)
    model.zero_grad()
    model(torch.randn(5, 8, generator=gen)).square().sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return Counter(e.key for e in prof.key_averages() if e.key.startswith(profiling.PREFIX))


def test_a_profiled_step_shows_every_phase():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    opt = ShardedShampoo(model.named_parameters(), lr=0.01, precondition_frequency=2, start_preconditioning_step=2)
    first = _step_events(opt, model, 0)          # step 1: grafting only, no refresh
    refresh = _step_events(opt, model, 1)        # step 2: roots refreshed, preconditioned
    assert set(first) == set(profiling.PHASES) - {profiling.REFRESH}
    assert set(refresh) == set(profiling.PHASES)
    assert all(name.startswith("ShardedShampoo::") for name in profiling.PHASES) and len(set(profiling.PHASES)) == 8


def test_no_profiler_no_ranges(monkeypatch):
    opened: list[str] = []
    real = profiling.record_function

    def spy(name: str) -> object:
        opened.append(name)
        return real(name)

    monkeypatch.setattr(profiling, "record_function", spy)
    model = torch.nn.Linear(4, 3)
    opt = ShardedShampoo(model.named_parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert opened == []
    with profile(activities=[ProfilerActivity.CPU]):
        opt.step()
    assert profiling.AGREE in opened and profiling.APPLY in opened
