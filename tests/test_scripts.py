"""The performance scripts run end to end on tiny sizes (their real runs are recorded in docs/benchmarks.md)."""

from __future__ import annotations

import os
import sys

import pytest



def test_compare_optimizers_writes_curves(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from scripts import compare_optimizers

    png = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["compare_optimizers.py", "--steps", "3", "--plot", str(png),
                                      "--extra", "--dim 32 --seq 16 --batch 4 --corpus-bytes 20000"])
    compare_optimizers.main()
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    for name in compare_optimizers.OPTIMIZERS:
        assert f"| {name} |" in out
    assert compare_optimizers.time_to_reach([3.0, 2.0, 1.0], [1.0, 2.0, 3.0], 2.5) == 2.0
    assert compare_optimizers.time_to_reach([3.0, 3.0], [1.0, 2.0], 1.0) is None
    assert compare_optimizers.steps_to_reach([3.0, 2.0, 1.0], 2.5) == 2
    assert compare_optimizers.steps_to_reach([3.0, 3.0], 1.0) is None


@pytest.mark.parametrize("choice, kind, one_d_preconditioned", [
    ("shampoo", "RootInverseShampoo", True), ("eigen", "EigenvalueCorrectedShampoo", True),
    ("kl-shampoo", "KLShampoo", True), ("eigendecomposed", "EigendecomposedShampoo", True),
    ("spectral", "SpectralDescent", False), ("sign", "SignDescent", False)])
def test_train_builds_each_preconditioner_choice(choice, kind, one_d_preconditioned):
    """train.py --preconditioner names each kind; the factor-free ones leave 1-D parameters to grafting."""
    from scripts import train

    args = train.parse_args(["--preconditioner", choice, "--dim", "32", "--tolerance",
                             "0.1" if choice in ("eigen", "eigendecomposed") else "0"])
    config = train.preconditioner_config(args)
    assert type(config).__name__ == kind
    if choice in ("eigen", "eigendecomposed"):
        assert config.tolerance == 0.1
    opt = train.build_optimizer(args, train.build_model(args))
    assert opt.param_groups[0]["blocking"].precondition_1d is one_d_preconditioned


def test_bench_roots_measures_both_methods():
    from scripts.benchmarks import bench_roots

    r = bench_roots.measure([(*bench_roots.random_factors(2, 24), 0.25)], 1e-8, repeats=1)
    for key in ("t_eigh", "t_warm", "t_basis_eigh", "t_basis_qr", "eigh", "warm", "res_warm", "basis_qr", "fallback"):
        assert key in r
    assert r["eigh"] < 1e-4 and 0.0 <= r["fallback"] <= 1.0
    assert len(bench_roots.report("x", r)) == 4


def test_train_builds_each_preconditioner():
    from scripts import train

    from sharded_shampoo import EigenvalueCorrectedShampoo, RootInverseShampoo
    from sharded_shampoo.config import QREigenbasisConfig, WarmStartRootConfig

    cfg = train.preconditioner_config(train.parse_args(["--root", "warm", "--root-storage", "bfloat16"]))
    assert isinstance(cfg, RootInverseShampoo) and isinstance(cfg.root, WarmStartRootConfig)
    cfg = train.preconditioner_config(train.parse_args(["--preconditioner", "eigen", "--eigenbasis", "qr"]))
    assert isinstance(cfg, EigenvalueCorrectedShampoo) and isinstance(cfg.eigenbasis, QREigenbasisConfig)


def test_training_example_draws_no_progress_bar_into_a_pipe(capsys):
    """A piped log gets the loss lines, not thousands of carriage-return bar updates (stderr is no tty here)."""
    from scripts import train

    train.train(train.parse_args(["--steps", "2", "--batch", "4", "--corpus-bytes", "200000", "--dim", "32",
                                  "--layers", "1", "--heads", "2", "--seq", "16", "--log-every", "1"]))
    out, err = capsys.readouterr()
    assert "\r" not in err and "step/s" not in err and "s/step" not in err, err
    assert "loss" in out


def test_bench_plan_times_the_cli_against_a_base_tree(capsys):
    from scripts.benchmarks import bench_plan

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert bench_plan.main(["--model", "llama-tiny", "--mesh", "pp=2,fsdp=2", "--repeats", "1", "--base", repo,
                            "--skip-presets"]) == 0
    out = capsys.readouterr().out
    assert "| current | 1 |" in out and "| base | 1 |" in out and "fails" not in out
    assert "worst stage by memory" in out and "imbalance max/mean" in out
    lines = bench_plan.preset_section(2, ["llama-tiny"])
    assert sum(line.startswith("| llama-tiny |") for line in lines) == 1
    figures = bench_plan.plan_figures(repo, "llama-tiny", "2x2", tolerance=0.01)
    assert len(figures) == 4 and figures[0] >= 1.0 and figures[1] > 0
    stages = bench_plan.stages_section([("current", repo)], "llama-tiny", "2x2")
    assert any(line.startswith("| owners | ") and line.split("|")[2].strip() for line in stages)
