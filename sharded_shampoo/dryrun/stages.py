"""Pipeline stages of a dry-run: which modules each pipeline rank holds, as torchtitan splits them.

A pipeline-parallel job gives every pipeline rank a part of the model (a *stage*) and, on that
rank, one optimizer over that part only. The dry-run mirrors it: the model is built whole on the
meta device, cut into stages by module names, and every stage is parallelized (TP/EP/FSDP over
the stage's ``dp x fsdp x tp`` ranks) and planned on its own.

Who decides the cut, first match wins:

1. a ``stage_split`` passed to :func:`~.build.plan_model` -- ``(model, num_stages) -> module
   names per stage`` (a model source with its own splitter, e.g. torchtitan's, plugs in here);
2. the model's own ``pipeline_stages(num_stages)`` method (the presets have one);
3. otherwise the dry-run refuses, naming the method to add.

:func:`llm_stage_modules` is torchtitan 0.3.0's default rule for decoder LLMs (``pipeline_llm``
with ``module_fqns_per_model_part`` unset and one stage per pipeline rank): the input embedding
and the output norm + head each count as one layer, the ``layers + 2`` effective layers are
dealt out evenly, the first stages taking one more when they do not divide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .views import ModelView

#: ``(model, num_stages) -> module names of each stage`` (dotted paths, as ``named_modules`` gives them).
StageSplit = Callable[[nn.Module, int], Sequence[Sequence[str]]]


def llm_stage_modules(num_stages: int, num_layers: int, *, inputs: Sequence[str] = ("tok_embeddings",),
                      outputs: Sequence[str] = ("norm", "output"), layers: str = "layers",
                      input_weight: int = 1, output_weight: int = 1) -> list[list[str]]:
    """Module names per stage by torchtitan's rule for decoder LLMs (see the module doc).

    ``inputs``/``outputs``: the modules before and after the layer stack (torchtitan calls the head
    ``lm_head``; the presets call it ``output``); they count as ``input_weight`` / ``output_weight``
    layers.
    """
    if num_stages < 1:
        raise ValueError(f"pp must be >= 1; got {num_stages}.")
    names = [f"{layers}.{i}" for i in range(num_layers)]
    if num_stages == 1:
        return [list(inputs) + names + list(outputs)]
    effective = num_layers + input_weight + output_weight
    per_stage, extra = divmod(effective, num_stages)
    if per_stage == 0 or input_weight > per_stage or output_weight > per_stage:
        most = effective // max(1, input_weight, output_weight)
        raise ValueError(f"pp={num_stages} is too many stages for {num_layers} layers (+ embedding and output, "
                         f"{effective} effective layers): every stage needs at least one layer and the first and "
                         f"last at least {max(input_weight, output_weight)}; use pp <= {most}.")
    stages: list[list[str]] = []
    next_layer = 0
    for s in range(num_stages):
        count = per_stage + (1 if s < extra else 0)
        first, last = s == 0, s == num_stages - 1
        count -= input_weight if first else 0
        count -= output_weight if last else 0
        take = names[next_layer:next_layer + count]
        next_layer += len(take)
        stages.append((list(inputs) if first else []) + take + (list(outputs) if last else []))
    return stages


def stage_module_names(model: nn.Module, num_stages: int, split: StageSplit | None = None,
                       name: str = "model") -> list[list[str]]:
    """The module names of every stage, checked: they name modules, no module is in two stages, and
    every trainable parameter is in exactly one stage."""
    if split is None:
        own = getattr(model, "pipeline_stages", None)
        if not callable(own):
            raise ValueError(f"--model {name!r} defines no pipeline_stages(num_stages) (module names per pipeline "
                             "stage), so it cannot be planned with pipeline parallelism; add one, pass stage_split= "
                             "to plan_model, or drop pp from --mesh.")
        stages = [list(s) for s in own(num_stages)]
    else:
        stages = [list(s) for s in split(model, num_stages)]
    if len(stages) != num_stages:
        raise ValueError(f"--model {name!r}: the stage split gave {len(stages)} stages for pp={num_stages}; give one "
                         "list of module names per pipeline rank.")
    modules = dict(model.named_modules())
    owner: dict[str, int] = {}
    for s, names in enumerate(stages):
        for n in names:
            if not isinstance(n, str) or n not in modules or n == "":
                raise ValueError(f"--model {name!r}: stage {s} names {n!r}, which is not a submodule of the model.")
            for other, t in owner.items():
                if n == other or n.startswith(other + ".") or other.startswith(n + "."):
                    raise ValueError(f"--model {name!r}: module {n!r} (stage {s}) overlaps {other!r} (stage {t}); "
                                     "every module belongs to one stage.")
            owner[n] = s
    _check_parameters_covered(model, stages, modules, name)
    return stages


def _check_parameters_covered(model: nn.Module, stages: list[list[str]], modules: dict[str, nn.Module],
                              name: str) -> None:
    where: dict[int, set[int]] = {}
    for s, names in enumerate(stages):
        for n in names:
            for p in modules[n].parameters():
                where.setdefault(id(p), set()).add(s)
    missing, shared = [], []
    for pname, p in model.named_parameters():
        stages_of = where.get(id(p), set())
        if p.requires_grad and not stages_of:
            missing.append(pname)
        if len(stages_of) > 1:
            shared.append(f"{pname} (stages {sorted(stages_of)})")
    if shared:
        raise ValueError(f"--model {name!r}: parameters shared between pipeline stages: {', '.join(shared[:5])}; "
                         "pipeline parallelism needs untied weights (torchtitan refuses tied weights with pp too).")
    if missing:
        raise ValueError(f"--model {name!r}: trainable parameters in no pipeline stage: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; add their modules to a stage.")


def split_stages(model: nn.Module, num_stages: int, split: StageSplit | None = None,
                 name: str = "model") -> list[ModelView]:
    """The model cut into ``num_stages`` parts, each a :class:`~.views.ModelView` of its modules (see
    :func:`stage_module_names`)."""
    return [ModelView(model, names) for names in stage_module_names(model, num_stages, split, name)]


__all__ = ["StageSplit", "llm_stage_modules", "split_stages", "stage_module_names"]
