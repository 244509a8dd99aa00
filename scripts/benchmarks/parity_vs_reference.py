"""ShardedShampoo vs the reference Distributed Shampoo, variant by variant, on one small seeded problem.

The reference is facebookresearch/optimizers (``DistributedShampoo``), read from a local checkout
given with ``--reference`` and put on ``sys.path`` at run time only (never vendored, never a
dependency). Both optimizers run 60 steps of the same problem, single process, float32:

* parameters ``w2d (64, 32)``, ``bias (16,)``, ``w3d (32, 16, 8)``, ``wblk (80, 24)``, drawn in that
  order from ``torch.Generator().manual_seed(0)`` as ``randn * 0.1``;
* the gradient of step ``t`` is ``randn(shape, generator=manual_seed(1000 + t)) + W`` at the current
  parameters (the training sequence of GPA / Schedule-Free): ``0.5 ||W||^2`` plus seeded noise;
* ``lr_t = lr * min(1, t / warmup)`` for variants with a warmup (``lr``: the group's at construction), written
  into every group's ``lr``;
* common settings (``BASE``): lr 0.01, betas (0.9, 0.999), epsilon 1e-6, max_preconditioner_dim 64,
  precondition_frequency 10, start_preconditioning_step 20 (every factor is full rank at the first
  root: the well-conditioned regime), bias correction, AdaGrad grafting (epsilon 1e-8).

The metric per parameter is the error of the displacement, ``||(W - W0) - (W_ref - W0)|| /
||W_ref - W0||`` (``W0`` is large next to some runs' motion), maxed over parameters and over steps
1, 10, 30 and 60; for GPA / Schedule-Free also over the parameters after ``opt.eval()``. A row
passes at <= ``--tolerance`` (1e-4).

Adding a row: put ``VARIANTS["name"] = Variant(reference=..., ours=...)`` below. Both builders return
a :class:`Setup` -- constructor keyword arguments on top of the common ones and a warmup; the
reference builder receives the imported ``distributed_shampoo`` package.

    OMP_NUM_THREADS=1 python -m scripts.benchmarks.parity_vs_reference --reference /work/ref
    ... --variants gpa schedule-free          # some rows only;  --list: the registry
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

SHAPES: list[tuple[str, tuple[int, ...]]] = [("w2d", (64, 32)), ("bias", (16,)), ("w3d", (32, 16, 8)),
                                             ("wblk", (80, 24))]
STEPS = 60
SAVE_STEPS = (1, 10, 30, 60)
#: Settings both optimizers share (the reference's spelling is derived in reference_base()).
LR, BETAS, EPSILON, MAX_DIM, FREQUENCY, START = 0.01, (0.9, 0.999), 1e-6, 64, 10, 20


@dataclass
class Setup:
    """One side of a row: constructor keyword arguments (on top of the common ones), a warmup, and
    optionally param groups: dicts of group settings with ``"names"`` (parameters of ``SHAPES``)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    warmup: int = 0
    groups: Optional[list[dict[str, Any]]] = None


@dataclass(frozen=True)
class Variant:
    """A row of the table: how each optimizer is configured for it."""

    reference: Callable[[Any], Setup]     # receives the distributed_shampoo package
    ours: Callable[[], Setup]
    description: str = ""


# ----------------------------------------------------------------------------- the problem


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float32) * 0.1) for _, shape in SHAPES]


def set_grads(step: int, params: list[torch.nn.Parameter]) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32) + p.detach()


def lr_at(step: int, warmup: int, lr: float = LR) -> float:
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


# ----------------------------------------------------------------------------- the registry


def reference_base(ds: Any) -> dict[str, Any]:
    return dict(lr=LR, betas=BETAS, epsilon=EPSILON, weight_decay=0.0, max_preconditioner_dim=MAX_DIM,
                precondition_frequency=FREQUENCY, start_preconditioning_step=START, use_bias_correction=True,
                grafting_config=ds.AdaGradPreconditionerConfig(epsilon=1e-8),
                preconditioner_config=ds.RootInvShampooPreconditionerConfig())


def our_base() -> dict[str, Any]:
    from sharded_shampoo import AdaGradGrafting, RootInverseShampoo

    return dict(lr=LR, betas=BETAS, epsilon=EPSILON, weight_decay=0.0, max_preconditioner_dim=MAX_DIM,
                precondition_frequency=FREQUENCY, start_preconditioning_step=START, use_bias_correction=True,
                grafting=AdaGradGrafting(epsilon=1e-8), preconditioner=RootInverseShampoo())


def _ref_averaging(name: str, **kw: Any) -> Callable[[Any], Setup]:
    def build(ds: Any) -> Setup:
        import distributed_shampoo.shampoo_types as st      # ClassicMomentumConfig is not exported (S8)

        return Setup({"iterate_averaging_config": getattr(st, name)(**kw)})
    return build


def _ours_averaging(name: str, **kw: Any) -> Callable[[], Setup]:
    def build() -> Setup:
        import sharded_shampoo

        return Setup({"iterate_averaging": getattr(sharded_shampoo, name)(**kw)})
    return build


def _weight_decay(kind: str, wd: float, warmup: int = 0, **extra: Any) -> Variant:
    def ref(ds: Any) -> Setup:
        return Setup(dict(weight_decay=wd, weight_decay_type=getattr(ds.WeightDecayType, kind)), warmup)

    def ours() -> Setup:
        return Setup(dict(weight_decay=wd, weight_decay_type=kind), warmup)
    return Variant(ref, ours, f"weight_decay={wd} {kind}" + (f", lr warmup {warmup}" if warmup else ""))


GPA = dict(eval_interp_coeff=0.9, train_interp_coeff=0.8)
SF = dict(train_interp_coeff=0.8, eval_coeff_lr_power=2)


def _gpa_wd_ref(ds: Any) -> Setup:
    return Setup({**_ref_averaging("GeneralizedPrimalAveragingConfig", **GPA)(ds).kwargs, "weight_decay": 0.1})


def _gpa_wd_ours() -> Setup:
    return Setup({**_ours_averaging("GeneralizedPrimalAveraging", **GPA)().kwargs, "weight_decay": 0.1})


# spectral / sign descent (variants.md 14.2): the 2-D parameters (w3d merged to (32, 128)) in a group whose blocks
# are whole matrices, the 1-D bias with AdaGrad -- the reference's AdaGrad preconditioner config, ours the
# grafting direction of a 1-D block (BlockingConfig(precondition_1d=False)); no grafting on the matrices
MATRICES = ["w2d", "w3d", "wblk"]


def _ref_scale_l1(grad: torch.Tensor) -> torch.Tensor:      # the reference's l-infinity example (a named function)
    return grad.abs().sum()


def _ref_muon_scale(d_in: int, d_out: int) -> float:
    return max(1.0, d_out / d_in) ** 0.5


def _spectral(ortho: Callable[[Any], Any], ours_ortho: Callable[[], Any], description: str, graft: bool = False,
              **extra: Any) -> Variant:
    """``graft``: AdaGrad grafting on the matrices too (grafting direction before step 20, then rescaled)."""
    def ref(ds: Any) -> Setup:
        import math

        grafting = ds.AdaGradPreconditionerConfig(epsilon=1e-8) if graft else None
        return Setup(dict(grafting_config=grafting, preconditioner_config=ds.SpectralDescentPreconditionerConfig(
            orthogonalization_config=ortho(ds)), **extra),
            groups=[{"names": MATRICES, "max_preconditioner_dim": math.inf},
                    {"names": ["bias"], "preconditioner_config": ds.AdaGradPreconditionerConfig(epsilon=1e-8)}])

    def ours() -> Setup:
        from sharded_shampoo import AdaGradGrafting, BlockingConfig, SpectralDescent

        grafting = dict(grafting=AdaGradGrafting(epsilon=1e-8)) if graft else \
            dict(grafting=None, start_preconditioning_step=None)
        return Setup(dict(preconditioner=SpectralDescent(ours_ortho()), **grafting, **extra),
                     groups=[{"names": MATRICES, "max_preconditioner_dim": 1 << 20},
                             {"names": ["bias"], "grafting": AdaGradGrafting(epsilon=1e-8),
                              "blocking": BlockingConfig(precondition_1d=False)}])
    return Variant(ref, ours, description)


def _ref_orth(kind: str, **kw: Any) -> Callable[[Any], Any]:
    def build(ds: Any) -> Any:
        import distributed_shampoo.preconditioner.matrix_functions_types as mft

        return getattr(mft, kind)(**kw)
    return build


def _ours(kind: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        import sharded_shampoo

        return getattr(sharded_shampoo, kind)(**kw)
    return build


def _sign(ref_scale: Optional[Callable[[torch.Tensor], Any]], ours_scale: str, lr: float) -> Variant:
    def ref(ds: Any) -> Setup:
        config = ds.SignDescentPreconditionerConfig(**({"scale_fn": ref_scale} if ref_scale else {}))
        return Setup(dict(grafting_config=None, preconditioner_config=config, lr=lr))

    def ours() -> Setup:
        from sharded_shampoo import SignDescent

        return Setup(dict(grafting=None, preconditioner=SignDescent(scale_fn=ours_scale), lr=lr,
                          start_preconditioning_step=None))
    return Variant(ref, ours, f"SignDescent(scale_fn={ours_scale!r}), no grafting, lr={lr}")


SPECTRAL_VARIANTS: dict[str, Variant] = {
    "spectral": _spectral(_ref_orth("NewtonSchulzOrthogonalizationConfig"), _ours("NewtonSchulz"),
                          "SpectralDescent(NewtonSchulz()), matrices whole, bias AdaGrad, no grafting"),
    "spectral-svd": _spectral(_ref_orth("SVDOrthogonalizationConfig"), _ours("SVD"), "as spectral with SVD()"),
    "spectral-graft": _spectral(_ref_orth("NewtonSchulzOrthogonalizationConfig"), _ours("NewtonSchulz"),
                                "as spectral with AdaGrad grafting (grafting direction before step 20)", graft=True),
    "spectral-svd-nuclear": _spectral(_ref_orth("SVDOrthogonalizationConfig", scale_by_nuclear_norm=True),
                                      _ours("SVD", scale_by_nuclear_norm=True),
                                      "SVD(scale_by_nuclear_norm=True), lr=1e-4", lr=1e-4),
    # the reference's "muon" row with beta3 = beta1 (heavy-ball momentum; beta3 is another branch's option)
    "muon-heavy-ball": _spectral(_ref_orth("NewtonSchulzOrthogonalizationConfig", scale_by_dims_fn=_ref_muon_scale),
                                 _ours("NewtonSchulz", scale_by_dims_fn="muon"),
                                 "NewtonSchulz(scale_by_dims_fn='muon'), betas=(0.95, .), no bias correction, lr=0.02",
                                 betas=(0.95, 0.999), use_bias_correction=False, lr=0.02),
    "sign": _sign(None, "one", LR),
    "sign-l1": _sign(_ref_scale_l1, "l1_norm", 1e-4),
}


def _family(ref: Callable[[Any], dict[str, Any]], ours: Callable[[], dict[str, Any]], description: str) -> Variant:
    """A row whose two sides are keyword arguments built from the imported packages (no warmup)."""
    import sharded_shampoo

    return Variant(lambda ds: Setup(ref(ds)), lambda: Setup(ours_kwargs(ours, sharded_shampoo)), description)


def ours_kwargs(build: Callable[..., dict[str, Any]], package: Any) -> dict[str, Any]:
    return build(package) if build.__code__.co_argcount else build()


def _ref_eig(ds: Any, **kw: Any) -> Any:
    """The reference's EigendecomposedShampoo config with ``EighEigendecompositionConfig(**kw)``."""
    from distributed_shampoo.preconditioner.matrix_functions_types import EighEigendecompositionConfig

    return ds.EigendecomposedShampooPreconditionerConfig(amortized_computation_config=EighEigendecompositionConfig(**kw))


def _ref_pinv(ds: Any) -> Any:
    from distributed_shampoo.preconditioner.matrix_functions_types import PseudoInverseConfig

    return PseudoInverseConfig(rank_atol=0.0, rank_rtol=1e-4)


NO_GRAFT_REF = {"grafting_config": None}
NO_GRAFT = {"grafting": None}
SOAP_REF = {"grafting_config": None, "epsilon": 1e-8}
SOAP = {"grafting": None, "epsilon": 1e-8}
PINV_START = {"epsilon": 0.0, "start_preconditioning_step": 10}

#: the Shampoo-family rows of issue 16 (eigendecomposed, adaptive refresh, trace scaling, rank handling, beta3)
FAMILY: dict[str, Variant] = {
    "eigendecomposed": _family(lambda ds: {"preconditioner_config": ds.EigendecomposedShampooPreconditionerConfig()},
                               lambda s: {"preconditioner": s.EigendecomposedShampoo()},
                               "EigendecomposedShampoo(), AdaGrad grafting"),
    "eigendecomposed-unpacked": _family(
        lambda ds: {"preconditioner_config": ds.EigendecomposedShampooPreconditionerConfig(
            use_symmetric_packing=False)},
        lambda s: {"preconditioner": s.EigendecomposedShampoo(symmetric_packing=False)},
        "EigendecomposedShampoo(symmetric_packing=False)"),
    "eigendecomposed-kl": _family(
        lambda ds: {"preconditioner_config": ds.EigendecomposedKLShampooPreconditionerConfig()},
        lambda s: {"preconditioner": s.EigendecomposedKLShampoo()}, "EigendecomposedKLShampoo(), AdaGrad grafting"),
    "eigendecomposed-kl-tol": _family(
        lambda ds: {"preconditioner_config": ds.EigendecomposedKLShampooPreconditionerConfig(
            amortized_computation_config=_ref_eig(ds, tolerance=0.05).amortized_computation_config),
            "precondition_frequency": 5},
        lambda s: {"preconditioner": s.EigendecomposedKLShampoo(tolerance=0.05), "precondition_frequency": 5},
        "EigendecomposedKLShampoo(tolerance=0.05), precondition_frequency=5"),
    "eigendecomposed-tol": _family(
        lambda ds: {"preconditioner_config": _ref_eig(ds, tolerance=0.05), "precondition_frequency": 5},
        lambda s: {"preconditioner": s.EigendecomposedShampoo(tolerance=0.05), "precondition_frequency": 5},
        "EigendecomposedShampoo(tolerance=0.05), precondition_frequency=5"),
    "soap": _family(lambda ds: {"preconditioner_config": ds.EigenvalueCorrectedShampooPreconditionerConfig(),
                                **SOAP_REF},
                    lambda s: {"preconditioner": s.EigenvalueCorrectedShampoo(), **SOAP},
                    "EigenvalueCorrectedShampoo(), no grafting, epsilon=1e-8"),
    "soap-tol": _family(
        lambda ds: {"preconditioner_config": ds.EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=_ref_eig(ds, tolerance=0.05).amortized_computation_config),
            "precondition_frequency": 5, **SOAP_REF},
        lambda s: {"preconditioner": s.EigenvalueCorrectedShampoo(tolerance=0.05), "precondition_frequency": 5,
                   **SOAP},
        "EigenvalueCorrectedShampoo(tolerance=0.05), no grafting, epsilon=1e-8, precondition_frequency=5"),
    "trace-scaling": _family(
        lambda ds: {"preconditioner_config": ds.RootInvShampooPreconditionerConfig(use_trace_scaling=True),
                    **NO_GRAFT_REF},
        lambda s: {"preconditioner": s.RootInverseShampoo(trace_scaling_exponent=0.5), **NO_GRAFT},
        "RootInverseShampoo(trace_scaling_exponent=0.5), no grafting"),
    "trace-scaling-0.25": _family(
        lambda ds: {"preconditioner_config": ds.RootInvShampooPreconditionerConfig(
            use_trace_scaling=True, trace_scaling_exponent=0.25), **NO_GRAFT_REF},
        lambda s: {"preconditioner": s.RootInverseShampoo(trace_scaling_exponent=0.25), **NO_GRAFT},
        "RootInverseShampoo(trace_scaling_exponent=0.25), no grafting"),
    "drop-weighting": _family(
        lambda ds: {"preconditioner_config": ds.RootInvShampooPreconditionerConfig(
            drop_weighting_factor_on_gsquare=True), **NO_GRAFT_REF},
        lambda s: {"preconditioner": s.RootInverseShampoo(drop_weighting_factor_on_gsquare=True), **NO_GRAFT},
        "RootInverseShampoo(drop_weighting_factor_on_gsquare=True), no grafting"),
    "pseudo-inverse": _family(
        lambda ds: {"preconditioner_config": ds.RootInvShampooPreconditionerConfig(
            amortized_computation_config=ds.EigenConfig(rank_deficient_stability_config=_ref_pinv(ds))),
            **PINV_START},
        lambda s: {"preconditioner": s.RootInverseShampoo(root=s.EighRootConfig(
            rank_handling=s.PseudoInverse(rank_atol=0.0, rank_rtol=1e-4))), **PINV_START},
        "EighRootConfig(rank_handling=PseudoInverse(0, 1e-4)), epsilon=0, start 10 (a rank-10 16x16 factor)"),
    "pseudo-inverse-eigendecomposed": _family(
        lambda ds: {"preconditioner_config": _ref_eig(ds, rank_deficient_stability_config=_ref_pinv(ds)),
                    **PINV_START},
        lambda s: {"preconditioner": s.EigendecomposedShampoo(eigenbasis=s.EighRootConfig(
            rank_handling=s.PseudoInverse(rank_atol=0.0, rank_rtol=1e-4))), **PINV_START},
        "EigendecomposedShampoo with PseudoInverse(0, 1e-4), epsilon=0, start 10"),
    "beta3": _family(lambda ds: {"beta3": 0.81}, lambda: {"beta3": 0.81}, "beta3=0.81 (NAdam-like)"),
}

#: name -> Variant. Other preconditioner / update variants add their rows here.
VARIANTS: dict[str, Variant] = {
    "shampoo": Variant(lambda ds: Setup(), lambda: Setup(), "root-inverse Shampoo, AdaGrad grafting (the base)"),
    "momentum": Variant(_ref_averaging("ClassicMomentumConfig", momentum=0.9, dampening=0.1),
                        _ours_averaging("ClassicMomentum", momentum=0.9, dampening=0.1),
                        "ClassicMomentum(momentum=0.9, dampening=0.1)"),
    "nesterov": Variant(_ref_averaging("ClassicMomentumConfig", momentum=0.9, use_nesterov=True),
                        _ours_averaging("ClassicMomentum", momentum=0.9, use_nesterov=True),
                        "ClassicMomentum(momentum=0.9, use_nesterov=True)"),
    "gpa": Variant(_ref_averaging("GeneralizedPrimalAveragingConfig", **GPA),
                   _ours_averaging("GeneralizedPrimalAveraging", **GPA), "GeneralizedPrimalAveraging(0.9, 0.8)"),
    "gpa-wd": Variant(_gpa_wd_ref, _gpa_wd_ours, "as gpa, weight_decay=0.1 DECOUPLED (shrinks z)"),
    "schedule-free": Variant(lambda ds: Setup(_ref_averaging("ScheduleFreeConfig", **SF)(ds).kwargs, 10),
                             lambda: Setup(_ours_averaging("ScheduleFree", **SF)().kwargs, 10),
                             "ScheduleFree(0.8, eval_coeff_lr_power=2), lr warmup 10"),
    "wd-l2": _weight_decay("L2", 0.1),
    "wd-decoupled": _weight_decay("DECOUPLED", 0.1),
    "wd-corrected": _weight_decay("CORRECTED", 0.1, warmup=10),
    "wd-independent": _weight_decay("INDEPENDENT", 5e-4),
    **SPECTRAL_VARIANTS,
    **FAMILY,
}


def _kl(nograft: bool = False, **fields: Any) -> Variant:
    """A KL-Shampoo row: the reference's ``RootInvKLShampooPreconditionerConfig`` vs our :class:`KLShampoo`."""
    ref_fields = {"use_symmetric_packing": fields["symmetric_packing"]} if "symmetric_packing" in fields else {}

    def ref(ds: Any) -> Setup:
        kw: dict[str, Any] = {"preconditioner_config": ds.RootInvKLShampooPreconditionerConfig(**ref_fields)}
        return Setup({**kw, "grafting_config": None} if nograft else kw)

    def ours() -> Setup:
        from sharded_shampoo import KLShampoo

        kw: dict[str, Any] = {"preconditioner": KLShampoo(**fields)}
        return Setup({**kw, "grafting": None} if nograft else kw)
    return Variant(ref, ours, "KLShampoo(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
                   + (", no grafting" if nograft else ""))


VARIANTS.update({
    "kl-shampoo": _kl(),
    "kl-shampoo-unpacked": _kl(symmetric_packing=False),
    "kl-shampoo-nograft": _kl(nograft=True),
})


# ----------------------------------------------------------------------------- running


@dataclass
class Trajectory:
    init: list[torch.Tensor]
    steps: dict[int, list[torch.Tensor]]
    eval_params: Optional[list[torch.Tensor]]     # after opt.eval() (GPA / Schedule-Free), else None
    refresh_skips: Optional[tuple[int, int]] = None  # ours with a tolerance: (refreshes kept, refreshes checked)


def run(make_optimizer: Callable[[list[torch.nn.Parameter]], Any], warmup: int, has_eval: bool) -> Trajectory:
    params = make_params()
    init = [p.detach().clone() for p in params]
    opt = make_optimizer(params)
    peak = [group["lr"] for group in opt.param_groups]      # a row's own lr (LR unless it sets one)
    saved: dict[int, list[torch.Tensor]] = {}
    for t in range(1, STEPS + 1):
        for group, lr in zip(opt.param_groups, peak):
            group["lr"] = lr_at(t, warmup, lr)
        set_grads(t, params)
        opt.step()
        if t in SAVE_STEPS:
            saved[t] = [p.detach().clone() for p in params]
    eval_params = None
    if has_eval:
        opt.eval()
        eval_params = [p.detach().clone() for p in params]
        opt.train()
    return Trajectory(init, saved, eval_params, refresh_skips(opt))


def refresh_skips(opt: Any) -> Optional[tuple[int, int]]:
    """(skipped, checked) factor refreshes of the adaptive refresh, summed over buckets (None: no check ran,
    or not our optimizer)."""
    runtime = getattr(opt, "runtime", None)
    counts = [b.refresh_counts for b in getattr(runtime, "buckets", [])]
    checked = sum(c.checked for c in counts)
    return (sum(c.skipped for c in counts), checked) if checked else None


def reference_run(variant: Variant, ds: Any) -> Trajectory:
    setup = variant.reference(ds)
    kwargs = {**reference_base(ds), **setup.kwargs}
    has_eval = type(kwargs.get("iterate_averaging_config")).__name__ in ("GeneralizedPrimalAveragingConfig",
                                                                         "ScheduleFreeConfig")
    # a fresh distributed config per run and group: spectral descent edits the one it is given (variants.md S7)
    fresh = dict(distributed_config=ds.SingleDeviceDistributedConfig())
    return run(lambda ps: ds.DistributedShampoo(_grouped(setup, ps, fresh), **fresh, **kwargs), setup.warmup,
               has_eval)


def _grouped(setup: Setup, params: list[torch.nn.Parameter], per_group: dict[str, Any],
             named: bool = False) -> list[Any]:
    """``params`` (as ``(name, p)`` pairs if ``named``), or the setup's param groups over them."""
    by_name = {n: p for (n, _), p in zip(SHAPES, params)}
    if setup.groups is None:
        return [(n, p) for n, p in by_name.items()] if named else list(params)
    out = []
    for g in setup.groups:
        chosen = [(n, by_name[n]) for n in g["names"]]
        out.append({**{k: v for k, v in g.items() if k != "names"}, **per_group,
                    "params": chosen if named else [p for _, p in chosen]})
    return out


def our_run(variant: Variant) -> Trajectory:
    from sharded_shampoo import ShardedShampoo
    from sharded_shampoo.config import PRIMAL_AVERAGING_TYPES

    setup = variant.ours()
    kwargs = {**our_base(), **setup.kwargs}
    has_eval = isinstance(kwargs.get("iterate_averaging"), PRIMAL_AVERAGING_TYPES)
    return run(lambda ps: ShardedShampoo(_grouped(setup, ps, {}, named=True), **kwargs), setup.warmup, has_eval)


def displacement_error(ours: list[torch.Tensor], ref: list[torch.Tensor], init: list[torch.Tensor]) -> float:
    return max(float(((a - w0) - (b - w0)).norm() / (b - w0).norm()) for a, b, w0 in zip(ours, ref, init))


def compare(ours: Trajectory, ref: Trajectory) -> tuple[float, float, Optional[float]]:
    """(max error over the saved steps, error at the last step, error of the eval-mode parameters)."""
    per_step = [displacement_error(ours.steps[t], ref.steps[t], ref.init) for t in SAVE_STEPS]
    eval_err = None
    if ref.eval_params is not None:
        assert ours.eval_params is not None, "the reference has an eval sequence but ours does not"
        eval_err = displacement_error(ours.eval_params, ref.eval_params, ref.init)
    return max(per_step), per_step[-1], eval_err


def import_reference(path: str) -> Any:
    sys.path.insert(0, os.path.abspath(path))
    logging.disable(logging.WARNING)      # the reference logs a warning per group at construction
    import distributed_shampoo as ds

    return ds


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", help="path of a facebookresearch/optimizers checkout")
    p.add_argument("--variants", nargs="*", default=None, help="rows to run (default: all)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--list", action="store_true", help="print the registry and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:16s} {v.description}")
        return 0
    if not args.reference:
        p.error("--reference PATH is required (a facebookresearch/optimizers checkout)")
    unknown = sorted(set(args.variants or []) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    ds = import_reference(args.reference)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"{STEPS} steps, float32, CPU; displacement error max over steps {SAVE_STEPS} (and eval-mode params)")
    print(f"| variant | ours vs reference (max over steps) | at step {STEPS} | eval-mode params | "
          f"<= {args.tolerance:g} |")
    print("|---|---|---|---|---|")
    failed, notes = [], []
    for name in args.variants or list(VARIANTS):
        ours = our_run(VARIANTS[name])
        worst, last, eval_err = compare(ours, reference_run(VARIANTS[name], ds))
        if ours.refresh_skips is not None:
            notes.append(f"{name}: ours kept {ours.refresh_skips[0]} of {ours.refresh_skips[1]} factor refreshes")
        ok = max(worst, eval_err or 0.0) <= args.tolerance
        failed += [] if ok else [name]
        eval_text = "-" if eval_err is None else f"{eval_err:.2e}"
        print(f"| {name} | {worst:.2e} | {last:.2e} | {eval_text} | {'yes' if ok else 'NO'} |")
    if notes:
        print("\nadaptive refresh (tolerance): " + "; ".join(notes))
    if failed:
        print(f"rows over the tolerance: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
