"""Sign descent (:class:`SignDescent`): ``P = sign(M_hat) * scale_fn(M_hat)`` per block, any block order.

No state and no refresh; ``sign(0) = 0``. ``scale_fn`` names a registered batched function (see
:mod:`.scale_functions`): ``"one"`` (the reference's default) or ``"l1_norm"`` (``sum |M_hat|`` per
block, steepest descent in the l-infinity norm), or one a user registers. ``betas[1]``, ``epsilon``
and ``precondition_frequency`` have no effect; ``start_preconditioning_step=None`` means step 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from ...config import preconditioner_config
from .protocol import PreconditionerKind, StepContext, per_block
from .scale_functions import SIGN_SCALES
from .spectral import check_math_dtype

if TYPE_CHECKING:
    from .cost_model import CostModel


@preconditioner_config
@dataclass(frozen=True)
class SignDescent:
    """Sign descent: ``P = sign(M_hat) * scale_fn(M_hat)`` per block.

    ``scale_fn``: the name of a registered batched scale function (or the registered function): ``"one"``
    (default) or ``"l1_norm"`` (the reference's l-infinity example, ``grad.abs().sum()``). ``factor_dtype``:
    the math dtype of the blocks, fp32 or fp64. No state, no refresh: ``betas[1]``, ``epsilon`` and
    ``precondition_frequency`` have no effect, and ``start_preconditioning_step=None`` means step 1.
    """

    scale_fn: str = "one"
    factor_dtype: torch.dtype = torch.float32

    refreshes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_fn", SIGN_SCALES.name_of("SignDescent.scale_fn", self.scale_fn))
        check_math_dtype("SignDescent", self.factor_dtype)

    def inverse_exponent(self, order: int, dim: int) -> float:
        """1/2: ``sign(g) = g (g^2)^(-1/2)``, the diagonal second moment of the instantaneous gradient. A
        marker of the dims the kind acts on (``BlockingConfig(precondition_1d=False)`` clears it on 1-D
        blocks, which then use the grafting method); no factor is stored."""
        return 0.5


class SignDescentKind(PreconditionerKind):
    """``sign(M_hat) * scale_fn(M_hat)`` for a bucket (no state fields, no refresh)."""

    config_type = SignDescent
    linear = False

    @property
    def preconditions(self) -> bool:
        return any(e != 0 for e in self.exponents)

    @property
    def failure_limit(self) -> Optional[int]:
        return None

    def elementwise_flops(self, model: "CostModel") -> float:
        """Sign and scale; a scale function other than ``"one"`` is priced as one more reduction (2)."""
        if not self.preconditions:
            return 0.0
        extra = 0.0 if self.config.scale_fn == "one" else 2.0
        return model.sign_elementwise_flops + extra

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        scale = SIGN_SCALES[self.config.scale_fn](M)          # before out is written: out may be M itself
        if isinstance(scale, torch.Tensor) and scale.shape != (M.shape[0],):
            raise ValueError(f"SignDescent.scale_fn {self.config.scale_fn!r} returned a tensor of shape "
                             f"{tuple(scale.shape)} for a stack of {M.shape[0]} blocks; it must return one number "
                             "per block (shape [B]) or a float.")
        torch.sign(M, out=out)
        if isinstance(scale, torch.Tensor):
            return out.mul_(per_block(scale.to(out.dtype), out.ndim))
        return out if scale == 1.0 else out.mul_(float(scale))


__all__ = ["SignDescent", "SignDescentKind"]
