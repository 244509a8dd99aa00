"""The preconditioner protocol: what a kind declares, and what one bucket step hands it.

A *kind* (root-inverse Shampoo, eigenvalue-corrected Shampoo, ...) is a :class:`PreconditionerKind`
subclass, instantiated for one block geometry (shape + exponents) and its config. It declares

* **state** -- :meth:`~PreconditionerKind.fields`: one :class:`StateField` per tensor a block needs
  (name, per-block shape, storage dtype, symmetric or not -- symmetric ``(d, d)`` fields are stored
  packed when the config says so -- initial value, planner byte category). The bucket allocates
  exactly these (stacked ``[B, ...]``), the planner counts exactly these bytes, ``optimizer.state``
  and ``state_dict()`` show exactly these keys, and loading converts packed <-> full by them;
* **work** -- :meth:`update` (every step: the statistics, e.g. factor EMAs), :meth:`refresh` (the
  amortized step: roots, eigenbases; may read the host), :meth:`after_refresh` (every step, after
  a refresh if any: statistics kept in the refreshed basis), :meth:`direction` (the block's search
  direction from the filtered gradient);
* **cost** -- :meth:`step_flops`, :meth:`elementwise_flops`, :meth:`refresh_flops`,
  :meth:`workspace_bytes` for the planner.

Everything around that -- the step counters, the filtered gradient, grafting, bias correction of
the first moment, the per-block activity mask, failure counting -- is the bucket's
(:mod:`..preconditioner`), the same for every kind.

**The activity mask.** ``ctx.active`` (bool ``[B]`` on the device, or None: every block) is never
read on the host outside :meth:`refresh`. The bucket has zeroed the gradient rows of inactive
blocks before :meth:`update`; a kind keeps an inactive block's state bit-identical by using
:meth:`StepContext.coefficients` for every EMA (``X <- b X + w Y`` with ``b = 1, w = 0`` where
inactive) and :meth:`StepContext.keep` for every refreshed result. Directions of inactive blocks
are zeroed by the bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Optional, overload

import torch

from ...config import ElementwiseMode
from ..elementwise import Coefficient
from ..packing import packed_numel
from ..refresh import RefreshCounts
from ..workspace import Workspace

if TYPE_CHECKING:
    from .cost_model import CostModel

class Init(str, Enum):
    """Initial value of a state field."""

    ZEROS = "zeros"
    IDENTITY = "identity"   # (d, d) fields only: the identity matrix (packed: ones at the diagonal offsets)
    ONES = "ones"


@dataclass(frozen=True)
class StateField:
    """One tensor every block of a bucket holds.

    ``shape``: the logical per-block shape (``(d, d)`` for a matrix); ``packed``: stored as the upper
    triangle, ``(d (d + 1) / 2,)`` (only for ``symmetric`` ``(d, d)`` fields); ``category``: the
    planner's byte category (``planning.costs.BLOCK_STATE_KINDS``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: Init
    category: str
    symmetric: bool = False
    packed: bool = False

    def __post_init__(self) -> None:
        square = len(self.shape) == 2 and self.shape[0] == self.shape[1]
        if self.packed and not (self.symmetric and square):
            raise ValueError(f"state field {self.name!r}: only symmetric (d, d) fields can be packed; "
                             f"shape {self.shape}.")
        if self.init == Init.IDENTITY and not square:
            raise ValueError(f"state field {self.name!r}: an identity initial value needs a (d, d) shape; "
                             f"got {self.shape}.")

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (packed_numel(self.shape[0]),) if self.packed else self.shape

    @property
    def nbytes(self) -> int:
        """Bytes per block (what the planner counts and the bucket allocates)."""
        return math.prod(self.stored_shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class BucketHyperparams:
    """The numbers of a group a bucket step reads; they may change between steps (configs may not)."""

    beta1: float
    beta2: float
    epsilon: float
    use_bias_correction: bool
    elementwise: ElementwiseMode = ElementwiseMode.EAGER   # COMPILE: fused element-wise kernels (eager fallback)
    beta3: Optional[float] = None     # the direction's filtered-gradient coefficient (None: beta1)


@dataclass(frozen=True)
class BucketStep:
    """Everything one bucket step takes besides the gradients: the executor builds one per bucket and step."""

    hyperparams: BucketHyperparams
    refresh_roots: bool               # refresh roots / eigenbases this step
    precondition: bool                # use the kind's direction (else the grafting direction)
    active: Optional[torch.Tensor] = None   # bool [B] on the bucket's device; None: every block


@dataclass
class StepContext:
    """What a kind's step methods read besides the state: built by the bucket for one step."""

    hp: BucketHyperparams
    refresh_roots: bool
    active: Optional[torch.Tensor]    # bool [B] (device) or None
    step: torch.Tensor                # int64 [B]: each block's step count, this step included
    dtype: torch.dtype                # the bucket's math dtype
    workspace: Workspace
    counts: RefreshCounts             # telemetry of refreshes (Python ints)
    salts: Optional[torch.Tensor] = None   # int64 [B] per-block stable numbers (stochastic rounding)

    @property
    def num_blocks(self) -> int:
        return self.step.shape[0]

    def coefficients(self, beta: float, weight: float) -> tuple[Coefficient, Coefficient]:
        """``(b, w)`` of an EMA ``X <- b X + w Y``: the floats, or with a mask ``[B]`` tensors with
        ``(1, 0)`` for inactive blocks (so their ``X`` stays bit-identical)."""
        if self.active is None:
            return beta, weight
        one = torch.ones((), dtype=self.dtype, device=self.step.device)
        return (torch.where(self.active, one * beta, one), torch.where(self.active, one * weight, one * 0.0))

    def keep(self, ok: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``ok & active`` (for ``rows`` of the bucket): where a refreshed result may replace the stored one."""
        if self.active is None:
            return ok
        return ok & (self.active if rows is None else self.active[rows])

    def bias_correction(self, beta: float, always: bool = False) -> torch.Tensor:
        """``1 - beta^t`` per block ``[B]`` in the math dtype (ones without bias correction or for beta = 1).

        ``always``: ignore ``use_bias_correction`` (Adam grafting is always bias-corrected).
        """
        if not (self.hp.use_bias_correction or always) or beta >= 1.0:
            return torch.ones(self.step.shape, dtype=self.dtype, device=self.step.device)
        # a Python base: no host-to-device copy of beta (fp64 as before, so the values are the same)
        return (1.0 - torch.pow(beta, self.step.to(torch.float64))).to(self.dtype)


@overload
def per_block(t: torch.Tensor, ndim: int) -> torch.Tensor: ...
@overload
def per_block(t: float, ndim: int) -> float: ...
@overload
def per_block(t: Coefficient, ndim: int) -> Coefficient: ...
def per_block(t: Coefficient, ndim: int) -> Coefficient:
    """A ``[B]`` coefficient shaped to broadcast over ``[B, ...]`` stacks of ``ndim`` dims (floats as they are)."""
    return t.view((-1,) + (1,) * (ndim - 1)) if isinstance(t, torch.Tensor) else t


class PreconditionerKind:
    """One kind for one block geometry; see the module doc for the contract.

    Subclasses set ``config_type`` and override what they need; the defaults describe a kind
    without state and without a direction of its own.
    """

    config_type: ClassVar[type] = type(None)
    #: Whether :meth:`direction` is linear in ``M`` (per-block scalars factor out). The bucket then hands it
    #: the filtered gradient *before* bias correction and divides the direction by ``1 - beta1^t`` afterwards;
    #: a kind that is not (spectral and sign descent normalise their input) gets ``M_hat = M / (1 - beta1^t)``
    #: and its direction is used as it is.
    linear: ClassVar[bool] = True

    def __init__(self, config: Any, shape: tuple[int, ...], exponents: tuple[float, ...]) -> None:
        self.config = config
        self.shape = tuple(shape)
        self.exponents = tuple(exponents)

    # ------------------------------------------------------------------ description

    @property
    def compute_dtype(self) -> torch.dtype:
        """The math dtype of the bucket (gathered gradients, moments): the config's ``factor_dtype``."""
        return getattr(self.config, "factor_dtype", torch.float32)

    @property
    def moment_dtype(self) -> torch.dtype:
        """Storage dtype of the filtered gradient and the grafting state: the config's ``moment_storage_dtype``
        (the bucket runs their math in :attr:`compute_dtype` and rounds back stochastically), else the math dtype."""
        return getattr(self.config, "moment_storage_dtype", None) or self.compute_dtype

    @property
    def preconditions(self) -> bool:
        """Whether the block has a direction of its own (else it uses the grafting direction / ``M_hat``)."""
        return False

    @property
    def starts_as_identity(self) -> bool:
        """Whether the direction is ``M`` itself until the first refresh (initial roots are the identity), so a
        step before ``start_preconditioning_step`` without grafting need not compute it."""
        return False

    @property
    def failure_limit(self) -> Optional[int]:
        """Consecutive failed refreshes after which the optimizer raises (None: refreshes cannot fail)."""
        return getattr(self.config, "max_consecutive_root_failures", None)

    def fields(self) -> list[StateField]:
        return []

    # ------------------------------------------------------------------ costs (planner)

    def step_flops(self, model: "CostModel") -> float:
        """Matrix FLOPs of an ordinary step for one block (element-wise work: :meth:`elementwise_flops`)."""
        return 0.0

    def elementwise_flops(self, model: "CostModel") -> float:
        """Kind-specific element-wise FLOPs per block element per step."""
        return 0.0

    def refresh_flops(self, model: "CostModel") -> float:
        """FLOPs of one amortized refresh of one block."""
        return 0.0

    def workspace_bytes(self) -> int:
        """Largest transient memory of this block's math (the refresh's, usually), beyond its state."""
        return 0

    # ------------------------------------------------------------------ math

    def update(self, state: dict[str, torch.Tensor], G: torch.Tensor, ctx: StepContext) -> None:
        """Every step, before any refresh: fold the block gradients ``G: [B, *shape]`` into the statistics."""

    def refresh(self, state: dict[str, torch.Tensor], ctx: StepContext) -> Optional[torch.Tensor]:
        """The amortized step; returns bool ``[B]``: which blocks refreshed without failure (None: all)."""
        return None

    def after_refresh(self, state: dict[str, torch.Tensor], G: torch.Tensor, ctx: StepContext) -> None:
        """Every step, after this step's refresh (if any): statistics kept in the refreshed basis."""

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        """The direction for the filtered gradient ``M`` (not bias-corrected: the bucket divides by
        ``1 - beta1^t`` or rescales by grafting; bias-corrected for kinds that are not :attr:`linear`).
        May write into ``out`` (a dead gradient stack of
        ``M``'s shape and the math dtype, possibly ``M`` itself) and return it, or return a new
        tensor; never a state tensor."""
        raise NotImplementedError(f"{type(self).__name__} has no direction of its own (preconditions is False).")


__all__ = ["BucketHyperparams", "BucketStep", "Init", "PreconditionerKind", "StateField", "StepContext", "per_block"]
