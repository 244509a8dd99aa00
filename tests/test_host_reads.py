"""A steady step (no root refresh) reads no tensor value on the host: 0 counted reads on 1 process and
on 2 FSDP ranks (issue 15 item 1). A refresh step may read the host (root failures) and does."""

from __future__ import annotations

import torch

from sharded_shampoo import ShardedShampoo
from tests.support.host_reads import count_host_reads, fsdp_host_reads, steady_step_reads
from tests.support.dist_utils import run_ranks


def _model_and_opt(**kw: object) -> tuple[torch.nn.Module, ShardedShampoo]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    return model, ShardedShampoo(model.named_parameters(), lr=0.01, **kw)  # type: ignore[arg-type]


def _grads_of(model: torch.nn.Module):
    def set_grads(t: int) -> None:
        gen = torch.Generator().manual_seed(t)
        model.zero_grad()
        model(torch.randn(5, 8, generator=gen)).square().sum().backward()
    return set_grads


def test_steady_step_reads_nothing_on_one_process():
    for kw in ({}, {"momentum": 0.9, "weight_decay": 0.01}, {"nonfinite_grads": "skip"},
               {"weight_decay_type": "L2", "weight_decay": 0.01}):
        model, opt = _model_and_opt(precondition_frequency=100, start_preconditioning_step=100, **kw)
        assert dict(steady_step_reads(opt, _grads_of(model))) == {}, kw


def test_the_counter_sees_a_read_and_a_refresh_step_may_read():
    """The counter is not blind: a refresh step (step 2 here) reads root failures on the host."""
    model, opt = _model_and_opt(precondition_frequency=2, start_preconditioning_step=2)
    set_grads = _grads_of(model)
    set_grads(0)
    opt.step()
    set_grads(1)
    with count_host_reads() as counts:
        opt.step()
    assert sum(counts.values()) > 0


def test_steady_step_reads_nothing_on_two_fsdp_ranks():
    results = run_ranks(2, fsdp_host_reads)
    assert results == [{}, {}]
