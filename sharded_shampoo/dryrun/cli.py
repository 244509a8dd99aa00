"""``sharded-shampoo`` command line. Subcommand ``plan``: the dry-run planner.

    sharded-shampoo plan --model llama3-8b --mesh 64
    sharded-shampoo plan --model llama3-405b --mesh 32x64 --json plan.json --png plan.png
    sharded-shampoo plan --model llama3-405b --mesh dp=8,fsdp=32,tp=8
    sharded-shampoo plan --model llama3-405b --mesh pp=16,dp=32,fsdp=16,tp=8
    sharded-shampoo plan --model mixtral-8x7b --mesh 64 --ep 8
    sharded-shampoo plan --model mypkg.models:build --mesh 8

``main(argv)`` returns an exit status instead of exiting so tests (and notebooks) can call it
in-process: 0 on success, 2 on a bad argument or a configuration that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ..config import (
    AdaGradGrafting,
    AdamGrafting,
    EigenvalueCorrectedShampoo,
    RMSpropGrafting,
    RootInverseShampoo,
    SGDGrafting,
)
from ..config import PlanSettings
from .build import parse_dtype, plan_model
from .meshes import parse_axes
from .presets import preset_names
from .report import DryRunError, format_report, write_png

_GRAFTING = {
    "adagrad": AdaGradGrafting, "rmsprop": RMSpropGrafting, "adam": AdamGrafting, "sgd": SGDGrafting,
    "none": None,
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharded-shampoo", description="Distributed Shampoo for DTensor/FSDP2.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "plan", help="dry-run: memory, communication and work per GPU before you launch",
        description="Build the model on the meta device, shard it with FSDP2 over a fake process group of the "
                    "mesh, and print the Shampoo plan the optimizer would use.")
    p.add_argument("--model", help=f"preset ({', '.join(preset_names())}) or package.module:factory")
    p.add_argument("--mesh", help="S for FSDP over S ranks, RxS for HSDP (R replicas x S shards, e.g. 16x64), or "
                                   "named axes pp=P,dp=R,fsdp=S,tp=T,ep=E (e.g. dp=8,fsdp=32,tp=8 or "
                                   "pp=16,dp=32,fsdp=16,tp=8)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (adds a tp axis to --mesh)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree (experts sharded over ep within fsdp x tp)")
    p.add_argument("--list-models", action="store_true", help="list the presets and exit")
    p.add_argument("--max-preconditioner-dim", type=int, default=1024)
    p.add_argument("--precondition-frequency", type=int, default=100)
    p.add_argument("--param-dtype", default=None, help="cast parameters (fp32, bf16, fp16); default: as built")
    p.add_argument("--preconditioner", choices=("shampoo", "eigenvalue-corrected"), default="shampoo")
    p.add_argument("--factor-dtype", default="fp32", help="dtype of factors and roots (fp32 or fp64)")
    p.add_argument("--grafting", choices=sorted(_GRAFTING), default="adagrad")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--comm-dtype", default="fp32", help="dtype of the gradient/update exchange (fp32, bf16)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="per-rank cap on params + grads + optimizer state, in GiB")
    p.add_argument("--top", type=int, default=8, help="busiest ranks to list for meshes over 16 ranks")
    p.add_argument("--all-ranks", action="store_true", help="print every rank, even on large meshes")
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON")
    p.add_argument("--json-no-blocks", action="store_true", help="leave the per-block list out of the JSON")
    p.add_argument("--png", metavar="FILE", help="draw per-rank memory and load (needs matplotlib)")
    return parser


def _settings(args: argparse.Namespace) -> PlanSettings:
    factor_dtype = parse_dtype(args.factor_dtype, "--factor-dtype")
    if args.preconditioner == "shampoo":
        pre = RootInverseShampoo(factor_dtype=factor_dtype)
    else:
        pre = EigenvalueCorrectedShampoo(factor_dtype=factor_dtype)
    graft_cls = _GRAFTING[args.grafting]
    for flag, value, low in (("--max-preconditioner-dim", args.max_preconditioner_dim, 1),
                             ("--precondition-frequency", args.precondition_frequency, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}; got {value}.")
    try:
        return PlanSettings(
            max_preconditioner_dim=args.max_preconditioner_dim, preconditioner=pre,
            grafting=graft_cls() if graft_cls is not None else None, beta1=args.beta1, momentum=args.momentum,
            precondition_frequency=args.precondition_frequency,
            comm_dtype=parse_dtype(args.comm_dtype, "--comm-dtype"))
    except ValueError as err:          # name the command-line flag, not the dataclass field
        message = str(err)
        for name in ("max_preconditioner_dim", "precondition_frequency", "beta1", "momentum", "comm_dtype"):
            message = message.replace(f"PlanSettings.{name}", "--" + name.replace("_", "-"))
        raise ValueError(message) from err


def _check_writable(option: str, path: str | None) -> None:
    """Fail before minutes of planning if an output file cannot be written."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; give a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: the directory {folder!r} does not exist.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path!r} cannot be written (permission denied).")


def _run_plan(args: argparse.Namespace) -> int:
    if args.list_models:
        print("\n".join(preset_names()))
        return 0
    if not args.model or not args.mesh:
        raise ValueError("plan needs --model (a preset or package.module:factory) and --mesh (e.g. 64, 16x64 or "
                         "dp=8,fsdp=32,tp=8).")
    axes = parse_axes(args.mesh, tp=args.tp, ep=args.ep)
    param_dtype = parse_dtype(args.param_dtype) if args.param_dtype else None
    settings = _settings(args)
    cap = None
    if args.memory_cap_gib is not None:
        if not args.memory_cap_gib > 0:
            raise ValueError(f"--memory-cap-gib must be > 0; got {args.memory_cap_gib}.")
        cap = int(args.memory_cap_gib * 1024 ** 3)
    if args.top < 1:
        raise ValueError(f"--top must be >= 1; got {args.top}.")
    _check_writable("--json", args.json)
    _check_writable("--png", args.png)
    if args.png:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise DryRunError("--png needs matplotlib: pip install 'sharded-shampoo[plot]' (or matplotlib).")
    plan = plan_model(args.model, axes, settings, param_dtype=param_dtype, memory_cap_bytes=cap)
    name = args.model.strip()
    print(format_report(plan, name, top=args.top, all_ranks=args.all_ranks))
    if args.json:
        data = plan.to_json(include_blocks=not args.json_no_blocks)
        data["model"] = name
        with open(args.json, "w") as f:
            json.dump(data, f)
        print(f"wrote {args.json}")
    if args.png:
        write_png(plan, args.png, name)
        print(f"wrote {args.png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sharded-shampoo`` console script."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:         # --help or a usage error: argparse already printed
        return int(exc.code or 0)
    try:
        if args.command == "plan":
            return _run_plan(args)
    except (ValueError, DryRunError, OSError) as err:
        print(f"sharded-shampoo {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
