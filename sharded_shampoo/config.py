"""Small frozen configuration objects, validated at construction.

Every config is a frozen dataclass so it can be hashed, compared, stored in a param group
and written into a checkpoint (``to_dict``/``config_from_dict``) without pickling code.
Each ``__post_init__`` raises a ValueError that names the field, the valid range and the
value it got, so a bad setting fails at ``ShardedShampoo(...)`` and never mid-training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

import torch

from .averaging_config import (ITERATE_AVERAGING_TYPES, PRIMAL_AVERAGING_TYPES, ClassicMomentum,  # noqa: F401
                               GeneralizedPrimalAveraging, IterateAveragingConfig, ScheduleFree, WeightDecayType)
from .checks import check_int, check_range
from .shampoo_options import (STORAGE_DTYPES, ExponentOverride, PseudoInverse, check_rank_handling,  # noqa: F401
                              config_key, override_exponent, validate_shampoo_fields)

#: Field metadata of config fields added after checkpoints were first written: ``config_to_dict``
#: leaves such a field out while it has its default value, so the dicts (and the checkpoint
#: fingerprints built from them) of configs that do not use it stay what they were.
ADDED_LATER = {"omit_if_default": True}


# ----------------------------------------------------------------------------- preconditioner registry

#: Every preconditioner config class (filled by :func:`preconditioner_config`).
_PRECONDITIONER_CLASSES: list[type] = []
#: Config classes ``config_from_dict`` can restore, by name (preconditioner classes register themselves).
_CONFIG_CLASSES: dict[str, type] = {}


def preconditioner_config(cls: type) -> type:
    """Class decorator: make ``cls`` a preconditioner config (accepted as ``preconditioner=`` by the
    optimizer, the planner and the dry-run; restored by :func:`config_from_dict`).

    The class is a frozen dataclass with a ``factor_dtype`` (the math dtype of its blocks) and an
    ``inverse_exponent(order, dim)`` method (0: that block dim has no Kronecker factor); its kind, the
    math, is registered in ``sharded_shampoo/compute/kinds`` (see docs/design.md).
    """
    missing = [a for a in ("factor_dtype", "inverse_exponent") if not hasattr(cls, a)
               and a not in getattr(cls, "__dataclass_fields__", {})]
    if missing:
        raise TypeError(f"preconditioner config {cls.__name__} lacks {missing}.")
    _PRECONDITIONER_CLASSES.append(cls)
    _CONFIG_CLASSES[cls.__name__] = cls
    return cls


def config_class(cls: type) -> type:
    """Class decorator: let :func:`config_from_dict` restore ``cls`` by name (for config classes nested in a
    preconditioner config that live outside this module, e.g. ``NewtonSchulz`` in ``compute/kinds``)."""
    _CONFIG_CLASSES[cls.__name__] = cls
    return cls


def is_preconditioner_config(value: Any) -> bool:
    return isinstance(value, tuple(_PRECONDITIONER_CLASSES))


def preconditioner_config_names() -> str:
    """``"RootInverseShampoo(), EigenvalueCorrectedShampoo(), ..."`` for error messages."""
    return ", ".join(f"{c.__name__}()" for c in _PRECONDITIONER_CLASSES)


# ----------------------------------------------------------------------------- grafting


@dataclass(frozen=True)
class SGDGrafting:
    """Graft the Shampoo direction onto the norm of the (filtered) gradient itself."""


@dataclass(frozen=True)
class AdaGradGrafting:
    """Graft onto AdaGrad: diagonal sum of squared gradients, direction M / (sqrt(S) + eps)."""

    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        check_range("AdaGradGrafting", "epsilon", self.epsilon, 0.0, math.inf, low_open=True)


@dataclass(frozen=True)
class RMSpropGrafting:
    """Graft onto RMSprop: EMA of squared gradients (no bias correction), M / (sqrt(V) + eps)."""

    beta2: float = 0.99
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        check_range("RMSpropGrafting", "beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_range("RMSpropGrafting", "epsilon", self.epsilon, 0.0, math.inf, low_open=True)


@dataclass(frozen=True)
class AdamGrafting:
    """Graft onto Adam: bias-corrected EMA of squared gradients, M_hat / (sqrt(V_hat) + eps)."""

    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        check_range("AdamGrafting", "beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_range("AdamGrafting", "epsilon", self.epsilon, 0.0, math.inf, low_open=True)


GraftingConfig = Union[SGDGrafting, AdaGradGrafting, RMSpropGrafting, AdamGrafting]
#: Every grafting config class, and those that keep a diagonal second-moment state per block.
GRAFTING_TYPES = (SGDGrafting, AdaGradGrafting, RMSpropGrafting, AdamGrafting)
STATEFUL_GRAFTING_TYPES = (AdaGradGrafting, RMSpropGrafting, AdamGrafting)


# ----------------------------------------------------------------------------- preconditioners

@dataclass(frozen=True)
class EighRootConfig:
    """Inverse roots by symmetric eigendecomposition (fp32, retried in fp64 on failure).

    ``make_positive_semidefinite`` shifts the spectrum by ``-min(lambda_min, 0)`` before adding
    epsilon, which removes the tiny negative eigenvalues round-off leaves in a PSD factor.
    ``rank_handling``: None (that epsilon perturbation) or ``PseudoInverse(rank_atol, rank_rtol)``
    (eigenvalues at or below the cutoff get a zero root; the group's epsilon must be 0; the
    ``make_positive_semidefinite`` shift does not apply). Root-inverse and eigendecomposed Shampoo.
    """

    make_positive_semidefinite: bool = True
    retry_in_float64: bool = True
    rank_handling: Optional[PseudoInverse] = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        check_rank_handling("EighRootConfig", self.rank_handling)


@dataclass(frozen=True)
class CoupledNewtonConfig:
    """Inverse roots by the coupled Newton iteration (matmuls only; needs 1/exponent integral)."""

    max_iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        check_int("CoupledNewtonConfig", "max_iterations", self.max_iterations)
        check_range("CoupledNewtonConfig", "tolerance", self.tolerance, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class WarmStartRootConfig:
    """Inverse roots refreshed from the previous root with GEMMs only, checked, eigh where the check fails.

    With the previous root ``R`` of exponent ``e`` (``q = 1 / (2 e)`` must be an integer) the new
    factor ``A`` is brought into the frame of ``R``: ``M = R^q A R^q / c`` with the scalar
    ``c = tr(R^q A R^q) / d``, which is close to ``I`` when ``A`` changed little since the last
    refresh. A screen estimates ``||M - I||_F / sqrt(d)`` with ``probes`` fixed random vectors
    (matrix-vector work only, fp64); where it is below 0.5, ``M^(-e)`` is the binomial series in
    ``E = M - I`` (Horner, ``order - 1`` GEMMs, the order picked from the size of ``E`` and capped at
    ``max_order``) and the root is ``X = c^(-e) sym(R M^(-e))``. Its residual
    ``||X^q A X^q - I||_F / sqrt(d)`` is estimated the same way; a matrix that fails the screen,
    whose residual exceeds ``tolerance`` or is not finite gets the eigendecomposition root
    (``fallback``) instead. The first refresh of a block (root still the identity) always uses eigh.
    """

    max_order: int = 6
    tolerance: float = 1e-3
    probes: int = 8
    fallback: EighRootConfig = field(default_factory=EighRootConfig)

    def __post_init__(self) -> None:
        for name in ("max_order", "probes"):
            check_int("WarmStartRootConfig", name, getattr(self, name))
        check_range("WarmStartRootConfig", "tolerance", self.tolerance, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.fallback, EighRootConfig):
            raise ValueError(f"WarmStartRootConfig.fallback must be an EighRootConfig(); got {self.fallback!r}.")
        if self.fallback.rank_handling is not None:
            raise ValueError("WarmStartRootConfig.fallback.rank_handling must be None: warm-started roots perturb by "
                             "epsilon; use root=EighRootConfig(rank_handling=PseudoInverse(...)) for pseudo-inverses.")


RootConfig = Union[EighRootConfig, CoupledNewtonConfig, WarmStartRootConfig]
ROOT_TYPES = (EighRootConfig, CoupledNewtonConfig, WarmStartRootConfig)


@dataclass(frozen=True)
class QREigenbasisConfig:
    """Eigenbases refreshed by warm-started subspace (power + QR) iterations from the previous basis.

    Each of ``iterations`` rounds: order the columns of the previous basis ``Q`` by the estimated
    eigenvalues ``diag(Q^T A Q)`` (descending; the corrected eigenvalues are permuted alike), then
    ``Q <- qr(A Q).Q``: one GEMM and one QR per round instead of a full ``eigh``. A block whose basis
    is still the identity (never refreshed) gets a full ``eigh`` (with ``fallback``'s settings).
    """

    iterations: int = 1
    fallback: EighRootConfig = field(default_factory=EighRootConfig)

    def __post_init__(self) -> None:
        check_int("QREigenbasisConfig", "iterations", self.iterations)
        if not isinstance(self.fallback, EighRootConfig):
            raise ValueError(f"QREigenbasisConfig.fallback must be an EighRootConfig(); got {self.fallback!r}.")


EigenbasisConfig = Union[EighRootConfig, QREigenbasisConfig]


@preconditioner_config
@dataclass(frozen=True)
class RootInverseShampoo:
    """Classic Shampoo: direction = M x_1 R_1 ... x_k R_k with R_i = (F_i_hat + eps I)^(-e_i).

    ``e_i`` defaults to ``1 / (2 k)`` for an order-``k`` block; ``inverse_exponent_override``
    maps an order to one exponent for all its dims or to ``{dim: exponent}``; an exponent of 0
    leaves that dim unpreconditioned (no factor is stored for it).

    ``symmetric_packing`` (default True): store every factor and inverse root as its upper triangle
    (``d (d + 1) / 2`` numbers, the reference implementation's layout), lossless; False stores full
    ``d x d`` matrices (the layout before packing; a step then unpacks nothing). A storage choice,
    not math: checkpoints load across it. ``moment_storage_dtype`` (None = ``factor_dtype``): storage of
    the filtered gradient and the grafting state; ``torch.bfloat16`` halves them, rounded stochastically
    (unbiased) after each step's fp32 math (docs/user_guide.md, "Low-precision state").

    ``trace_scaling_exponent`` (None: off; in (0, 1]) and ``drop_weighting_factor_on_gsquare``: see
    :mod:`sharded_shampoo.shampoo_options`; pseudo-inverse roots: ``root=EighRootConfig(rank_handling=
    PseudoInverse(...))`` with ``epsilon=0``.
    """

    root: RootConfig = field(default_factory=EighRootConfig)
    inverse_exponent_override: ExponentOverride = field(default_factory=dict)
    factor_dtype: torch.dtype = torch.float32
    max_consecutive_root_failures: int = 10
    factor_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)
    root_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)
    symmetric_packing: bool = field(default=True, metadata=ADDED_LATER)
    trace_scaling_exponent: Optional[float] = field(default=None, metadata=ADDED_LATER)
    drop_weighting_factor_on_gsquare: bool = field(default=False, metadata=ADDED_LATER)
    moment_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        validate_shampoo_fields("RootInverseShampoo", self)
        if not isinstance(self.root, ROOT_TYPES):
            raise ValueError("RootInverseShampoo.root must be EighRootConfig(), CoupledNewtonConfig() or "
                             f"WarmStartRootConfig(); got {self.root!r}.")
        if isinstance(self.root, (CoupledNewtonConfig, WarmStartRootConfig)):
            # coupled Newton needs an integer p = 1/e; the warm start needs an integer q = 1/(2e)
            scale = 1.0 if isinstance(self.root, CoupledNewtonConfig) else 0.5
            what = "1/{e}" if scale == 1.0 else "1/(2*{e})"
            for order, value in self.inverse_exponent_override.items():
                exps = value.values() if isinstance(value, Mapping) else [value]
                for e in exps:
                    if e != 0 and abs(scale / e - round(scale / e)) > 1e-9:
                        raise ValueError(
                            f"RootInverseShampoo.inverse_exponent_override[{order}] = {e} needs "
                            f"{what.format(e=e)} to be an integer for {type(self.root).__name__}; use "
                            "root=EighRootConfig() or an exponent such as 1/2, 1/4, 1/6.")

    def storage_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """Storage dtypes of the (factors, roots) stacks (``factor_dtype`` where not set)."""
        return (self.factor_storage_dtype or self.factor_dtype, self.root_storage_dtype or self.factor_dtype)

    def inverse_exponent(self, order: int, dim: int) -> float:
        """``e`` of ``R = (F + eps I)^(-e)`` for ``dim`` of an order-``order`` block: ``1 / (2 order)``
        unless overridden."""
        return override_exponent(self.inverse_exponent_override, order, dim, 1.0 / (2 * order))

    def __hash__(self) -> int:
        return hash(config_key(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RootInverseShampoo) and config_key(self) == config_key(other)


@preconditioner_config
@dataclass(frozen=True)
class EigenvalueCorrectedShampoo:
    """SOAP-like: Adam in the eigenbasis of the Kronecker factors.

    The eigenbasis Q_i of each factor is refreshed every ``precondition_frequency`` steps; the
    corrected eigenvalues D (EMA of the squared rotated gradient with ``betas[1]``) are updated
    every step; direction = Q ( (Q^T M Q) / (D_hat^e + eps) ) with e = 1/2 by default
    (``inverse_exponent_override`` may change it per order; 0 on a dim skips its rotation).
    ``symmetric_packing`` (default True): factors stored as their upper triangle; eigenbases are not
    symmetric and always stored full. ``tolerance`` (in [0, 1]; 0: always refresh) keeps a factor's
    eigenbasis where it still diagonalises the factor that well; ``trace_scaling_exponent`` and
    ``drop_weighting_factor_on_gsquare`` as for root-inverse Shampoo (:mod:`sharded_shampoo.shampoo_options`).
    """

    inverse_exponent_override: ExponentOverride = field(default_factory=dict)
    factor_dtype: torch.dtype = torch.float32
    max_consecutive_root_failures: int = 10
    eigenbasis: EigenbasisConfig = field(default_factory=EighRootConfig, metadata=ADDED_LATER)
    factor_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)
    root_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)
    symmetric_packing: bool = field(default=True, metadata=ADDED_LATER)
    trace_scaling_exponent: Optional[float] = field(default=None, metadata=ADDED_LATER)
    drop_weighting_factor_on_gsquare: bool = field(default=False, metadata=ADDED_LATER)
    tolerance: float = field(default=0.0, metadata=ADDED_LATER)
    moment_storage_dtype: Optional[torch.dtype] = field(default=None, metadata=ADDED_LATER)   # as RootInverseShampoo's

    def __post_init__(self) -> None:
        validate_shampoo_fields("EigenvalueCorrectedShampoo", self)
        check_eigenbasis("EigenvalueCorrectedShampoo", self.eigenbasis)
        if rank_handling_of(self) is not None:
            raise ValueError("EigenvalueCorrectedShampoo does not take PseudoInverse rank handling (its eigenbasis "
                             "needs no root; epsilon is added after the root of the corrected eigenvalues): set the "
                             "eigenbasis's rank_handling=None.")
        for order, value in self.inverse_exponent_override.items():
            if isinstance(value, Mapping):
                bad = {e for e in value.values() if e not in (0, 0.0)}
                if len(bad) > 1 or (bad and len(value) != order):
                    raise ValueError(
                        f"EigenvalueCorrectedShampoo.inverse_exponent_override[{order}] per-dim values may only "
                        "be 0 (skip the rotation of that dim) or one shared exponent for every dim; got "
                        f"{dict(value)!r}.")

    def storage_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """Storage dtypes of the (factors, eigenbases) stacks (``factor_dtype`` where not set)."""
        return (self.factor_storage_dtype or self.factor_dtype, self.root_storage_dtype or self.factor_dtype)

    def inverse_exponent(self, order: int, dim: int) -> float:
        """The root of the corrected eigenvalues, ``(D^e + eps)``: 1/2 unless overridden (0: no rotation of ``dim``)."""
        return override_exponent(self.inverse_exponent_override, order, dim, 0.5)

    def __hash__(self) -> int:
        return hash(config_key(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EigenvalueCorrectedShampoo) and config_key(self) == config_key(other)


#: For type hints; any class registered with :func:`preconditioner_config` is accepted.
PreconditionerConfig = Union[RootInverseShampoo, EigenvalueCorrectedShampoo]


def check_eigenbasis(owner: str, eigenbasis: Any) -> None:
    if not isinstance(eigenbasis, (EighRootConfig, QREigenbasisConfig)):
        raise ValueError(f"{owner}.eigenbasis must be EighRootConfig() or QREigenbasisConfig(); got {eigenbasis!r}.")


def rank_handling_of(config: Any) -> Optional[PseudoInverse]:
    """The ``PseudoInverse`` an eigh-based root or eigendecomposition of ``config`` uses (None: epsilon)."""
    method = getattr(config, "root", None) or getattr(config, "eigenbasis", None)
    if isinstance(method, QREigenbasisConfig):
        method = method.fallback
    return method.rank_handling if isinstance(method, EighRootConfig) else None


def default_exponent(config: PreconditionerConfig, order: int, dim: int) -> float:
    """The inverse exponent of ``dim`` in an order-``order`` block (0 means: not preconditioned)."""
    return config.inverse_exponent(order, dim)


# ----------------------------------------------------------------------------- blocking & robustness


@dataclass(frozen=True)
class BlockingConfig:
    """How parameters are cut into preconditioner blocks.

    ``precondition_1d``: 1-d parameters (biases, norms) get one ``d x d`` factor when True (as
    in the reference implementation); when False they use only the diagonal grafting method.
    0-d parameters behave like 1-d ones of length 1.
    ``merge_dims``: merge consecutive small dims while their product stays within
    ``max_preconditioner_dim``.
    ``batch_dims``: the first ``batch_dims`` dims of every parameter of the group index
    independent matrices, each preconditioned on its own: 1 for MoE expert weights
    ``[num_experts, d_in, d_out]`` (factors of ``d_in`` and ``d_out`` per expert, never of the
    flattened tensor). Put such parameters in their own param group.
    """

    precondition_1d: bool = True
    merge_dims: bool = True
    batch_dims: int = 0

    def __post_init__(self) -> None:
        for name in ("precondition_1d", "merge_dims"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BlockingConfig.{name} must be True or False; got {getattr(self, name)!r}.")
        check_int("BlockingConfig", "batch_dims", self.batch_dims, low=0)


class NonFinitePolicy(str, Enum):
    """What a step does with a NaN/Inf (or overflowing) gradient on any rank."""

    RAISE = "raise"    # raise NonFiniteGradientError on every rank; nothing is updated
    SKIP = "skip"      # skip the step on every rank (state, parameters and step counters untouched)
    IGNORE = "ignore"  # no check (fastest; a bad gradient then corrupts the state)

    @classmethod
    def parse(cls, value: Any) -> "NonFinitePolicy":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"ShardedShampoo.nonfinite_grads must be one of {[p.value for p in cls]}; "
                             f"got {value!r}.") from None


class ElementwiseMode(str, Enum):
    """How the element-wise step math runs (moments, grafting state, norms; see compute/elementwise.py)."""

    EAGER = "eager"      # one torch op after another
    COMPILE = "compile"  # fused kernels via torch.compile, with an eager fallback where it cannot compile

    @classmethod
    def parse(cls, value: Any) -> "ElementwiseMode":
        """The mode for ``value`` (the enum or its string); the one check of ``elementwise=``."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"ShardedShampoo.elementwise must be one of {tuple(m.value for m in cls)} ('compile': "
                             f"fused element-wise kernels via torch.compile, with an eager fallback); "
                             f"got {value!r}.") from None


#: Group settings that decide the block plan and the state layout: fixed after construction and
#: required to match when state is loaded. ``has_beta1`` / ``has_momentum`` (whether the
#: filtered-gradient / momentum state exists) complete them: see :func:`structural_signature`.
STRUCTURAL_SETTINGS = ("max_preconditioner_dim", "grafting", "preconditioner", "blocking")
#: ``iterate_averaging`` (GPA / Schedule-Free: the ``z`` state exists, and the parameters hold ``y``)
#: is structural too; it was added later, so a group without it reads as None and a checkpoint
#: description leaves it out while it is None (the fingerprints of earlier checkpoints stay valid).
ADDED_LATER_STRUCTURAL_KEYS = ("iterate_averaging",)
STRUCTURAL_KEYS = STRUCTURAL_SETTINGS + ("has_beta1", "has_momentum") + ADDED_LATER_STRUCTURAL_KEYS
#: Fields of preconditioner configs that choose how state is *stored*, not what it holds: state loads
#: across them (``symmetric_packing``: packed and full matrices are converted by shape), so the checks
#: that a checkpoint fits an optimizer compare configs with these fields at their defaults.
STORAGE_ONLY_FIELDS = ("symmetric_packing",)
#: Fields that only decide *when* a refresh decomposes (the adaptive refresh ``tolerance``): the state means
#: the same under any value, so a run may resume with another one.
REFRESH_POLICY_FIELDS = ("tolerance",)


def storage_neutral(config: Any) -> Any:
    """``config`` with its :data:`STORAGE_ONLY_FIELDS` and :data:`REFRESH_POLICY_FIELDS` at their defaults (what a
    checkpoint must agree on)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    neutral = STORAGE_ONLY_FIELDS + REFRESH_POLICY_FIELDS
    changes = {f.name: _default_of(f) for f in dataclasses.fields(config) if f.name in neutral}
    return dataclasses.replace(config, **changes) if changes else config


#: Group settings holding config objects or enums (stored with :func:`config_to_dict`).
CONFIG_OBJECT_SETTINGS = ("grafting", "preconditioner", "blocking", "iterate_averaging", "weight_decay_type")


def structural_signature(group: Mapping[str, Any]) -> dict[str, Any]:
    """What of a param group decides the plan and the state layout (the one home of this rule)."""
    out = {k: group[k] for k in STRUCTURAL_SETTINGS}
    out["has_beta1"] = group["betas"][0] > 0
    out["has_momentum"] = group["momentum"] > 0
    out["iterate_averaging"] = group.get("iterate_averaging")
    return out


#: Floating dtypes the gradient/update exchange may use.
COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class PlanSettings:
    """The subset of optimizer settings that decides blocks, state and cost (one per param group)."""

    max_preconditioner_dim: int = 1024
    preconditioner: PreconditionerConfig = RootInverseShampoo()
    blocking: BlockingConfig = BlockingConfig()
    grafting: GraftingConfig | None = AdaGradGrafting()
    beta1: float = 0.9            # filtered-gradient state exists iff beta1 > 0
    momentum: float = 0.0         # momentum state exists iff momentum > 0 (local shard, param dtype)
    primal_averaging: bool = False    # a z buffer per local shard (GPA / Schedule-Free; param dtype)
    precondition_frequency: int = 100
    comm_dtype: torch.dtype = torch.float32
    release_buffers_between_steps: bool = False   # the optimizer's option: no resident buffers between steps

    def __post_init__(self) -> None:
        for name in ("max_preconditioner_dim", "precondition_frequency"):
            check_int("PlanSettings", name, getattr(self, name))
        if not is_preconditioner_config(self.preconditioner):
            raise ValueError(f"PlanSettings.preconditioner must be one of {preconditioner_config_names()}; "
                             f"got {self.preconditioner!r}.")
        if not isinstance(self.blocking, BlockingConfig):
            raise ValueError(f"PlanSettings.blocking must be a BlockingConfig; got {self.blocking!r}.")
        if self.grafting is not None and not isinstance(self.grafting, GRAFTING_TYPES):
            raise ValueError("PlanSettings.grafting must be SGDGrafting(), AdaGradGrafting(), RMSpropGrafting(), "
                             f"AdamGrafting() or None; got {self.grafting!r}.")
        if not (isinstance(self.beta1, (int, float)) and 0 <= self.beta1 < 1):
            raise ValueError(f"PlanSettings.beta1 must be a number in [0, 1); got {self.beta1!r}.")
        if not (isinstance(self.momentum, (int, float)) and math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"PlanSettings.momentum must be a finite number >= 0; got {self.momentum!r}.")
        for flag in ("primal_averaging", "release_buffers_between_steps"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"PlanSettings.{flag} must be True or False; got {getattr(self, flag)!r}.")
        if self.primal_averaging and self.momentum > 0:
            raise ValueError(f"PlanSettings.momentum={self.momentum} and PlanSettings.primal_averaging=True exclude "
                             "each other (a group has classic momentum or GPA / Schedule-Free, not both); set one.")
        if not isinstance(self.comm_dtype, torch.dtype) or not self.comm_dtype.is_floating_point:
            raise ValueError("PlanSettings.comm_dtype must be a floating torch.dtype (e.g. torch.float32 or "
                             f"torch.bfloat16); got {self.comm_dtype!r}.")

    @classmethod
    def from_group(cls, group: Mapping[str, Any], comm_dtype: torch.dtype,
                   release_buffers_between_steps: bool = False) -> "PlanSettings":
        """The plan settings of an optimizer param group (``comm_dtype`` and ``release_buffers_between_steps``
        are the optimizer's options)."""
        return cls(max_preconditioner_dim=group["max_preconditioner_dim"], preconditioner=group["preconditioner"],
                   blocking=group["blocking"], grafting=group["grafting"], beta1=group["betas"][0],
                   momentum=group["momentum"], precondition_frequency=group["precondition_frequency"],
                   primal_averaging=isinstance(group.get("iterate_averaging"), PRIMAL_AVERAGING_TYPES),
                   comm_dtype=comm_dtype, release_buffers_between_steps=release_buffers_between_steps)


def config_to_dict(config: Any) -> Any:
    """A JSON/pickle-safe description of a config object (class name + fields)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        out: dict[str, Any] = {"__config__": type(config).__name__}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("omit_if_default") and value == _default_of(f):
                continue
            out[f.name] = config_to_dict(value)
        return out
    if isinstance(config, torch.dtype):
        return {"__dtype__": str(config).removeprefix("torch.")}
    if isinstance(config, Enum):
        return config.value      # a plain string: loads with torch.load(weights_only=True)
    if isinstance(config, Mapping):
        return {"__mapping__": [[config_to_dict(k), config_to_dict(v)] for k, v in config.items()]}
    return config


def _default_of(f: "dataclasses.Field[Any]") -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


_CONFIG_CLASSES.update({cls.__name__: cls for cls in (
    SGDGrafting, AdaGradGrafting, RMSpropGrafting, AdamGrafting, EighRootConfig, CoupledNewtonConfig,
    WarmStartRootConfig, QREigenbasisConfig, PseudoInverse, BlockingConfig, ClassicMomentum, GeneralizedPrimalAveraging,
    ScheduleFree)})


def config_from_dict(data: Any) -> Any:
    """Inverse of :func:`config_to_dict`."""
    if isinstance(data, dict):
        if "__config__" in data:
            name = data["__config__"]
            if name not in _CONFIG_CLASSES:
                raise ValueError(f"unknown config class {name!r} in state dict; known: {sorted(_CONFIG_CLASSES)}.")
            kwargs = {k: config_from_dict(v) for k, v in data.items() if k != "__config__"}
            return _CONFIG_CLASSES[name](**kwargs)
        if "__dtype__" in data:
            return getattr(torch, data["__dtype__"])
        if "__mapping__" in data:
            return {config_from_dict(k): config_from_dict(v) for k, v in data["__mapping__"]}
    return data
