"""The dry-run planner: the plan of a training job, on a laptop, before it launches.

``sharded-shampoo plan`` (:mod:`.cli`) and :func:`plan_model` build the model on the meta device,
apply the job's parallelism (pipeline stages, FSDP/HSDP, tensor parallel, expert parallel) over a
fake process group, and run the same planner the optimizer runs. Modules: ``meshes`` (named axes ->
device meshes), ``stages`` (pipeline stages of a model, each a ``views.ModelView``), ``twins``
(identical layers parallelized once), ``parallelize`` (TP/EP/FSDP on a model), ``titan_source``
(``torchtitan:<model>:<flavor>``: torchtitan's own registry and parallelize/pipelining functions),
``sharded`` (what one stage's parallelization yields), ``build`` (the pipeline), ``report`` (text
and PNG of a plan: ``plan_report`` for one plan, ``stage_report`` per pipeline stage), ``outputs``
(output paths checked before planning), ``errors``, ``presets`` (model zoo).

Contract: inputs are a model source (preset, ``pkg.mod:factory``, callable, or torchtitan model),
mesh axes and ``PlanSettings``; outputs a ``ShampooPlan`` (a ``PipelinePlan`` of one per stage with
``pp > 1``) and its report. Runs in one process on the meta device (no real communication). May
import ``planning``, ``runtime.placements`` (the same placement parsing as training), ``config``,
``compute.kinds`` (the config classes of the kinds ``--preconditioner`` names live beside their
kind) and ``_torch_compat``; never ``optimizer``, the rest of ``compute`` or ``checkpointing``,
and nothing imports it except its CLI.
"""

from ..planning.pipeline import PipelinePlan
from .build import ShardedModel, parse_dtype, plan_model, resolve_model, shard_model, shard_stages, sharded_param_specs
from .meshes import MAX_RANKS, MeshAxes, parse_axes, parse_mesh
from .parallelize import apply_parallelism, fsdp_units
from .report import DryRunError, format_report, human_bytes, human_flops, write_png
from .stages import StageSplit, llm_stage_modules, split_stages
from .views import ModelView

__all__ = ["DryRunError", "MAX_RANKS", "MeshAxes", "ModelView", "PipelinePlan", "ShardedModel", "StageSplit",
           "apply_parallelism", "format_report", "fsdp_units", "human_bytes", "human_flops", "llm_stage_modules",
           "parse_axes", "parse_dtype", "parse_mesh", "plan_model", "resolve_model", "shard_model", "shard_stages",
           "sharded_param_specs", "split_stages", "write_png"]
