"""scripts/benchmarks/gpu_check.py (the prepared CUDA check) runs its whole CPU-runnable path here: --device cpu --quick."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "benchmarks")


def test_gpu_check_runs_on_cpu(capsys):
    from scripts.benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in out
    assert "FAIL" not in out and out.count("PASS") == 4        # 3 checks + the summary line
    assert "4 x 64^2" in out and "(4/4)" in out          # the warm series was accepted on drifted factors
    assert "bf16 roots, compiled element-wise" in out


def test_gpu_check_sh_is_valid_bash_and_refuses_without_cuda(tmp_path):
    script = os.path.join(BENCHMARKS, "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:                      # no CUDA here: it says so and stops before the checks
        assert "no CUDA device" in proc.stdout
        assert (tmp_path / "env.txt").read_text().startswith("python")
    else:
        pytest.skip("a CUDA device is present; the full check is not run in the unit tests")
