"""Preconditioner kinds: the registry from config class to :class:`~.protocol.PreconditionerKind`.

Adding a kind (see docs/design.md, "How to add a preconditioner kind"): write its module here (a
:class:`~.protocol.PreconditionerKind` subclass with ``config_type`` set to its config class), and
add the class to :data:`KINDS` below. The runtime buckets, the planner, ``state_dict`` and the
checkpoint loader find it through :func:`make_kind`.
"""

from __future__ import annotations

from typing import Any

from .eigendecomposed import EigendecomposedKind
from .eigendecomposed_kl import EigendecomposedKLKind
from .eigenvalue_corrected import EigenvalueCorrectedKind
from .kl_shampoo import KLShampooKind
from .protocol import PreconditionerKind
from .root_inverse import RootInverseKind
from .sign import SignDescentKind
from .spectral import SpectralDescentKind

#: Every kind, one per config class.
KINDS: tuple[type[PreconditionerKind], ...] = (RootInverseKind, EigenvalueCorrectedKind, KLShampooKind,
                                               EigendecomposedKind, EigendecomposedKLKind, SpectralDescentKind,
                                               SignDescentKind)

_BY_CONFIG = {k.config_type: k for k in KINDS}


def kind_class(config: Any) -> type[PreconditionerKind]:
    """The kind implementing ``config`` (ValueError naming the known ones otherwise)."""
    cls = _BY_CONFIG.get(type(config))
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in _BY_CONFIG))
        raise ValueError(f"no preconditioner kind is registered for {type(config).__name__}; known: {known}.")
    return cls


def make_kind(config: Any, shape: tuple[int, ...], exponents: tuple[float, ...]) -> PreconditionerKind:
    """The kind of ``config`` for one block geometry (cheap: no tensors are made)."""
    return kind_class(config)(config, tuple(shape), tuple(exponents))


__all__ = ["KINDS", "kind_class", "make_kind"]
