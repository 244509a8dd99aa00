"""Calibrate the FLOP model of ``sharded_shampoo.planning.costs`` against measured times on this machine.

The balancer only needs *relative* costs: how expensive a root refresh (eigh) is compared
with the GEMMs of an ordinary step. The cost model counts eigh as ``eigh_flops_per_d3 * d^3``
GEMM-equivalent FLOPs; this script measures

* the GEMM rate R (FLOP/s) of a d x d x d matmul,
* ``torch.linalg.eigh`` and the root formation ``Q diag(l) Q^T`` for several d,
* the modeled per-step work (factor updates + preconditioning) of a d x d block,

and fits the effective constants ``c = t * R / d^3`` by least squares over the sizes
(``c = sum(t_i d_i^3) R / sum(d_i^6)``). Eigh is far less GEMM-efficient than a matmul, so the
effective constant is larger than the textbook 9 (and much larger on GPUs: run this there).

    python -m scripts.benchmarks.calibrate_cost_model                 # CPU, writes docs/cost_model.md section
    python -m scripts.benchmarks.calibrate_cost_model --device cuda --no-write

Use the result as ``make_plan(..., cost_model=CostModel(eigh_flops_per_d3=c_eigh,
root_form_flops_per_d3=c_root))``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

BEGIN = "<!-- calibration:begin -->"
END = "<!-- calibration:end -->"
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "cost_model.md")


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, min_time: float = 0.2) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (after one warm-up), synchronizing on GPU."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    best = float("inf")
    spent = 0.0
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        if i >= 2 and spent > min_time * repeats:
            break
    return best


def spd(d: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned symmetric positive definite matrix like a Shampoo factor G G^T + eps I."""
    g = torch.randn(d, 2 * d, device=device, dtype=dtype, generator=gen)
    return g @ g.T / (2 * d) + 1e-3 * torch.eye(d, device=device, dtype=dtype)


def fit(ds: list[int], times: list[float], rate: float) -> float:
    """Least-squares c in t = c d^3 / rate."""
    return sum(t * d ** 3 for d, t in zip(ds, times)) * rate / sum(d ** 6 for d in ds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="128,256,512,1024", help="comma-separated factor sizes d")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/cost_model.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ds = [int(x) for x in args.sizes.split(",")]
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float32

    rows = []
    gemm_rates, eigh_t, root_t, step_t = [], [], [], []
    for d in ds:
        a = torch.randn(d, d, device=device, dtype=dtype, generator=gen)
        b = torch.randn(d, d, device=device, dtype=dtype, generator=gen)
        t_mm = best_time(lambda: a @ b, device, args.repeats)
        rate = 2 * d ** 3 / t_mm
        f = spd(d, device, dtype, gen)
        t_eigh = best_time(lambda: torch.linalg.eigh(f), device, args.repeats)
        lam, q = torch.linalg.eigh(f)
        t_root = best_time(lambda: (q * lam.clamp_min(1e-12).pow(-0.25)) @ q.T, device, args.repeats)
        # one ordinary step of a d x d block: two factor updates, two preconditioning products
        g = torch.randn(d, d, device=device, dtype=dtype, generator=gen)
        left, right = spd(d, device, dtype, gen), spd(d, device, dtype, gen)

        def step() -> torch.Tensor:
            left.addmm_(g, g.T)
            right.addmm_(g.T, g)
            return left @ g @ right

        t_step = best_time(step, device, args.repeats)
        gemm_rates.append(rate)
        eigh_t.append(t_eigh)
        root_t.append(t_root)
        step_t.append(t_step)
        rows.append((d, t_mm, rate, t_eigh, t_root, t_step))

    # The reference is the best GEMM rate seen (small GEMMs are overhead-bound; a noisy large
    # one would inflate every constant).
    rate = max(gemm_rates)
    c_eigh = fit(ds, eigh_t, rate)
    c_root = fit(ds, root_t, rate)
    c_step = fit(ds, step_t, rate)          # model: 4 numel d x 2 dims = 8 d^3
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    cmd = "python -m scripts.benchmarks.calibrate_cost_model " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Measured {datetime.date.today().isoformat()} on `{device.type}` ({name}, {threads} threads), torch "
        f"{torch.__version__}, fp32, best of {args.repeats}, 1-minute load average {os.getloadavg()[0]:.2f} "
        f"(other jobs may share the cores). Command: `{cmd.strip()}`",
        "",
        "| d | matmul ms | GEMM GFLOP/s | eigh ms | eigh c (t R / d^3) | root form ms | step ms (8 d^3 model) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, t_mm, r, t_e, t_r, t_s in rows:
        lines.append(f"| {d} | {t_mm * 1e3:.3f} | {r / 1e9:.1f} | {t_e * 1e3:.2f} | {t_e * rate / d ** 3:.1f} | "
                     f"{t_r * 1e3:.3f} | {t_s * 1e3:.3f} |")
    lines += [
        "",
        f"Reference GEMM rate R = {rate / 1e9:.1f} GFLOP/s (best over the sizes). Least-squares fit of "
        "t = c d^3 / R (dominated by the largest d):",
        "",
        f"* `eigh_flops_per_d3` (effective): **{c_eigh:.1f}** (textbook count: 9)",
        f"* `root_form_flops_per_d3` (effective): **{c_root:.2f}** (count: 2)",
        f"* one ordinary step of a d x d block: **{c_step:.2f}** d^3 (model: 8 d^3, i.e. "
        f"{c_step / 8:.2f}x the GEMM-rate floor)",
        "",
        f"Calibrated model: `CostModel(eigh_flops_per_d3={c_eigh:.1f}, root_form_flops_per_d3={c_root:.2f})`.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        doc = os.path.normpath(DOC)
        with open(doc) as fh:
            content = fh.read()
        if BEGIN not in content or END not in content:
            print(f"{doc} has no {BEGIN} ... {END} section; not written.", file=sys.stderr)
            return 1
        head, rest = content.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(doc, "w") as fh:
            fh.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
