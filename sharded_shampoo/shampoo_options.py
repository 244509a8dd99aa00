"""Options every Shampoo-family config shares beyond its own fields: rank handling, trace scaling, the
weighting of the factor update and the adaptive refresh tolerance (docs/user_guide.md, "Shampoo options").

* :class:`PseudoInverse` -- the reference implementation's ``PseudoInverseConfig``: eigenvalues at or
  below ``max(rank_rtol * max(lambda, 0), rank_atol)`` are treated as zero (not inverted) instead of
  adding ``epsilon I`` to the factor; the group's ``epsilon`` must then be 0. Set on an eigh-based
  root or eigendecomposition (``EighRootConfig(rank_handling=PseudoInverse(...))``).
* ``trace_scaling_exponent`` (None: off) -- before a refresh the bias-corrected factor ``A`` is scaled
  to ``A * max(tr A, epsilon)^(-trace_scaling_exponent)`` (the reference's ``use_trace_scaling`` with
  its ``trace_scaling_exponent``, in ``(0, 1]``).
* ``drop_weighting_factor_on_gsquare`` -- factors accumulate ``beta2 F + G G^T`` (weight 1 instead
  of ``1 - beta2``) and are not bias-corrected.
* ``tolerance`` (eigendecomposition-based kinds) -- a scheduled refresh keeps the stored eigenvectors
  where ``||B - diag(B)||_F <= tolerance ||B||_F`` for ``B = Q^T A Q`` (0: always refresh).

A module of its own so ``config.py`` and the kinds' own config modules share the checks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .checks import check_int, check_range

ExponentOverride = Mapping[int, Union[float, Mapping[int, float]]]
#: Storage dtypes factors and roots may use besides ``factor_dtype`` (math stays in ``factor_dtype``).
STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@dataclass(frozen=True)
class PseudoInverse:
    """Rank handling by pseudo-inverse: eigenvalues ``<= max(rank_rtol * relu(lambda_max), rank_atol)``
    get a zero inverse root (their directions are left out) instead of the ``epsilon`` perturbation.

    ``rank_rtol=None`` uses ``d * finfo(dtype).eps`` (``torch.linalg.matrix_rank``'s default). The
    defaults ``(0.0, 0.0)`` drop only eigenvalues ``<= 0``. Requires the group's ``epsilon == 0``.
    """

    rank_atol: float = 0.0
    rank_rtol: Optional[float] = 0.0

    def __post_init__(self) -> None:
        check_range("PseudoInverse", "rank_atol", self.rank_atol, 0.0, math.inf, high_open=True)
        if self.rank_rtol is not None:
            check_range("PseudoInverse", "rank_rtol (None: d * finfo(dtype).eps)", self.rank_rtol, 0.0, math.inf,
                        high_open=True)


def check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False; got {value!r}.")


def check_trace_scaling_exponent(owner: str, value: Any) -> None:
    """None (trace scaling off) or a number in (0, 1] (0.5: the factor divided by sqrt of its trace)."""
    if value is not None:
        check_range(owner, "trace_scaling_exponent (None: no trace scaling)", value, 0.0, 1.0, low_open=True)


def check_tolerance(owner: str, value: Any) -> None:
    """The adaptive refresh tolerance: 0 (refresh every time) up to 1."""
    check_range(owner, "tolerance", value, 0.0, 1.0)


def validate_family_options(owner: str, config: Any) -> None:
    """The options of this module a Shampoo-family ``config`` has (missing ones are skipped)."""
    check_trace_scaling_exponent(owner, getattr(config, "trace_scaling_exponent", None))
    check_flag(owner, "drop_weighting_factor_on_gsquare", getattr(config, "drop_weighting_factor_on_gsquare", False))
    if hasattr(config, "tolerance"):
        check_tolerance(owner, config.tolerance)


def _validate_exponent_override(owner: str, override: ExponentOverride) -> None:
    if not isinstance(override, Mapping):
        raise ValueError(f"{owner}.inverse_exponent_override must be a mapping "
                         f"{{order: exponent or {{dim: exponent}}}}; got {type(override).__name__}.")
    for order, value in override.items():
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ValueError(f"{owner}.inverse_exponent_override keys must be tensor orders >= 1; got {order!r}.")
        per_dim = value if isinstance(value, Mapping) else {d: value for d in range(order)}
        for dim, exponent in per_dim.items():
            if not isinstance(dim, int) or not 0 <= dim < order:
                raise ValueError(f"{owner}.inverse_exponent_override[{order}] has dim {dim!r}; "
                                 f"dims of an order-{order} block are 0..{order - 1}.")
            check_range(owner, f"inverse_exponent_override[{order}][{dim}]", exponent, 0.0, math.inf)


def _freeze_override(override: ExponentOverride) -> tuple:
    """A hashable, order-independent form of an exponent override (for equality and fingerprints)."""
    items: list[tuple[int, Any]] = []
    for order, value in sorted(override.items()):
        if isinstance(value, Mapping):
            items.append((order, tuple(sorted((int(d), float(e)) for d, e in value.items()))))
        else:
            items.append((order, float(value)))
    return tuple(items)


def validate_shampoo_fields(owner: str, config: Any) -> None:
    """The checks every Shampoo-family config shares (exponents, dtypes, failures, packing, storage and the
    options of this module); the config classes of every kind call it."""
    _validate_common(owner, config.inverse_exponent_override, config.factor_dtype,
                     config.max_consecutive_root_failures, config.symmetric_packing)
    _validate_storage(owner, config.factor_storage_dtype, config.root_storage_dtype,
                      getattr(config, "moment_storage_dtype", None))
    validate_family_options(owner, config)


def config_key(config: Any) -> tuple:
    """Every field of a preconditioner config in a hashable form (equality and hash)."""
    return tuple(_freeze_override(v) if f.name == "inverse_exponent_override" else v
                 for f in dataclasses.fields(config) for v in (getattr(config, f.name),))


def _validate_common(owner: str, override: ExponentOverride, factor_dtype: torch.dtype, max_failures: int,
                     symmetric_packing: Any) -> None:
    _validate_exponent_override(owner, override)
    if factor_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{owner}.factor_dtype must be torch.float32 or torch.float64; got {factor_dtype!r}.")
    check_int(owner, "max_consecutive_root_failures", max_failures)
    if not isinstance(symmetric_packing, bool):
        raise ValueError(f"{owner}.symmetric_packing must be True (store symmetric factors and roots as their "
                         f"upper triangle) or False (full matrices); got {symmetric_packing!r}.")


def _validate_storage(owner: str, factor_storage: Any, root_storage: Any, moment_storage: Any = None) -> None:
    for name, value in (("factor_storage_dtype", factor_storage), ("root_storage_dtype", root_storage),
                        ("moment_storage_dtype", moment_storage)):
        if value is not None and value not in STORAGE_DTYPES:
            raise ValueError(f"{owner}.{name} must be None (= factor_dtype), torch.float32, torch.float64 or "
                             f"torch.bfloat16; got {value!r}.")


def override_exponent(override: ExponentOverride, order: int, dim: int, default: float) -> float:
    """The exponent ``inverse_exponent_override`` gives ``dim`` of an order-``order`` block, else ``default``."""
    value = override.get(order)
    if isinstance(value, Mapping):
        if dim in value:
            return float(value[dim])
    elif value is not None:
        return float(value)
    return default


def check_rank_handling(owner: str, value: Any) -> None:
    if value is not None and not isinstance(value, PseudoInverse):
        raise ValueError(f"{owner}.rank_handling must be None (epsilon perturbation: eigh of A + epsilon I) or "
                         f"PseudoInverse(rank_atol, rank_rtol); got {value!r}.")


__all__ = ["ExponentOverride", "PseudoInverse", "STORAGE_DTYPES", "check_flag", "check_rank_handling", "check_tolerance",
           "check_trace_scaling_exponent", "config_key", "override_exponent", "validate_family_options",
           "validate_shampoo_fields"]
