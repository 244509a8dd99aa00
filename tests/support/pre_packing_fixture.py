"""The fixture ``tests/data/pre_packing_state_dict.pt``: a ShardedShampoo state dict in the layout before
symmetric packing, how it was made (:func:`main`) and the run it continues (:func:`build`, :func:`set_grads`).

The file was written once with the code of commit 426c08e (main before packing: factors and roots stored as
full d x d matrices): ``git archive 426c08e | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python
tests/support/pre_packing_fixture.py`` (this file imports nothing from the project at module level, so
the old code's ``sharded_shampoo`` is the one it runs). ``tests/test_checkpoint_packing.py`` loads the
file into today's (packed) optimizer and checks that training continues as the old code continued it.

The file holds the optimizer's ``state_dict()`` after :data:`STEPS` steps, the parameters at that
point, its checkpoint fingerprint, and the parameters the old code reached after :data:`MORE` further steps.
"""

from __future__ import annotations

import copy
import os

import torch

STEPS, MORE = 8, 4
#: where the fixture lives (beside the other test data)
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "pre_packing_state_dict.pt")
SHAPES = {"w": (6, 5), "b": (5,), "e": (4, 3)}


def build(params: dict[str, torch.nn.Parameter], packing: bool = True):
    """The optimizer of the fixture: a root-inverse group (w, b) and an eigenvalue-corrected group (e), fp64.

    ``packing=False``: the same with ``symmetric_packing=False`` (the argument exists since packing; the
    code before it stores full matrices without being asked).
    """
    from sharded_shampoo import AdaGradGrafting, EigenvalueCorrectedShampoo, RootInverseShampoo, ShardedShampoo

    storage = {} if packing else {"symmetric_packing": False}
    groups = [{"params": [("w", params["w"]), ("b", params["b"])]},
              {"params": [("e", params["e"])], "grafting": None,
               "preconditioner": EigenvalueCorrectedShampoo(factor_dtype=torch.float64, **storage)}]
    return ShardedShampoo(groups, lr=0.02, betas=(0.9, 0.99), epsilon=1e-6, momentum=0.5, max_preconditioner_dim=6,
                          precondition_frequency=2, start_preconditioning_step=6, grafting=AdaGradGrafting(1e-8),
                          preconditioner=RootInverseShampoo(factor_dtype=torch.float64, **storage))


def fingerprint(opt) -> str:
    """The checkpoint fingerprint (``checkpointing.compat.describe``) as the running code computes it."""
    try:
        from sharded_shampoo.checkpointing.compat import describe
    except ImportError:        # a source tree on PYTHONPATH: checkpointing/ is a top-level folder there
        from checkpointing.compat import describe
    return describe(opt)["fingerprint"]


def initial_params() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for n, s in SHAPES.items()}


def set_grads(params: dict[str, torch.nn.Parameter], t: int) -> None:
    g = torch.Generator().manual_seed(100 + t)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.5 * p.detach()


def main() -> None:
    params = initial_params()
    opt = build(params)
    for t in range(STEPS):
        set_grads(params, t)
        opt.step()
    # a deep copy: state_dict() holds views of the live state, which the further steps change
    saved = {"state_dict": copy.deepcopy(opt.state_dict()), "params": {n: p.detach().clone() for n, p in params.items()},
             "fingerprint": fingerprint(opt)}
    for t in range(STEPS, STEPS + MORE):
        set_grads(params, t)
        opt.step()
    saved["continued"] = {n: p.detach().clone() for n, p in params.items()}
    out = FIXTURE
    torch.save(saved, out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
