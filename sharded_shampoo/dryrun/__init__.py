"""The dry-run planner: build a model on the meta device over a fake process group, plan it, report.

``sharded-shampoo plan`` (:mod:`.cli`) and :func:`plan_model` run the same planner the optimizer runs.
"""

from .build import (DryRunError, format_report, human_bytes, human_flops, parse_dtype, parse_mesh, plan_model,
                    resolve_model, sharded_param_specs, write_png)

__all__ = ["DryRunError", "format_report", "human_bytes", "human_flops", "parse_dtype", "parse_mesh", "plan_model",
           "resolve_model", "sharded_param_specs", "write_png"]
