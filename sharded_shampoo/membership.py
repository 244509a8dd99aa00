"""Which tensors each param group holds: fixed at construction, checked before every use.

torch optimizers read ``param_groups[i]["params"]`` afresh on every step, so users edit those
lists (append a tensor, remove one, swap one in) and expect the edit to be honoured.
ShardedShampoo plans blocks, owners, routing and state once, for the parameters it was built
with; an edited list would be silently ignored (an appended tensor never trained, a removed one
still trained). So the lists are recorded at construction and compared before every step,
``state_dict`` and ``load_state_dict``: any change (a tensor added, removed, replaced, moved to
another group, reordered; a name changed or ``param_names`` removed; a group added or dropped)
raises a ValueError naming the group and the parameter, before anything is updated.

The check compares object identities (the recorded tensors are kept alive here, so an id cannot
be reused), a list comparison per group: cheap enough for every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

FIX = ("ShardedShampoo plans blocks, owners and state once, for the parameters it was built with, so such an edit "
       "cannot be applied; nothing was updated. Restore the list, or build a new ShardedShampoo over the "
       "parameters you want to train (add_param_group after construction is not supported either).")


class GroupMembership:
    """The parameters (and names) of every param group as built; ``check`` raises on any edit."""

    def __init__(self, param_groups: Sequence[dict[str, Any]]) -> None:
        self.params: list[tuple[torch.Tensor, ...]] = [tuple(g["params"]) for g in param_groups]
        self.ids: list[list[int]] = [[id(p) for p in ps] for ps in self.params]
        self.names: list[list[Optional[str]]] = [list(g["param_names"]) for g in param_groups]
        #: id of a built tensor -> (group, position), to say where a moved tensor came from
        self.where = {id(p): (gi, j) for gi, ps in enumerate(self.params) for j, p in enumerate(ps)}

    def check(self, param_groups: Sequence[dict[str, Any]]) -> None:
        """Raise ValueError (group, parameter, fix) if any group's parameter list or names changed."""
        if len(param_groups) != len(self.params):
            raise ValueError(f"the optimizer has {len(param_groups)} param group(s) but was built with "
                             f"{len(self.params)}: a group was added to or removed from param_groups. {FIX}")
        for gi, group in enumerate(param_groups):
            params = group.get("params")
            if params is None or [id(p) for p in params] != self.ids[gi]:
                raise ValueError(f"param_groups[{gi}]['params'] changed after construction: "
                                 f"{self._params_change(gi, list(params or []), group.get('param_names'))}. {FIX}")
            if "param_names" not in group:
                raise ValueError(f"param_groups[{gi}]['param_names'] was removed after construction (it held "
                                 f"{self.names[gi]}). {FIX}")
            names = list(group["param_names"])
            if names != self.names[gi]:
                raise ValueError(f"param_groups[{gi}]['param_names'] changed after construction: "
                                 f"{_names_change(names, self.names[gi])}. {FIX}")

    # ------------------------------------------------------------------ messages

    def _label(self, p: Any, name: Optional[str] = None) -> str:
        """A built tensor by its name (or group and position); another one by ``name`` and shape."""
        at = self.where.get(id(p))
        if at is not None:
            gi, j = at
            built = self.names[gi][j]
            return repr(built) if built is not None else f"the tensor built as param_groups[{gi}]['params'][{j}]"
        what = f"a new tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else f"a {type(p).__name__}"
        return f"{what} named {name!r}" if name is not None else what

    def _params_change(self, gi: int, now: list[Any], names: Any) -> str:
        """What happened to group ``gi``'s list: a tensor replaced, added, removed, moved or reordered."""
        built = self.params[gi]
        names = list(names) if names is not None else []
        # a name in param_names for a new tensor, unless it is a built name left in place
        known = {n for ns in self.names for n in ns}
        new_name = [names[j] if j < len(names) and names[j] not in known else None for j in range(len(now))]
        diffs = [j for j, (a, b) in enumerate(zip(now, built)) if a is not b]
        if len(now) == len(built) and len(diffs) == 1:
            j = diffs[0]
            return f"position {j} holds {self._label(now[j], new_name[j])} instead of {self._label(built[j])}"
        built_ids, now_ids = set(self.ids[gi]), {id(p) for p in now}
        parts = []
        added = [j for j, p in enumerate(now) if id(p) not in built_ids]
        if added:
            j = added[0]
            origin = self.where.get(id(now[j]))
            moved = f" (built in param_groups[{origin[0]}])" if origin is not None else ""
            parts.append(f"{self._label(now[j], new_name[j])}{moved} was added at position {j}")
        removed = [p for p in built if id(p) not in now_ids]
        if removed:
            parts.append(f"{self._label(removed[0])} was removed")
        if parts:
            return "; ".join(parts)
        if len(now) != len(built):
            twice = next(p for j, p in enumerate(now) if any(q is p for q in now[:j]))
            return f"{self._label(twice)} appears twice"
        j = diffs[0]
        return f"the order changed: position {j} holds {self._label(now[j])}, built with {self._label(built[j])} there"


def _names_change(now: list[Any], built: list[Optional[str]]) -> str:
    if len(now) != len(built):
        return f"it has {len(now)} names for {len(built)} parameters"
    j = next(j for j, (a, b) in enumerate(zip(now, built)) if a != b)
    return f"position {j} is named {now[j]!r}, built as {built[j]!r}"
