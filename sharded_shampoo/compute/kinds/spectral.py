"""Spectral descent, the Muon-style update (:class:`SpectralDescent`): each 2-D block's direction is the
orthogonalised filtered gradient, ``P = orth(M_hat) * scale_by_dims_fn(d_in, d_out)``.

No state and no refresh: a block's owner orthogonalises the block it assembled, batched over its
bucket (:mod:`..orthogonalize`: Newton-Schulz as batched GEMMs on the small side's Gram matrix, or
the SVD polar factor). Because blocks are boxes of the *global* tensor, routed to one owner whatever
the placements, spectral descent runs on every layout the optimizer does (FSDP, HSDP, FSDP x TP with
``_StridedShard``, expert parallel) and its result does not depend on the layout.

Blocks must be 2-D: the blocking merges a parameter's dims toward 2 (never to 1, the reference's
``target_parameter_dimensionality = 2``, without touching any shared config object) and raises,
naming the parameter and the fix, for a block that stays 1-D or above 2-D -- unless the group says
``BlockingConfig(precondition_1d=False)``, which sends 1-D blocks to the grafting method (docs/user_guide.md).
``betas[1]``, ``epsilon`` and ``precondition_frequency`` have no effect on these blocks; with
``start_preconditioning_step=None`` they precondition from step 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

import torch

from ...checks import check_int
from ...config import config_class, preconditioner_config
from ..low_precision import chunk_slices
from ..orthogonalize import newton_schulz_, newton_schulz_flops, svd_polar_, svd_polar_flops
from .protocol import PreconditionerKind, StepContext
from .scale_functions import DIMS_SCALES, dims_scale

if TYPE_CHECKING:
    from .cost_model import CostModel

Triple = tuple[float, float, float]
#: dtypes the Newton-Schulz GEMMs may run in
MATMUL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
#: factor_dtype (the math dtype of a spectral / sign block: gathered gradient, filtered gradient, direction)
MATH_DTYPES = (torch.float32, torch.float64)


def _triple(owner: str, value: Any) -> Triple:
    if not (isinstance(value, Sequence) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{owner}.coefficients must be one (a, b, c) triple of finite numbers for every iteration, "
                         f"or one triple per iteration; got {value!r}.")
    return (float(value[0]), float(value[1]), float(value[2]))


def check_math_dtype(owner: str, dtype: Any) -> None:
    if dtype not in MATH_DTYPES:
        raise ValueError(f"{owner}.factor_dtype (the math dtype of its blocks) must be torch.float32 or "
                         f"torch.float64; got {dtype!r}.")


@config_class
@dataclass(frozen=True)
class NewtonSchulz:
    """Quintic Newton-Schulz orthogonalisation: ``X <- a X + b X X^T X + c (X X^T)^2 X`` from
    ``X = A / max(||A||_F, 1e-8)``, ``num_iterations`` times.

    ``coefficients``: one ``(a, b, c)`` for every iteration (default: Keller Jordan's Muon's, as the
    reference; they converge to singular values in about [0.7, 1.2], not to 1 -- ``(3, -16/5, 6/5)`` or the
    cubic ``(1.5, -0.5, 0)`` converge to ``U V^T``), or a tuple of ``num_iterations`` triples (one per
    iteration, e.g. Dion's / Polar Express schedules). ``scale_by_dims_fn``: the name of a registered
    ``fn(d_in, d_out) -> float`` (or the registered function; see ``scale_functions``), the multiplier of
    the orthogonalised ``(d_out, d_in)`` block. ``matmul_dtype``: the dtype of the iteration's GEMMs
    (fp32: the reference's; bf16: Muon's, faster on accelerators, ~3 significant digits).
    """

    num_iterations: int = 5
    coefficients: Union[Triple, tuple[Triple, ...]] = (3.4445, -4.7750, 2.0315)
    scale_by_dims_fn: str = "one"
    matmul_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_int("NewtonSchulz", "num_iterations", self.num_iterations)
        c = self.coefficients
        if isinstance(c, Sequence) and c and all(isinstance(t, Sequence) for t in c):
            if len(c) != self.num_iterations:
                raise ValueError(f"NewtonSchulz.coefficients has {len(c)} triples for num_iterations="
                                 f"{self.num_iterations}; give one triple per iteration, or one triple for all.")
            normal: Union[Triple, tuple[Triple, ...]] = tuple(_triple("NewtonSchulz", t) for t in c)
        else:
            normal = _triple("NewtonSchulz", c)
        object.__setattr__(self, "coefficients", normal)     # lists (e.g. from JSON) -> hashable tuples
        object.__setattr__(self, "scale_by_dims_fn",
                           DIMS_SCALES.name_of("NewtonSchulz.scale_by_dims_fn", self.scale_by_dims_fn))
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError("NewtonSchulz.matmul_dtype must be torch.float32, torch.bfloat16 or torch.float64; "
                             f"got {self.matmul_dtype!r}.")

    def schedule(self) -> list[Triple]:
        """The ``(a, b, c)`` of each iteration."""
        c = self.coefficients
        if isinstance(c[0], tuple):
            return list(c)
        return [c] * self.num_iterations


@config_class
@dataclass(frozen=True)
class SVD:
    """``U V^T`` of the reduced SVD (over the numerical rank; see ``compute/orthogonalize.py``), times the
    nuclear norm ``sum(S)`` if ``scale_by_nuclear_norm``, times ``scale_by_dims_fn(d_in, d_out)``."""

    scale_by_nuclear_norm: bool = False
    scale_by_dims_fn: str = "one"

    def __post_init__(self) -> None:
        if not isinstance(self.scale_by_nuclear_norm, bool):
            raise ValueError(f"SVD.scale_by_nuclear_norm must be True or False; got {self.scale_by_nuclear_norm!r}.")
        object.__setattr__(self, "scale_by_dims_fn", DIMS_SCALES.name_of("SVD.scale_by_dims_fn", self.scale_by_dims_fn))


Orthogonalization = Union[NewtonSchulz, SVD]


@preconditioner_config
@dataclass(frozen=True)
class SpectralDescent:
    """Spectral descent (Muon): ``P = orth(M_hat) * scale_by_dims_fn(d_in, d_out)`` per 2-D block.

    ``orthogonalization``: ``NewtonSchulz()`` (default, the reference's) or ``SVD()``. ``factor_dtype``:
    the math dtype of the blocks (gathered gradient, filtered gradient, the orthogonalisation's input and
    output), fp32 or fp64. No state, no refresh: ``betas[1]``, ``epsilon`` and ``precondition_frequency``
    have no effect, and ``start_preconditioning_step=None`` means step 1. Blocks must be 2-D (see the module
    doc of ``compute/kinds/spectral.py``).
    """

    orthogonalization: Orthogonalization = field(default_factory=NewtonSchulz)
    factor_dtype: torch.dtype = torch.float32

    #: The block order this kind needs: the blocking merges toward it and rejects other orders.
    block_order: ClassVar[int] = 2
    #: No amortized refresh: preconditioning starts at step 1 unless ``start_preconditioning_step`` says otherwise.
    refreshes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.orthogonalization, (NewtonSchulz, SVD)):
            raise ValueError("SpectralDescent.orthogonalization must be NewtonSchulz(...) or SVD(...); got "
                             f"{self.orthogonalization!r}.")
        check_math_dtype("SpectralDescent", self.factor_dtype)

    def inverse_exponent(self, order: int, dim: int) -> float:
        """1/4 on both dims of a 2-D block: ``orth(G) = (G G^T)^(-1/4) G (G^T G)^(-1/4)`` for a full-rank
        ``G``, Shampoo's direction with the instantaneous factors. A marker of the dims the kind acts on;
        no factor is stored."""
        return 0.25 if order == 2 else 0.0


class SpectralDescentKind(PreconditionerKind):
    """Orthogonalises each 2-D block of a bucket (no state fields, no refresh)."""

    config_type = SpectralDescent
    linear = False

    def __init__(self, config: Any, shape: tuple[int, ...], exponents: tuple[float, ...]) -> None:
        super().__init__(config, shape, exponents)
        self.scale: Optional[float] = None
        if self.preconditions:
            rows, cols = self.shape
            self.scale = dims_scale(config.orthogonalization.scale_by_dims_fn, cols, rows,
                                    type(config.orthogonalization).__name__)

    @property
    def preconditions(self) -> bool:
        return len(self.shape) == 2 and any(e != 0 for e in self.exponents)

    @property
    def failure_limit(self) -> Optional[int]:
        return None

    # ------------------------------------------------------------------ costs

    def step_flops(self, model: "CostModel") -> float:
        """Newton-Schulz ``iterations (4 L s^2 + 2 s^3)``; SVD ``6 L s^2 + 20 s^3 + 2 m n s``."""
        if not self.preconditions:
            return 0.0
        m, n = self.shape
        orth = self.config.orthogonalization
        if isinstance(orth, NewtonSchulz):
            return newton_schulz_flops(m, n, orth.num_iterations)
        return svd_polar_flops(m, n, model.svd_flops_per_ls2, model.svd_flops_per_s3)

    def elementwise_flops(self, model: "CostModel") -> float:
        return model.orthogonalize_elementwise_flops if self.preconditions else 0.0

    def workspace_bytes(self) -> int:
        """Per block: Newton-Schulz ``(2 m n + 2 s^2)`` in the GEMM dtype (iterate, next iterate, Gram
        matrix, its polynomial); SVD ``(m s + s n + s + m n + s^2) S`` (U, V^T, S, U scaled, LAPACK's work
        arrays counted as one more ``m n`` and ``s^2``)."""
        if not self.preconditions:
            return 0
        m, n = self.shape
        s = min(m, n)
        orth = self.config.orthogonalization
        if isinstance(orth, NewtonSchulz):
            return (2 * m * n + 2 * s * s) * torch.empty((), dtype=orth.matmul_dtype).element_size()
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        return (m * s + s * n + s + m * n + s * s) * itemsize

    # ------------------------------------------------------------------ math

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        """``orth(M_hat) * scale`` per block, a chunk of blocks at a time (at most ``CHUNK_BYTES`` of scratch)."""
        orth = self.config.orthogonalization
        for rows in chunk_slices(M.shape[0], self.workspace_bytes()):
            if isinstance(orth, NewtonSchulz):
                newton_schulz_(M[rows], out[rows], orth.schedule(), orth.matmul_dtype, ctx.workspace)
            else:
                svd_polar_(M[rows], out[rows], orth.scale_by_nuclear_norm)
        if self.scale is not None and self.scale != 1.0:
            out.mul_(self.scale)
        return out


__all__ = ["NewtonSchulz", "Orthogonalization", "SVD", "SpectralDescent", "SpectralDescentKind"]
