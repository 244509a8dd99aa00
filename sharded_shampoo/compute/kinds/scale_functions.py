"""Named scale functions of spectral and sign descent: configs hold a *name*, never code.

The reference implementation takes callables (``scale_by_dims_fn``, ``scale_fn``) and pickles them
with the param groups. Here a config field holds the name of a function registered in this module,
so a config stays a small frozen, hashable value that :func:`~sharded_shampoo.config.config_to_dict`
writes into a checkpoint and its fingerprint as a string, and the restricted unpickling of
checkpoints never meets code. Passing a registered callable is accepted too: the config stores its
name. A function a user registers must be registered again, under the same name, in every process
that builds the optimizer or loads its checkpoint (``config_from_dict`` names the missing one).

Two registries, one per signature:

* :data:`DIMS_SCALES` -- ``fn(d_in, d_out) -> float`` for ``NewtonSchulz`` / ``SVD``
  (``scale_by_dims_fn``): the orthogonalised direction of an ``(d_out, d_in)`` block (rows, columns)
  is multiplied by it. Built in: ``"one"`` (1, the reference's default), ``"muon"``
  (``sqrt(max(1, d_out / d_in))``: Keller Jordan's Muon, ``torch.optim.Muon``'s default and the
  reference's Muon recipe), ``"spectral_norm"`` (``sqrt(d_out / d_in)``: Dion's and torchtitan's
  ``adjust_lr="spectral_norm"``), ``"match_rms_adamw"`` (``0.2 sqrt(max(d_in, d_out))``: Moonlight,
  ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``, Dion's ``adjust_lr="rms_norm"``).
* :data:`SIGN_SCALES` -- ``fn(G) -> Tensor | float`` for ``SignDescent.scale_fn``, *batched*: ``G``
  is a bucket's ``[B, *block_shape]`` stack and the result one number per block (``[B]``) or one
  float for all. Built in: ``"one"`` (1) and ``"l1_norm"`` (``sum |G|`` per block: steepest descent
  in the l-infinity norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

import torch

DimsScale = Callable[[int, int], float]
SignScale = Callable[[torch.Tensor], Union[torch.Tensor, float]]


class ScaleRegistry:
    """Functions of one signature by name; a name, once taken, keeps its function for the process."""

    def __init__(self, what: str, signature: str) -> None:
        self.what = what
        self.signature = signature
        self.functions: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` under ``name`` (registering the same function again is a no-op)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty string name; got {name!r}.")
        if not callable(fn):
            raise ValueError(f"{self.what} {name!r} must be a callable {self.signature}; got {fn!r}.")
        taken = self.functions.get(name)
        if taken is not None and taken is not fn:
            raise ValueError(f"{self.what} name {name!r} is already registered for {taken!r}; a checkpoint records "
                             "only the name, so one name must mean one function. Pick another name.")
        self.functions[name] = fn

    def name_of(self, field: str, value: Any) -> str:
        """The registered name of ``value`` (a name or a registered callable), else a ValueError naming ``field``."""
        if isinstance(value, str) and value in self.functions:
            return value
        if callable(value):
            for name, fn in self.functions.items():
                if fn is value:
                    return name
        known = ", ".join(repr(n) for n in self.functions)
        raise ValueError(
            f"{field} must name a registered {self.what} ({known}) or be a callable registered as one; got "
            f"{value!r}. Configs store the function's name, not its code (checkpoints never pickle code): register "
            f"it once in every process, before building the optimizer or loading a checkpoint, with "
            f"sharded_shampoo.{self.register_function_name}('my_name', fn) -- fn{self.signature} -- and pass "
            "'my_name'.")

    @property
    def register_function_name(self) -> str:
        return "register_scale_by_dims_fn" if self is DIMS_SCALES else "register_sign_scale_fn"

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.functions[name]


DIMS_SCALES = ScaleRegistry("scale-by-dims function", "(d_in: int, d_out: int) -> float")
SIGN_SCALES = ScaleRegistry("sign-descent scale function",
                            "(G: Tensor [B, *block_shape]) -> Tensor [B] or float")


def register_scale_by_dims_fn(name: str, fn: DimsScale) -> None:
    """Make ``fn(d_in, d_out) -> float`` usable as ``NewtonSchulz/SVD(scale_by_dims_fn=name)``."""
    DIMS_SCALES.register(name, fn)


def register_sign_scale_fn(name: str, fn: SignScale) -> None:
    """Make ``fn(G) -> Tensor [B] | float`` (``G``: a ``[B, *block_shape]`` stack) usable as
    ``SignDescent(scale_fn=name)``. ``fn`` is tried on a ``[2, 3, 4]`` stack first: it must return one
    number per block (or a float), so a wrong signature fails here, not in the middle of a step."""
    if callable(fn):
        probe = fn(torch.ones(2, 3, 4))
        if not (isinstance(probe, (int, float)) or (isinstance(probe, torch.Tensor) and probe.shape == (2,))):
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ValueError(f"sign-descent scale function {name!r} returned {shape} for a stack of 2 blocks of "
                             "shape (3, 4); it must return one number per block (a tensor of shape [B]) or a "
                             "float. Reduce over every dim but the first, e.g. G.abs().flatten(1).sum(1).")
    SIGN_SCALES.register(name, fn)


def dims_scale(name: str, d_in: int, d_out: int, owner: str) -> float:
    """The registered dims scale ``name`` of an ``(d_out, d_in)`` block, checked finite and > 0."""
    value = DIMS_SCALES[name](d_in, d_out)
    if isinstance(value, torch.Tensor):
        value = float(value)     # a host value: evaluated once per block geometry, at construction
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.scale_by_dims_fn {name!r} returned {value!r} for d_in={d_in}, d_out={d_out}; "
                         "it must return a finite number > 0.")
    return float(value)


def _one_dims(d_in: int, d_out: int) -> float:
    return 1.0


def _muon(d_in: int, d_out: int) -> float:
    return math.sqrt(max(1.0, d_out / d_in))


def _spectral_norm(d_in: int, d_out: int) -> float:
    return math.sqrt(d_out / d_in)


def _match_rms_adamw(d_in: int, d_out: int) -> float:
    return 0.2 * math.sqrt(max(d_in, d_out))


def _one_sign(G: torch.Tensor) -> float:
    return 1.0


def _l1_norm(G: torch.Tensor) -> torch.Tensor:
    return G.abs().flatten(1).sum(1)


for _name, _fn in (("one", _one_dims), ("muon", _muon), ("spectral_norm", _spectral_norm),
                   ("match_rms_adamw", _match_rms_adamw)):
    DIMS_SCALES.register(_name, _fn)
SIGN_SCALES.register("one", _one_sign)
SIGN_SCALES.register("l1_norm", _l1_norm)


__all__ = ["DIMS_SCALES", "SIGN_SCALES", "ScaleRegistry", "dims_scale", "register_scale_by_dims_fn",
           "register_sign_scale_fn"]
