"""Named profiler ranges around the phases of a step, so a user's trace shows where the optimizer's time goes.

Every phase of ``ShardedShampoo.step()`` runs inside ``torch.profiler.record_function`` with one of
the names below (``ShardedShampoo::<phase>``), when a profiler is recording: torch's profiler,
TensorBoard's trace viewer and Perfetto then show the phases as nested ranges under torch's own
``Optimizer.step#ShardedShampoo.step``. Without a profiler :func:`phase` costs one flag check
(``record_function`` alone costs ~20 us per range on a CPU, about 1 ms per step at ~50 ranges).
docs/user_guide.md ("Profiling") has a trace summary of the training example.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch.profiler import record_function

from ._torch_compat import profiler_enabled

PREFIX = "ShardedShampoo::"
#: local checks, the gradient summary, the agreement all-reduce and the step policy (masks)
AGREE = PREFIX + "agree"
#: L2 weight decay, local copies and the gradient exchange into the per-bucket stacks
GATHER = PREFIX + "gather"
#: the statistics of every block (factor EMAs: ``kind.update``)
FACTOR_UPDATE = PREFIX + "factor_update"
#: the amortized step: inverse roots / eigenbases (``kind.refresh``, ``kind.after_refresh``)
REFRESH = PREFIX + "refresh"
#: the kind's search direction (``kind.direction``)
PRECONDITION = PREFIX + "precondition"
#: the filtered gradient, the grafting state, the grafting direction and the per-block rescale
GRAFT = PREFIX + "graft"
#: the update exchange back to the holders of each piece
SCATTER = PREFIX + "scatter"
#: the update stage on this rank's shards (weight decay, momentum / averaging, the lr step)
APPLY = PREFIX + "apply"

PHASES = (AGREE, GATHER, FACTOR_UPDATE, REFRESH, PRECONDITION, GRAFT, SCATTER, APPLY)


def phase(name: str) -> AbstractContextManager[object]:
    """``record_function(name)`` while a profiler records, else a no-op context."""
    return record_function(name) if profiler_enabled() else nullcontext()


__all__ = ["AGREE", "APPLY", "FACTOR_UPDATE", "GATHER", "GRAFT", "PHASES", "PRECONDITION", "PREFIX", "REFRESH",
           "SCATTER", "phase"]
