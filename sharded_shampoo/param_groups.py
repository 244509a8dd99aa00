"""Param groups: normalise what users pass, and validate every hyperparameter in one place.

``ShardedShampoo`` accepts ``model.parameters()``, ``model.named_parameters()`` or param-group
dicts (each may carry ``param_names``, as torch's optimizers and torchtitan pass them). Every
check raises a ValueError that names the setting, its valid range and the value it got, and
runs at construction, at every step (a value set on ``param_groups`` between steps) and on
every loaded state dict before anything is applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

from .config import (COMM_DTYPES, GRAFTING_TYPES, BlockingConfig, ElementwiseMode, check_range,
                     is_preconditioner_config, preconditioner_config_names, rank_handling_of)
from .update_options import validate_update_options

OWNER = "ShardedShampoo"
#: Keys of a param group that name its parameters rather than set anything.
BOOKKEEPING_KEYS = ("params", "param_names")
#: Constructor arguments that set the whole optimizer; in a param group they would be ignored.
OPTIMIZER_WIDE_KEYS = ("mesh", "comm_dtype", "nonfinite_grads", "overlap_chunks")


def check_lr(lr: Any) -> None:
    """A float or a 0-d tensor (LR schedulers, torch.compile), finite and >= 0."""
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or lr.numel() != 1:
            raise ValueError(f"{OWNER}.lr must be a float or a 0-d tensor; got a tensor of shape {tuple(lr.shape)}. "
                             "Pass a scalar (e.g. torch.tensor(1e-3)).")
        if lr.is_complex() or not bool(torch.isfinite(lr)) or float(lr) < 0:
            raise ValueError(f"{OWNER}.lr must be a finite number >= 0; got {lr!r}.")
        return
    check_range(OWNER, "lr", lr, 0.0, math.inf)


def _check_int(name: str, v: Any, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        extra = "None (= precondition_frequency) or " if allow_none else ""
        raise ValueError(f"{OWNER}.{name} must be {extra}an integer >= 1; got {v!r}.")


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{OWNER}.{name} must be True or False; got {v!r}.")


def validate_group(g: Mapping[str, Any]) -> None:
    """Raise ValueError naming the field and its valid range for any bad hyperparameter."""
    wide = [k for k in OPTIMIZER_WIDE_KEYS if k in g]
    if wide:
        raise ValueError(f"{OWNER}: {wide[0]!r} in a param group would be ignored: it applies to the whole "
                         f"optimizer. Remove it from the group and pass ShardedShampoo(..., {wide[0]}=...).")
    check_lr(g["lr"])
    betas = g["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{OWNER}.betas must be a pair (beta1, beta2); got {betas!r}.")
    check_range(OWNER, "betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range(OWNER, "betas[1]", betas[1], 0.0, 1.0, low_open=True)
    _check_beta3(g.get("beta3"), betas[0])
    check_range(OWNER, "weight_decay", g["weight_decay"], 0.0, math.inf)
    check_range(OWNER, "momentum", g["momentum"], 0.0, 1.0, high_open=True)
    check_range(OWNER, "dampening", g["dampening"], 0.0, 1.0, high_open=True)
    for name in ("use_nesterov", "use_bias_correction"):
        _check_bool(name, g[name])
    if g["use_nesterov"] and g["momentum"] == 0:
        raise ValueError(f"{OWNER}.use_nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or "
                         "use_nesterov=False.")
    _check_int("max_preconditioner_dim", g["max_preconditioner_dim"])
    _check_int("precondition_frequency", g["precondition_frequency"])
    _check_int("start_preconditioning_step", g["start_preconditioning_step"], allow_none=True)
    if g["grafting"] is not None and not isinstance(g["grafting"], GRAFTING_TYPES):
        raise ValueError(f"{OWNER}.grafting must be None, SGDGrafting(), AdaGradGrafting(), RMSpropGrafting() or "
                         f"AdamGrafting(); got {g['grafting']!r}.")
    if not is_preconditioner_config(g["preconditioner"]):
        raise ValueError(f"{OWNER}.preconditioner must be one of {preconditioner_config_names()}; "
                         f"got {g['preconditioner']!r}.")
    _check_epsilon(g["epsilon"], g["preconditioner"])
    if not isinstance(g["blocking"], BlockingConfig):
        raise ValueError(f"{OWNER}.blocking must be a BlockingConfig; got {g['blocking']!r}.")
    ElementwiseMode.parse(g.get("elementwise", ElementwiseMode.EAGER))
    step = g.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"param group 'step' must be an integer >= 0 (the number of steps taken); got {step!r}.")
    validate_update_options(g)


def _check_beta3(beta3: Any, beta1: float) -> None:
    """None (the direction uses the filtered gradient ``M`` itself) or a coefficient in [0, 1) (needs beta1 > 0)."""
    if beta3 is None:
        return
    check_range(OWNER, "beta3 (None: = betas[0])", beta3, 0.0, 1.0, high_open=True)
    if beta1 == 0:
        raise ValueError(f"{OWNER}.beta3={beta3} filters the gradient with the first moment, which betas[0]=0 turns "
                         "off; set betas[0] > 0 or beta3=None.")


def _check_epsilon(epsilon: Any, preconditioner: Any) -> None:
    """> 0 (added to the factors before their roots), or exactly 0 with ``PseudoInverse`` rank handling."""
    if rank_handling_of(preconditioner) is None:
        if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and math.isfinite(epsilon)
                and epsilon > 0):
            raise ValueError(f"{OWNER}.epsilon must be a finite number > 0 (0 only with pseudo-inverse roots: "
                             f"EighRootConfig(rank_handling=PseudoInverse(...))); got {epsilon!r}.")
    elif epsilon != 0:
        raise ValueError(f"{OWNER}.epsilon must be 0.0 with PseudoInverse rank handling (it replaces the epsilon "
                         f"perturbation, as in the reference); got {epsilon!r}. Set epsilon=0.0 or "
                         "rank_handling=None.")


def check_comm_dtype(comm_dtype: Any) -> None:
    if comm_dtype not in COMM_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMM_DTYPES)
        raise ValueError(f"{OWNER}.comm_dtype must be one of torch.{{{names}}}; got {comm_dtype!r}.")


def check_overlap_chunks(chunks: Any) -> None:
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"{OWNER}.overlap_chunks must be an integer >= 1 (1: one exchange each way, no overlap); "
                         f"got {chunks!r}.")


def check_release_buffers(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{OWNER}.release_buffers_between_steps must be True or False (True: free every buffer "
                         f"besides the state between steps); got {value!r}.")


def check_parameter(p: Any, name: str) -> None:
    """One parameter: a floating, real tensor with storage (not on the meta device)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{OWNER}: parameter {name} is a {type(p).__name__}, not a tensor.")
    if p.is_complex():
        raise ValueError(f"{OWNER} does not support complex parameters; {name} is a {p.dtype} parameter of shape "
                         f"{tuple(p.shape)}. Use torch.view_as_real on a real parameter instead.")
    if not p.is_floating_point():
        raise ValueError(f"{OWNER} needs floating-point parameters; {name} is {p.dtype}.")
    if p.device.type == "meta":
        raise ValueError(f"{OWNER}: parameter {name} is on the meta device (no storage); materialise the model "
                         "(e.g. model.to_empty(device=...) and initialise it) before building the optimizer. For "
                         "a memory plan without storage use sharded_shampoo.dryrun.plan_model.")


def _entry(e: Any) -> tuple[Optional[str], Any]:
    if isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str):
        return e[0], e[1]
    return None, e


def split_named(params: Any) -> list[dict[str, Any]]:
    """Normalise params / named_parameters / group dicts into group dicts with 'params' and 'param_names'."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{OWNER} expects an iterable of parameters, named parameters or param-group dicts; got a "
                        "single Tensor. Pass [tensor] or model.parameters().")
    items = list(params)
    if not items:
        raise ValueError(f"{OWNER} got an empty parameter list.")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for gi, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("param groups must be dicts with a 'params' entry.")
        g = dict(group)
        entries = g["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        if not entries:
            raise ValueError(f"{OWNER}: param group {gi} has no parameters; drop the group or give it some.")
        pairs = [_entry(e) for e in entries]
        given = g.get("param_names")
        if given is not None and len(list(given)) != len(pairs):
            raise ValueError(f"param group {gi}: {len(list(given))} param_names for {len(pairs)} parameters.")
        names = list(given) if given is not None else [n for n, _ in pairs]
        g["params"] = [t for _, t in pairs]
        g["param_names"] = names
        out.append(g)
    _reject_duplicates(out)
    return out


def _reject_duplicates(groups: list[dict[str, Any]]) -> None:
    """The same tensor twice (in one group, two groups, or under two names) would be stepped twice."""
    seen: dict[int, str] = {}
    for gi, g in enumerate(groups):
        for j, (p, n) in enumerate(zip(g["params"], g["param_names"])):
            label = f"{n!r}" if n is not None else f"param_groups[{gi}]['params'][{j}]"
            if id(p) in seen:
                raise ValueError(f"{OWNER}: the same tensor is passed twice, as {seen[id(p)]} and as {label}; it "
                                 "would be updated twice per step. Pass every parameter once (tied weights: once).")
            seen[id(p)] = label
