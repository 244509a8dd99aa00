"""The element-wise work of a step on a bucket's stacks, eager or fused by ``torch.compile``.

Per block, after the factor updates (``kron.py``), a step needs: the filtered gradient
``M <- beta1 M + (1 - beta1) G``, the grafting state ``V`` (AdaGrad sum or EMA of ``G^2``), the
grafting direction ``D = M / (sqrt(V) a + c)`` (``a``, ``c``: per-block bias-correction scalars)
or only its norm when the Shampoo direction is used, and the final per-block rescale
``P <- P ||D|| / (||P|| + 1e-16)``. Each is a pass over parameter-sized memory, and on CPUs and
GPUs alike those passes are bound by memory bandwidth, not FLOPs.

Two implementations with the same contract:

* eager: in-place ops that reuse the gathered-gradient stack ``G`` (the executor's buffer, dead
  once the factors and moments are updated) as scratch, so no parameter-sized tensor is
  allocated (a fresh multi-MiB allocation costs page faults on every step on CPU);
* compiled (``elementwise="compile"``): the moments, the grafting state and the norm of ``D`` in
  one generated kernel (reads ``G, M, V``, writes ``M, V``), and the rescale in one more.
  Compilation failure falls back to eager with one warning; the number of distinct compiled
  signatures is bounded (:data:`MAX_COMPILED_SIGNATURES`), beyond which new shapes run eagerly.
  Results equal the eager ones up to float rounding (``tests/test_fused.py`` asserts the bound).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Union

import torch

#: A per-step coefficient: one float for the bucket, or a per-block tensor (masked steps).
Coefficient = Union[float, torch.Tensor]

#: Distinct (shape, dtype, flags) signatures one kernel runs compiled; calls with new ones beyond it run
#: eagerly. Shapes do not each cost a compile: after the first shape change torch.compile makes the
#: kernel shape-generic (``dynamic=None``), and dynamo's own recompile limit applies on top.
MAX_COMPILED_SIGNATURES = 64
#: Added to ``||P||`` before dividing (as in the reference implementation).
NORM_EPS = 1e-16


def block_norms(X: torch.Tensor) -> torch.Tensor:
    """Per-block 2-norms ``[B]`` of a stack, accumulated in at least fp32."""
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(X.reshape(X.shape[0], -1), dim=1, dtype=dtype)


def _bshape(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------- eager


def update_moments_(G: torch.Tensor, M: Optional[torch.Tensor], V: Optional[torch.Tensor], beta1: float,
                    v_beta: Coefficient, v_weight: float, m_weight: Optional[torch.Tensor] = None,
                    beta3: Optional[float] = None) -> None:
    """``V <- v_beta V + v_weight G^2``; ``M <- lerp(M, G, 1 - beta1)`` (in place; either may be None).

    Masked steps pass per-block tensors: ``m_weight`` (replaces ``1 - beta1``) and ``v_beta``, 0 and 1
    where a block is inactive (its rows of ``G`` are zero), which leaves its ``M`` and ``V`` bit-identical.
    ``beta3`` (with ``M``): ``G`` is overwritten with the filtered gradient the direction uses,
    ``beta3 M_old + (1 - beta3) G``, computed as ``M_new + (beta1 - beta3) (G - M_old)`` (no coefficient
    above 1, so no cancellation, and no extra buffer).
    """
    if V is not None:
        if isinstance(v_beta, torch.Tensor) or v_beta != 1.0:
            V.mul_(v_beta)
        V.addcmul_(G, G, value=v_weight)
    if M is None:
        return
    if beta3 is None:
        M.lerp_(G, 1.0 - beta1 if m_weight is None else m_weight)
        return
    delta = G.sub_(M)
    if m_weight is None:
        M.add_(delta, alpha=1.0 - beta1)
    else:
        M.addcmul_(delta, m_weight)
    G.mul_(beta1 - beta3).add_(M)


def graft_eager(G: torch.Tensor, M: torch.Tensor, V: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                direction: bool, norm: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``D = M / (sqrt(V) a + c)``: ``(D or None, per-block ||D|| or None)``. Uses ``G`` as scratch.

    ``direction``: return ``D`` (then it lives in ``G``'s memory, or a new tensor when ``M`` is
    ``G``); otherwise only its norm is needed and ``M``/``G`` keep their values when ``M is G``.
    ``norm=False`` skips the norm pass (a step that uses ``D`` itself does not need it).
    """
    if M is G:
        den = torch.sqrt(V)
        den.mul_(a).add_(c)
        D = G.div_(den) if direction else torch.div(G, den, out=den)
    else:
        den = torch.sqrt(V, out=G)
        den.mul_(a).add_(c)
        D = torch.div(M, den, out=den)
    return (D if direction else None), (block_norms(D) if norm else None)


def rescale_eager(P: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out <- P * target / (||P|| + eps)`` per block (``out`` may be ``P``); returns ``out``."""
    scale = _bshape(target / block_norms(P).add_(NORM_EPS), P.ndim).to(out.dtype)
    return torch.mul(P, scale, out=out)


# ----------------------------------------------------------------------------- compiled


def _fused_moments_graft(G: torch.Tensor, M: Optional[torch.Tensor], V: torch.Tensor, one_minus_beta1: torch.Tensor,
                         v_beta: torch.Tensor, v_weight: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                         direction: bool, one_minus_beta3: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Moments, grafting state and ``||D||`` in one pass; with ``direction``, ``D`` is written into ``G``,
    else (with ``one_minus_beta3``) the beta3-filtered gradient the direction uses."""
    if M is not None:
        Mn = M + one_minus_beta1 * (G - M)
        filtered = Mn if one_minus_beta3 is None else M + one_minus_beta3 * (G - M)
        M.copy_(Mn)
    else:
        filtered = G
    Vn = V * v_beta + v_weight * (G * G)
    V.copy_(Vn)
    D = filtered / (torch.sqrt(Vn) * a + c)
    norm = torch.sqrt((D * D).reshape(D.shape[0], -1).sum(dim=1))
    if direction:
        G.copy_(D)
    elif one_minus_beta3 is not None:
        G.copy_(filtered)
    return norm


def _fused_rescale(P: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> None:
    Pf = P.to(out.dtype)
    norm = torch.sqrt((Pf * Pf).reshape(P.shape[0], -1).sum(dim=1))
    scale = (target / (norm + NORM_EPS)).reshape((-1,) + (1,) * (P.ndim - 1))
    out.copy_(Pf * scale)


class CompiledKernel:
    """``torch.compile`` of one function, with an eager fallback and a bound on compiled signatures."""

    def __init__(self, fn: Callable[..., Any], max_signatures: int = MAX_COMPILED_SIGNATURES) -> None:
        self.fn = fn
        self.max_signatures = max_signatures
        self.compiled: Optional[Callable[..., Any]] = None
        self.failed: Optional[str] = None
        self.signatures: set[tuple] = set()
        self.eager_calls = 0    # calls that ran eagerly (failure or beyond the signature bound)

    @staticmethod
    def signature(args: tuple) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args)

    def __call__(self, *args: Any) -> Any:
        sig = self.signature(args)
        if self.failed is not None or (sig not in self.signatures and len(self.signatures) >= self.max_signatures):
            self.eager_calls += 1
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=None)
            out = self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure means: run eagerly
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"sharded_shampoo: torch.compile of {self.fn.__name__} failed ({self.failed.splitlines()[0]}); "
                          "the element-wise math runs eagerly from now on.", RuntimeWarning, stacklevel=2)
            self.eager_calls += 1
            return self.fn(*args)
        self.signatures.add(sig)
        return out


#: One compiled kernel per function for the whole process (shared by every bucket).
FUSED_MOMENTS_GRAFT = CompiledKernel(_fused_moments_graft)
FUSED_RESCALE = CompiledKernel(_fused_rescale)


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor input (a Python float would be baked into the compiled code: one compile per value)."""
    return _cached_scalar(float(x), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _cached_scalar(x: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # made once per value: on a GPU each torch.tensor(x, device=...) is a blocking host-to-device copy;
    # the kernels only read it
    return torch.tensor(x, dtype=dtype, device=device)


def moments_and_graft(G: torch.Tensor, M: Optional[torch.Tensor], V: torch.Tensor, beta1: float, v_beta: Coefficient,
                      v_weight: float, a: torch.Tensor, c: torch.Tensor, direction: bool,
                      compiled: bool, norm: bool = True, m_weight: Optional[torch.Tensor] = None,
                      beta3: Optional[float] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Update ``M`` and ``V``; return ``(D or None, ||D||)`` (see :func:`graft_eager`; the fused kernel
    computes the norm in the same pass, so ``norm=False`` only saves the eager path's extra pass).
    ``m_weight`` / tensor ``v_beta``: a masked step's per-block coefficients (see :func:`update_moments_`).
    ``beta3``: the grafting direction is taken from ``beta3 M_old + (1 - beta3) G``, which ``G`` holds
    afterwards when ``direction`` is False."""
    if not compiled:
        update_moments_(G, M, V, beta1, v_beta, v_weight, m_weight, beta3)
        return graft_eager(G, G if M is None or beta3 is not None else M, V, a, c, direction, norm)
    w1 = _scalar(1.0 - beta1, G) if m_weight is None else m_weight.to(G.dtype)
    vb = v_beta.to(G.dtype) if isinstance(v_beta, torch.Tensor) else _scalar(v_beta, G)
    w3 = None if beta3 is None else _scalar(1.0 - beta3, G)
    d_norm = FUSED_MOMENTS_GRAFT(G, M, V, w1, vb, _scalar(v_weight, G), a.to(G.dtype), c.to(G.dtype), direction, w3)
    return (G if direction else None), d_norm


def rescale(P: torch.Tensor, target: torch.Tensor, out: torch.Tensor, compiled: bool) -> torch.Tensor:
    """``out <- P * target / (||P|| + 1e-16)`` per block; returns ``out``."""
    if not compiled:
        return rescale_eager(P, target, out)
    FUSED_RESCALE(P, target.to(out.dtype), out)
    return out


__all__ = ["CompiledKernel", "FUSED_MOMENTS_GRAFT", "FUSED_RESCALE", "MAX_COMPILED_SIGNATURES", "block_norms",
           "graft_eager",
           "moments_and_graft", "rescale", "rescale_eager", "update_moments_"]
