"""``sharded-shampoo`` command line. Subcommand ``plan``: the dry-run planner.

    sharded-shampoo plan --model llama3-8b --mesh 64
    sharded-shampoo plan --model llama3-405b --mesh 32x64 --json plan.json --png plan.png
    sharded-shampoo plan --model llama3-405b --mesh dp=8,fsdp=32,tp=8
    sharded-shampoo plan --model llama3-405b --mesh pp=16,dp=32,fsdp=16,tp=8
    sharded-shampoo plan --model mixtral-8x7b --mesh 64 --ep 8
    sharded-shampoo plan --model mypkg.models:build --mesh 8
    sharded-shampoo plan --model torchtitan:llama3:8B --mesh fsdp=8,tp=2

``main(argv)`` returns an exit status instead of exiting so tests (and notebooks) can call it
in-process: 0 on success, 2 on a bad argument or a configuration that does not fit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import (
    COMM_DTYPES,
    AdaGradGrafting,
    AdamGrafting,
    BlockingConfig,
    EigenvalueCorrectedShampoo,
    RMSpropGrafting,
    RootInverseShampoo,
    SGDGrafting,
)
from ..compute.kinds.kl_shampoo import KLShampoo
from ..compute.kinds.sign import SignDescent
from ..compute.kinds.spectral import SVD, NewtonSchulz, SpectralDescent
from ..config import PlanSettings
from ..compute.kinds.cost_model import DEFAULT_COST_MODEL, CostModel
from ..compute.kinds.eigendecomposed import EigendecomposedShampoo
from ..compute.kinds.eigendecomposed_kl import EigendecomposedKLShampoo
from .build import parse_dtype, plan_model
from .meshes import parse_axes
from .outputs import check_output_paths, write_output
from .presets import preset_names
from .report import DryRunError, format_report, write_png


#: --preconditioner choice -> the config for a --factor-dtype and a --tolerance (``Any``: the config union of
#: ``config.py`` cannot name the kinds defined in ``compute/kinds``; PlanSettings checks the value at run time)
_PRECONDITIONERS: dict[str, Callable[[torch.dtype, float], Any]] = {
    "shampoo": lambda dtype, tol: RootInverseShampoo(factor_dtype=dtype),
    "eigenvalue-corrected": lambda dtype, tol: EigenvalueCorrectedShampoo(factor_dtype=dtype, tolerance=tol),
    "kl-shampoo": lambda dtype, tol: KLShampoo(factor_dtype=dtype),
    "eigendecomposed": lambda dtype, tol: EigendecomposedShampoo(factor_dtype=dtype, tolerance=tol),
    "eigendecomposed-kl": lambda dtype, tol: EigendecomposedKLShampoo(factor_dtype=dtype, tolerance=tol),
    "spectral": lambda dtype, tol: SpectralDescent(NewtonSchulz(), factor_dtype=dtype),
    "spectral-svd": lambda dtype, tol: SpectralDescent(SVD(), factor_dtype=dtype),
    "sign": lambda dtype, tol: SignDescent(factor_dtype=dtype),
}
#: the choices with an adaptive refresh (--tolerance); the others take only --tolerance 0
_ADAPTIVE_REFRESH = ("eigenvalue-corrected", "eigendecomposed", "eigendecomposed-kl")
#: the choices without factors: their 1-D blocks (norms, biases) take the grafting direction (the Muon recipe)
_NO_FACTORS = ("spectral", "spectral-svd", "sign")

_GRAFTING = {
    "adagrad": AdaGradGrafting, "rmsprop": RMSpropGrafting, "adam": AdamGrafting, "sgd": SGDGrafting,
    "none": None,
}
#: How the help names dtypes (``parse_dtype`` also takes the long names, e.g. bfloat16).
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    names = [_DTYPE_NAMES[d] for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharded-shampoo", description="Distributed Shampoo for DTensor/FSDP2.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "plan", help="dry-run: memory, communication and work per GPU before you launch",
        description="Build the model on the meta device, shard it with FSDP2 over a fake process group of the "
                    "mesh, and print the Shampoo plan the optimizer would use.")
    _add_job_options(p)
    _add_optimizer_options(p)
    _add_output_options(p)
    return parser


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """The model and the mesh: what is planned."""
    p.add_argument("--model", help=f"preset ({', '.join(preset_names())}), package.module:factory (a function "
                                   "returning the nn.Module), or torchtitan:<model>:<flavor> (e.g. "
                                   "torchtitan:llama3:8B: torchtitan builds and parallelizes it); required, no default")
    p.add_argument("--mesh", help="S for FSDP over S ranks, RxS for HSDP (R replicas x S shards, e.g. 16x64), or "
                                   "named axes pp=P,dp=R,fsdp=S,tp=T,ep=E (e.g. dp=8,fsdp=32,tp=8 or "
                                   "pp=16,dp=32,fsdp=16,tp=8); required, no default")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree (adds a tp axis to --mesh); default: none (no tensor parallelism)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (experts sharded over ep within "
                                                        "fsdp x tp); default: none (no expert parallelism)")
    p.add_argument("--list-models", action="store_true", help="list the presets and exit; default: off")
    p.add_argument("--param-dtype", default=None,
                   help=f"cast parameters to {_dtype_list(list(_DTYPE_NAMES))}; default: as the model builds them")


def _add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """The ShardedShampoo settings that change the plan (the same names as the optimizer's arguments)."""
    p.add_argument("--max-preconditioner-dim", type=int, default=1024,
                   help="largest factor size: larger dims are split into blocks, smaller ones merged up to it; "
                        "default: %(default)s")
    p.add_argument("--precondition-frequency", type=int, default=100,
                   help="steps between root refreshes (amortizes their FLOPs in the report); default: %(default)s")
    p.add_argument("--preconditioner", choices=tuple(_PRECONDITIONERS), default="shampoo",
                   help="shampoo (inverse roots), eigenvalue-corrected (SOAP-like), kl-shampoo (KLShampoo: inverse "
                        "roots, KL factor update), eigendecomposed (inverse roots kept as eigenpairs), eigendecomposed-kl "
                        "(eigenpairs, KL factor update), spectral "
                        "(Muon: Newton-Schulz), spectral-svd or sign (no factors; 1-D blocks use the grafting "
                        "method: BlockingConfig(precondition_1d=False)); default: %(default)s")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="adaptive refresh tolerance in [0, 1] of eigendecomposed(-kl) / eigenvalue-corrected (a refresh "
                        "keeps a basis that still diagonalises its factor; 0: always refresh); default: %(default)s")
    p.add_argument("--refresh-skip-rate", type=float, default=None,
                   help="measured fraction of refreshes the tolerance skips (RefreshCounts.skip_rate of a similar "
                        "run), for the amortized refresh cost; needs --tolerance > 0; default: 0 (every refresh "
                        "charged in full)")
    p.add_argument("--factor-dtype", default="fp32",
                   help="dtype of factors and roots (spectral / sign: of the block math): fp32 or fp64; "
                        "default: %(default)s")
    p.add_argument("--grafting", choices=sorted(_GRAFTING), default="adagrad",
                   help="grafting method, whose state is counted per block (none: no grafting state); "
                        "default: %(default)s")
    p.add_argument("--beta1", type=float, default=0.9,
                   help="filtered-gradient coefficient in [0, 1) (0: no filtered-gradient state); default: %(default)s")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="momentum in [0, 1) (> 0: a momentum buffer per parameter shard); default: %(default)s")
    p.add_argument("--iterate-averaging", choices=("none", "gpa", "schedule-free"), default="none",
                   help="GPA or Schedule-Free iterate averaging: a z buffer per parameter shard (parameter dtype; "
                        "excludes --momentum); default: %(default)s")
    p.add_argument("--comm-dtype", default="fp32",
                   help=f"dtype of the gradient/update exchange: {_dtype_list(COMM_DTYPES)}; default: %(default)s")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="per-rank cap on params + grads + optimizer state, in GiB (a plan over it is an error); "
                        "default: no cap")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """What is printed and written (every file is checked before planning)."""
    p.add_argument("--top", type=int, default=8,
                   help="busiest ranks to list for meshes over 16 ranks; default: %(default)s")
    p.add_argument("--all-ranks", action="store_true", help="print every rank, even on large meshes; default: off")
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON to FILE; default: no JSON")
    p.add_argument("--json-no-blocks", action="store_true",
                   help="leave the per-block list out of the JSON; default: off (blocks included)")
    p.add_argument("--png", metavar="FILE",
                   help="draw per-rank memory and load to FILE (needs matplotlib); default: no PNG")


def _settings(args: argparse.Namespace) -> PlanSettings:
    factor_dtype = parse_dtype(args.factor_dtype, "--factor-dtype")
    if args.tolerance != 0 and args.preconditioner not in _ADAPTIVE_REFRESH:
        raise ValueError(f"--tolerance {args.tolerance} needs --preconditioner eigendecomposed, "
                         f"eigendecomposed-kl or eigenvalue-corrected ({args.preconditioner} has no adaptive refresh).")
    try:
        pre = _PRECONDITIONERS[args.preconditioner](factor_dtype, args.tolerance)
    except ValueError as err:          # name the flag, not the config field
        raise ValueError(re.sub(r"\b\w+\.tolerance\b", "--tolerance", str(err))) from err
    blocking = BlockingConfig(precondition_1d=args.preconditioner not in _NO_FACTORS)
    graft_cls = _GRAFTING[args.grafting]
    for flag, value, low in (("--max-preconditioner-dim", args.max_preconditioner_dim, 1),
                             ("--precondition-frequency", args.precondition_frequency, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}; got {value}.")
    try:
        return PlanSettings(
            max_preconditioner_dim=args.max_preconditioner_dim, preconditioner=pre, blocking=blocking,
            grafting=graft_cls() if graft_cls is not None else None, beta1=args.beta1, momentum=args.momentum,
            primal_averaging=args.iterate_averaging != "none",
            precondition_frequency=args.precondition_frequency,
            comm_dtype=parse_dtype(args.comm_dtype, "--comm-dtype"))
    except ValueError as err:          # name the command-line flag, not the dataclass field
        message = str(err)
        for name in ("max_preconditioner_dim", "precondition_frequency", "beta1", "momentum", "comm_dtype"):
            message = message.replace(f"PlanSettings.{name}", "--" + name.replace("_", "-"))
        message = message.replace("PlanSettings.primal_averaging=True", "--iterate-averaging gpa/schedule-free")
        raise ValueError(message) from err


def _cost_model(args: argparse.Namespace) -> CostModel:
    """The default cost model, with the measured ``--refresh-skip-rate`` where given."""
    rate = args.refresh_skip_rate
    if rate is None:
        return DEFAULT_COST_MODEL
    if not args.tolerance > 0:
        raise ValueError(f"--refresh-skip-rate {rate} needs --tolerance > 0 (without a tolerance no refresh is "
                         "skipped).")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--refresh-skip-rate must be a number in [0, 1]; got {rate}.")
    return CostModel(refresh_skip_rate=rate)


def _run_plan(args: argparse.Namespace) -> int:
    if args.list_models:
        print("\n".join(preset_names()))
        return 0
    if not args.model or not args.mesh:
        raise ValueError("plan needs --model (a preset or package.module:factory) and --mesh (e.g. 64, 16x64 or "
                         "dp=8,fsdp=32,tp=8).")
    check_output_paths([("--json", args.json), ("--png", args.png)])     # before minutes of planning
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
    if args.png:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise DryRunError("--png needs matplotlib: pip install 'sharded-shampoo[plot]' (or matplotlib).")
    plan = plan_model(args.model, axes, settings, param_dtype=param_dtype, memory_cap_bytes=cap,
                      cost_model=_cost_model(args))
    name = args.model.strip()
    print(format_report(plan, name, top=args.top, all_ranks=args.all_ranks, expert_mesh=axes.expert_mesh_text()))
    if args.json:
        data = plan.to_json(include_blocks=not args.json_no_blocks)
        data["model"] = name

        def dump(path: str) -> None:
            with open(path, "w") as f:
                json.dump(data, f)
        write_output("--json", args.json, dump)
        print(f"wrote {args.json}")
    if args.png:
        write_output("--png", args.png, lambda path: write_png(plan, path, name))
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
