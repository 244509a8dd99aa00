"""scripts/benchmarks/parity_vs_reference.py without the reference (never a test dependency): our side of every row
runs, the registry lists, and the metric is what the docstring says."""

from __future__ import annotations

import pytest
import torch

from scripts.benchmarks import parity_vs_reference as pv

#: rows that compute the base's update another way (eigendecomposed Shampoo: the root applied from eigenpairs)
SAME_MATH_AS_BASE = {"eigendecomposed", "eigendecomposed-unpacked"}


def test_our_side_of_every_row_runs_and_differs_from_the_base():
    base = pv.our_run(pv.VARIANTS["shampoo"])
    for name, variant in pv.VARIANTS.items():
        run = pv.our_run(variant)
        assert sorted(run.steps) == list(pv.SAVE_STEPS)
        assert (run.eval_params is not None) == (name in ("gpa", "gpa-wd", "schedule-free"))
        distance = pv.displacement_error(run.steps[60], base.steps[60], base.init)
        if name in SAME_MATH_AS_BASE:
            assert distance < 1e-5, name
        elif name != "shampoo":      # each row configures something the base does not do
            assert distance > 1e-2, name
        assert pv.compare(run, run)[0] == 0.0


def test_displacement_error_and_the_command_line(capsys):
    init = [torch.zeros(3)]
    assert pv.displacement_error([torch.tensor([1.0, 0, 0])], [torch.tensor([2.0, 0, 0])], init) == 0.5
    assert pv.main(["--list"]) == 0
    assert "schedule-free" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pv.main([])                           # --reference is required to compare
    with pytest.raises(SystemExit):
        pv.main(["--reference", "/nonexistent", "--variants", "no-such-row"])


def test_kl_rows_configure_kl_shampoo_and_the_unpacked_row_only_changes_storage():
    """The kl-shampoo rows run KLShampoo (1.4e-2 from Shampoo above); the unpacked one is the same math stored
    as full matrices, so its trajectory stays at float32 round-off from the packed row's."""
    from sharded_shampoo import KLShampoo

    assert isinstance(pv.VARIANTS["kl-shampoo"].ours().kwargs["preconditioner"], KLShampoo)
    assert pv.VARIANTS["kl-shampoo-nograft"].ours().kwargs["grafting"] is None
    packed, unpacked = pv.our_run(pv.VARIANTS["kl-shampoo"]), pv.our_run(pv.VARIANTS["kl-shampoo-unpacked"])
    assert pv.displacement_error(unpacked.steps[60], packed.steps[60], packed.init) < 1e-5


def test_adaptive_refresh_rows_count_their_skips():
    """Our side of the tolerance rows keeps 38 of 90 factor refreshes -- the reference's count on these rows
    (/work/notes/ref/runs_log.txt); rows without a tolerance report none."""
    assert pv.our_run(pv.VARIANTS["eigendecomposed-tol"]).refresh_skips == (38, 90)
    assert pv.our_run(pv.VARIANTS["soap-tol"]).refresh_skips == (38, 90)
    assert pv.our_run(pv.VARIANTS["eigendecomposed"]).refresh_skips is None
