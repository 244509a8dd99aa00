"""The CUDA path on one device: correctness, batched roots, step vs GEMM floor, memory vs the planner.

Called by scripts/benchmarks/gpu_check.sh on a GPU machine (``--device cuda``); ``--device cpu --quick`` runs the
same code on small sizes, which tests/test_gpu_check.py does on every CI run so the GPU run has the
best chance to work the first time. Prints a markdown report; exits non-zero if a correctness check
fails (timings are reported, never asserted).

1. **step equals CPU**: a few optimizer steps of the same model with the same gradients on the device
   and on the CPU (TF32 off) give the same parameters (relative difference <= 1e-4);
2. **roots**: one refresh of a stack of ``B`` factors of 256/512/1024/2048 by batched ``eigh``, by a
   per-block loop of ``eigh``, by the warm-started GEMM series from the previous root
   (``WarmStartRootConfig``; a well-conditioned drifted factor, so it is accepted), and one
   warm-started QR iteration (``QREigenbasisConfig``), with each result's error;
3. **plain step vs the GEMM floor**: ``scripts/benchmarks/bench_step.py``'s model, fp32 and with bf16 roots,
   eager and compiled element-wise math, against ``4 m n (m + n)`` FLOPs at the fp32 batched-GEMM
   rate measured in the same run, beside AdamW;
4. **memory vs the planner**: the bytes the optimizer's state occupies on the device equal the plan's
   ``optimizer_state_bytes``; the peak during steps is reported against params + grads + state +
   the plan's modeled transient peak.

    python -m scripts.benchmarks.gpu_check --device cuda            # ~3-5 minutes on an H100
    python -m scripts.benchmarks.gpu_check --device cpu --quick     # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
from torch import nn

from sharded_shampoo import AdamGrafting, RootInverseShampoo, ShardedShampoo
from sharded_shampoo.compute.matrix_functions import eigenbasis, inverse_root_eigh
from sharded_shampoo.compute.warm_refresh import (eigenbasis_qr, eigenbasis_residual,
                                                  inverse_root_warm)
from sharded_shampoo.config import QREigenbasisConfig, WarmStartRootConfig

from scripts.benchmarks.models import SHAPES, linear_stack, set_grads


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best wall-clock of ``repeats`` calls after one warm-up, device synchronised."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def shampoo(model: nn.Module, max_dim: int, **kw) -> ShardedShampoo:
    return ShardedShampoo(model.named_parameters(), lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8,
                          max_preconditioner_dim=max_dim, precondition_frequency=3, start_preconditioning_step=1,
                          grafting=AdamGrafting(), **kw)


# ----------------------------------------------------------------------------- 1. correctness


def check_step_equals_cpu(device: torch.device, quick: bool) -> tuple[list[str], bool]:
    shapes = [(48, 40), (40, 33), (33, 8)] if quick else [(512, 384), (384, 1000), (1000, 64)]
    max_dim = 32 if quick else 256
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        params = []
        for dev in (torch.device("cpu"), device):
            model = linear_stack(shapes, dev)
            opt = shampoo(model, max_dim)
            for step in range(7):                      # refreshes at steps 1, 3, 6
                set_grads(model, step)
                opt.step()
            params.append([p.detach().cpu() for p in model.parameters()])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(*params))
    ok = worst <= 1e-4
    return [f"| single-process step, {device} vs cpu, 7 steps (3 refreshes) | max relative parameter difference "
            f"{worst:.1e} | {'PASS' if ok else 'FAIL'} (<= 1e-4) |"], ok


# ----------------------------------------------------------------------------- 2. roots


def drifted_factors(B: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-conditioned factor stack and the same stack one EMA step of 1% later."""
    g = torch.Generator().manual_seed(d)
    G = torch.randn(B, d, 4 * d, generator=g) / (2 * d) ** 0.5
    A0 = (G @ G.mT).to(device)
    H = torch.randn(B, d, d, generator=g) / d ** 0.5
    return A0, 0.99 * A0 + 0.01 * (H @ H.mT).to(device)


def check_roots(device: torch.device, quick: bool) -> list[str]:
    sizes = [(32, 4), (64, 4)] if quick else [(256, 32), (512, 16), (1024, 8), (2048, 4)]
    lines = ["| blocks | batched eigh | per-block eigh loop | loop / batched | warm series (accepted) | "
             "warm / batched | root error warm vs eigh | QR eigenbasis | QR / eigh basis | basis residual QR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eps = 1e-6
    for d, B in sizes:
        A0, A1 = drifted_factors(B, d, device)
        R0, _ = inverse_root_eigh(A0, 0.25, eps)
        Q0, _ = eigenbasis(A0, eps)
        t_batch = timed(lambda: inverse_root_eigh(A1, 0.25, eps), device)
        t_loop = timed(lambda: [inverse_root_eigh(A1[i:i + 1], 0.25, eps) for i in range(B)], device)
        t_warm = timed(lambda: inverse_root_warm(A1, R0, 0.25, eps, WarmStartRootConfig()), device)
        t_basis = timed(lambda: eigenbasis(A1, eps), device)
        t_qr = timed(lambda: eigenbasis_qr(A1, Q0, eps, QREigenbasisConfig()), device)
        Xe, _ = inverse_root_eigh(A1, 0.25, eps)
        Xw, _, rep = inverse_root_warm(A1, R0, 0.25, eps, WarmStartRootConfig())
        err = float(((Xw - Xe).flatten(1).norm(dim=1) / Xe.flatten(1).norm(dim=1)).max())
        Qq, *_ = eigenbasis_qr(A1, Q0, eps, QREigenbasisConfig())
        res = float(eigenbasis_residual(A1, Qq).max())
        accepted = B - int(rep.fell_back.sum())
        lines.append(f"| {B} x {d}^2 | {t_batch * 1e3:.1f} ms | {t_loop * 1e3:.1f} ms | {t_loop / t_batch:.2f} | "
                     f"{t_warm * 1e3:.1f} ms ({accepted}/{B}) | {t_warm / t_batch:.2f} | {err:.1e} | "
                     f"{t_qr * 1e3:.1f} ms | {t_qr / t_basis:.2f} | {res:.1e} |")
    return lines


# ----------------------------------------------------------------------------- 3. step vs floor


def gemm_rate(d: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    a, b = (torch.randn(16, d, d, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(16, d, d, device=device, dtype=dtype)
    return 2 * 16 * d ** 3 / timed(lambda: torch.bmm(a, b, out=out), device, repeats=5)


def check_step_vs_floor(device: torch.device, quick: bool) -> list[str]:
    shapes = [(64, 64)] * 4 + [(128, 64)] * 2 if quick else SHAPES
    max_dim = 32 if quick else 512
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False      # the floor is priced at the fp32 rate
    try:
        model = linear_stack(shapes, device)
        set_grads(model, 0)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        t_adamw = timed(adamw.step, device, repeats=5)
        rate = gemm_rate(max_dim, device)
        lines = [f"fp32 batched-GEMM rate at {max_dim}: {rate / 1e12:.2f} TFLOP/s (TF32 off); AdamW step "
                 f"{t_adamw * 1e3:.2f} ms", "",
                 "| configuration | plain step | x floor | x AdamW |", "|---|---|---|---|"]
        floor = None
        for label, kw in (("fp32, eager", {}), ("fp32, compiled element-wise", {"elementwise": "compile"}),
                          ("bf16 roots, compiled element-wise",
                           {"elementwise": "compile",
                            "preconditioner": RootInverseShampoo(root_storage_dtype=torch.bfloat16)})):
            opt = shampoo(model, max_dim, **kw)
            opt.step()                                   # step 1: roots; the next steps are plain
            if floor is None:
                flops = sum(4 * b.shape[0] * b.shape[1] * (b.shape[0] + b.shape[1])
                            for b in opt.plan.blocks if len(b.shape) == 2)
                floor = flops / rate
            t = timed(opt.step, device, repeats=5)
            lines.append(f"| {label} | {t * 1e3:.2f} ms | {t / floor:.2f} | {t / t_adamw:.1f} |")
            del opt
        lines.append(f"| floor: 4mn(m+n) FLOPs at the fp32 GEMM rate | {floor * 1e3:.2f} ms | 1.00 | "
                     f"{floor / t_adamw:.1f} |")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return lines


# ----------------------------------------------------------------------------- 4. memory


def state_bytes(opt: ShardedShampoo) -> int:
    seen: dict[int, int] = {}
    for s in opt.state.values():
        for block in s.values():
            for v in (block.values() if isinstance(block, dict) else [block]):
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def check_memory(device: torch.device, quick: bool) -> tuple[list[str], bool]:
    shapes = [(64, 48), (48, 100)] if quick else [(4096, 1024), (1024, 4096), (2048, 2048)]
    max_dim = 32 if quick else 1024
    lines, ok = ["| state | planned | allocated | device memory (CUDA only) | verdict |", "|---|---|---|---|---|"], True
    for label, pre in (("fp32 state", RootInverseShampoo()),
                       ("bf16 factors + roots", RootInverseShampoo(factor_storage_dtype=torch.bfloat16,
                                                                   root_storage_dtype=torch.bfloat16))):
        model = linear_stack(shapes, device)
        set_grads(model, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
        opt = shampoo(model, max_dim, preconditioner=pre)
        allocated = state_bytes(opt)
        planned = opt.plan.ranks[0].optimizer_state_bytes
        line = f"| {label} | {planned / 2 ** 20:.2f} MiB | {allocated / 2 ** 20:.2f} MiB |"
        ok &= planned == allocated
        if device.type == "cuda":
            grown = torch.cuda.memory_allocated(device) - before
            torch.cuda.reset_peak_memory_stats(device)
            for step in range(4):
                set_grads(model, step)
                opt.step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            r = opt.plan.ranks[0]
            model_bytes = r.param_bytes + r.grad_bytes + r.optimizer_state_bytes + r.peak_transient_bytes
            line += (f" grown at construction {grown / 2 ** 20:.2f} MiB; peak in steps {peak / 2 ** 20:.2f} MiB vs "
                     f"params + grads + state + modeled transient {model_bytes / 2 ** 20:.2f} MiB "
                     f"({peak / model_bytes:.2f}x) |")
        else:
            line += " |"
        lines.append(line + (" PASS |" if planned == allocated else " FAIL |"))
        del opt, model
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU test of this script)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine.")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gpu_check on {name}; torch {torch.__version__}; quick={args.quick}\n")
    t0 = time.perf_counter()
    ok = True
    print("## 1. single-process step vs the CPU\n\n| check | result | verdict |\n|---|---|---|")
    lines, passed = check_step_equals_cpu(device, args.quick)
    ok &= passed
    print("\n".join(lines), flush=True)
    print(f"\n## 2. one refresh of a bucket ({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(check_roots(device, args.quick)), flush=True)
    print(f"\n## 3. plain step vs the GEMM floor ({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(check_step_vs_floor(device, args.quick)), flush=True)
    print(f"\n## 4. memory vs the planner ({time.perf_counter() - t0:.0f} s)\n")
    lines, passed = check_memory(device, args.quick)
    ok &= passed
    print("\n".join(lines))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; correctness checks {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
