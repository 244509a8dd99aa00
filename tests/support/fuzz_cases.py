"""Randomized multi-rank fuzzing, part 1: a seed -> one fully determined :class:`Case` (pure, no torch state).

A case is a model (modules holding 0-D..4-D parameters of mixed dtypes, some frozen, some without a
gradient on some steps, channels_last and transposed leaves, stacked expert weights), a layout (one
process, DDP, FSDP2, mixed FSDP + replicated modules, HSDP, FSDP x TP, HSDP x TP, expert parallel),
an optimizer config (root-inverse / eigenvalue-corrected / KL- / eigendecomposed Shampoo with the issue-16
family options, spectral and sign descent, every
grafting, momentum / Nesterov, both weight decays, frequencies, block sizes), and optionally a NaN/Inf injection and a save -> load (another layout)
point. ``draw(seed)`` depends on nothing but the seed, so a failure is reproduced by its seed alone.

**Regime.** Every case is *well conditioned*: the ``N``-rank run must equal the 1-process run to
1e-6 relative. The arithmetic of the two runs is not always the same bits (torch's batched matmul
rounds differently for different batch sizes for some shapes, and an owner's bucket holds other
blocks than the single process's), and a block whose Kronecker factors are still rank deficient
when preconditioning starts amplifies that last bit without bound (1e-7 moves a run by 1e-1). So
either ``start_preconditioning_step`` is at least the number of gradient steps after which every
factor of every block can be full rank (``"full_rank"``: epsilon drawn down to 1e-12), or the
group is root-inverse with epsilon 1-10 times the squared gradient scale (``"large_eps"``, see
:func:`_group_settings`). See docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Optional

#: layout -> number of ranks it spans
LAYOUT_WORLD = {"single": 1, "ddp2": 2, "ddp3": 3, "ddp4": 4, "fsdp2": 2, "fsdp3": 3, "fsdp4": 4, "mixed2": 2,
                "mixed3": 3, "mixed4": 4, "hsdp2x2": 4, "fsdp_tp2x2": 4, "hsdp_tp2x1x2": 4, "ep2": 4, "ep4": 4}
#: layouts that need stacked expert weights / tensor-parallel modules
EP_LAYOUTS = ("ep2", "ep4")
TP_LAYOUTS = ("fsdp_tp2x2", "hsdp_tp2x1x2", "ep2", "ep4")
#: layouts a checkpoint may be saved from / loaded into: they span the whole process group
#: (``sharded_shampoo.checkpointing`` is collective over the default group) or run without one
CKPT_LAYOUTS = ("single", "ddp2", "ddp3", "ddp4", "fsdp2", "fsdp3", "fsdp4", "mixed2", "mixed4", "hsdp2x2",
                "fsdp_tp2x2", "hsdp_tp2x1x2", "ep2", "ep4")
DTYPES = ("float32", "float32", "float32", "bfloat16", "float64")
GRAFTINGS = ("none", "sgd", "adagrad", "rmsprop", "adam")
NONFINITE_KINDS = ("nan", "inf", "-inf", "overflow")
#: the bound of every comparison (relative to the reference parameter's largest magnitude)
TOLERANCE = 1e-6


@dataclass(frozen=True)
class ParamDraw:
    """One parameter of a module: its attribute name, shape and memory format."""

    attr: str
    shape: tuple[int, ...]
    memory: str = "contiguous"       # "contiguous" | "channels_last" (4-D) | "transposed" (2-D leaf .t())
    shard_dim: int = 0               # the dim FSDP2 shards (``shard_placement_fn``)


@dataclass(frozen=True)
class ModuleDraw:
    """A child module of the fuzz model (one dtype, frozen or not, how TP/FSDP treat it)."""

    name: str
    kind: str                        # "linear" | "embedding" | "norm" | "free" | "experts"
    params: tuple[ParamDraw, ...]
    dtype: str
    frozen: bool = False
    tp: str = ""                     # "colwise" | "rowwise" | "sequence" | "" (TP layouts only)
    own_unit: bool = True            # its own fully_shard unit (else only the root's)
    replicated: bool = False         # mixed layouts: left unsharded (replicated over the ranks)
    group: int = 0                   # 0: the default param group; 1: a second group with its own settings


@dataclass(frozen=True)
class ConfigDraw:
    """Optimizer settings: constructor keyword arguments (group 0's settings), every setting of the
    second dense group, and the expert group's overrides (config objects as plain specs)."""

    kwargs: tuple[tuple[str, object], ...]
    second_group: tuple[tuple[str, object], ...] = ()
    expert_group: tuple[tuple[str, object], ...] = ()
    regime: str = "full_rank"                    # "full_rank" | "large_eps" (the loosest group's)


@dataclass(frozen=True)
class NonFiniteDraw:
    """A bad gradient injected on one rank of the layout at one step, and the policy that must handle it."""

    step: int
    rank: int                        # rank within the layout's ranks
    param: str                       # preferred parameter (the first one with a non-empty local shard after it)
    kind: str                        # "nan" | "inf" | "-inf" | "overflow"
    policy: str                      # "raise" | "skip"


@dataclass(frozen=True)
class CheckpointDraw:
    """Save after ``save_step`` steps on the case's layout, load into ``load_layout``, continue to the end."""

    save_step: int
    load_layout: str
    flatten: bool = True
    async_save: bool = False


@dataclass(frozen=True)
class Case:
    seed: int
    layout: str
    modules: tuple[ModuleDraw, ...]
    config: ConfigDraw
    steps: int
    no_grad: tuple[tuple[str, tuple[int, ...]], ...]    # parameter fqn -> steps without a gradient
    grad_scale: float
    zero_grad: tuple[tuple[str, tuple[int, ...]], ...] = ()   # parameter fqn -> steps with an all-zero gradient
    nonfinite: Optional[NonFiniteDraw] = None
    checkpoint: Optional[CheckpointDraw] = None
    notes: tuple[str, ...] = field(default=())

    @property
    def world(self) -> int:
        return LAYOUT_WORLD[self.layout]

    def param_names(self) -> list[str]:
        return [f"{m.name}.{p.attr}" for m in self.modules for p in m.params]

    def trainable(self) -> list[str]:
        return [f"{m.name}.{p.attr}" for m in self.modules if not m.frozen for p in m.params]

    def has_grad(self, name: str, step: int) -> bool:
        return step not in dict(self.no_grad).get(name, ())

    def zero(self, name: str, step: int) -> bool:
        return step in dict(self.zero_grad).get(name, ())

    def summary(self) -> str:
        """One line: layout, model, config and events (what a failure report prints)."""
        kw = dict(self.config.kwargs)
        short = {"float32": "f32", "bfloat16": "bf16", "float64": "f64"}
        mods = ",".join(f"{'g1:' if m.group else ''}{m.kind}{'[' + m.tp + ']' if m.tp else ''}:{short[m.dtype]} "
                        f"{'*' if m.frozen else ''}{'(r)' if m.replicated else ''}"
                        + "/".join(("x".join(map(str, p.shape)) or "()") + {"contiguous": "", "channels_last": "cl",
                                                                  "transposed": "T"}[p.memory]
                                 + (f"@{p.shard_dim}" if p.shard_dim else "") for p in m.params)
                        for m in self.modules)
        cfg = _settings_line(kw) + (" || g1 " + _settings_line(dict(self.config.second_group))
                                    if self.config.second_group else "") + f" comm={'f64' if kw['comm_dtype'] == 'float64' else 'f32'}"
        ev = []
        if self.nonfinite:
            n = self.nonfinite
            ev.append(f"{n.kind}@step{n.step}/rank{n.rank}->{n.policy}")
        if self.checkpoint:
            c = self.checkpoint
            ev.append(f"save@{c.save_step}->{c.load_layout}{' async' if c.async_save else ''}"
                      f"{'' if c.flatten else ' nested'}")
        return f"seed {self.seed}: {self.layout} steps={self.steps} | {mods} | {cfg} | {' '.join(ev) or '-'}"


def _settings_line(kw: dict) -> str:
    wd_type = kw.get("weight_decay_type") or ("d" if kw["use_decoupled_weight_decay"] else "L2")
    averaging = f" avg={kw['iterate_averaging'][0]}" if kw.get("iterate_averaging") else ""
    return (f"{kw['preconditioner'][0]}{'64' if kw['preconditioner'][1]['factor_dtype'] == 'float64' else ''}"
            f"{'/newton' if kw['preconditioner'][1].get('root') == 'newton' else ''}"
            f"{'/full' if not kw['preconditioner'][1].get('symmetric_packing', True) else ''}/{kw['grafting'][0]}"
            f" b={kw['betas']} mom={kw['momentum']}{'N' if kw['use_nesterov'] else ''}{averaging}"
            f" wd={kw['weight_decay']}{wd_type}"
            f" f={kw['precondition_frequency']} s={kw['start_preconditioning_step']} eps={kw['epsilon']:.0e}"
            f" D={kw['max_preconditioner_dim']} {kw['regime']}{_family_line(kw)}")


def _family_line(kw: dict) -> str:
    """The Shampoo-family options of :func:`_with_family_options` a group uses (empty if none)."""
    options = {**kw["preconditioner"][1], "beta3": kw.get("beta3")}
    names = ("tolerance", "trace_scaling_exponent", "drop_weighting_factor_on_gsquare", "pseudo_inverse_rtol",
             "beta3")
    return "".join(f" {n}={options[n]}" for n in names if options.get(n) is not None)


# ----------------------------------------------------------------------------- drawing


def _dim(rng: random.Random, small: bool = False) -> int:
    return rng.choice((1, 2, 3, 4, 5) if small else (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16))


def _free_params(rng: random.Random) -> tuple[ParamDraw, ...]:
    out = []
    for j in range(rng.choice((1, 1, 2))):
        order = rng.choice((0, 1, 1, 2, 2, 3, 4))
        shape = tuple(_dim(rng, small=order >= 3) for _ in range(order))
        if order and rng.random() < 0.04:     # a 0-element parameter (no blocks, no state)
            shape = shape[:-1] + (0,)
        memory = "contiguous"
        if order == 4 and rng.random() < 0.6:
            memory = "channels_last"
        elif order == 2 and rng.random() < 0.4:
            memory = "transposed"
        shard_dim = rng.randrange(1, order) if order >= 2 and rng.random() < 0.3 else 0
        out.append(ParamDraw(f"p{j}", shape, memory, shard_dim))
    return tuple(out)


def _modules(rng: random.Random, layout: str) -> tuple[ModuleDraw, ...]:
    mods: list[ModuleDraw] = []
    tp = layout in TP_LAYOUTS
    for i in range(rng.randint(2, 5)):
        kind = rng.choice(("linear", "linear", "embedding", "norm", "free", "free"))
        dtype = rng.choice(DTYPES)
        if kind == "linear":
            d_in, d_out = _dim(rng), _dim(rng)
            params = (ParamDraw("weight", (d_out, d_in)),) + ((ParamDraw("bias", (d_out,)),) if rng.random() < 0.6
                                                                else ())
            style = rng.choice(("colwise", "rowwise")) if tp else ""
        elif kind == "embedding":
            params = (ParamDraw("weight", (_dim(rng), _dim(rng))),)
            style = rng.choice(("colwise", "rowwise")) if tp else ""
        elif kind == "norm":
            params = (ParamDraw("weight", (_dim(rng),)),)
            style = "sequence" if tp else ""
        else:
            params, style = _free_params(rng), ""
        mods.append(ModuleDraw(f"m{i}", kind, params, dtype, frozen=rng.random() < 0.15, tp=style,
                               own_unit=rng.random() < 0.7, replicated=layout.startswith("mixed") and rng.random() < 0.5,
                               group=int(rng.random() < 0.25)))
    if all(m.frozen for m in mods):
        mods[0] = ModuleDraw(**{**mods[0].__dict__, "frozen": False})
    if layout in EP_LAYOUTS or rng.random() < 0.3:
        shape = (rng.choice((1, 2, 3, 4, 5, 8)), _dim(rng), _dim(rng))
        mods.append(ModuleDraw("experts", "experts", (ParamDraw("w", shape),), rng.choice(DTYPES)))
    return tuple(mods)


def block_shapes(shape: tuple[int, ...], max_dim: int, merge: bool, batch_dims: int) -> list[tuple[int, ...]]:
    """The distinct block shapes of a parameter (a pure re-derivation used only to pick the regime)."""
    from sharded_shampoo.planning.blocking import merged_shape

    inner = shape[batch_dims:]
    if any(d == 0 for d in shape):
        return []
    merged = merged_shape(inner, max_dim, merge)
    chunks = [sorted({min(max_dim, d - a) for a in range(0, d, max_dim)}) for d in merged]
    out: list[tuple[int, ...]] = [()]
    for sizes in chunks:
        out = [o + (s,) for o in out for s in sizes]
    return out


def full_rank_step(case_modules: tuple[ModuleDraw, ...], max_dim: int, merge: bool, precondition_1d: bool) -> int:
    """Gradient steps after which every Kronecker factor of every block can be full rank.

    A factor of dim ``d_i`` of a block gains rank at most ``numel / d_i`` (its unfolding's other
    side) per step, so it needs ``ceil(d_i / (numel / d_i))`` steps of generic gradients.
    """
    need = 0
    for m in case_modules:
        if m.frozen:
            continue
        for p in m.params:
            for shape in block_shapes(p.shape, max_dim, merge, 1 if m.kind == "experts" else 0):
                if len(shape) == 1 and not precondition_1d:
                    continue
                numel = math.prod(shape)
                need = max([need] + [math.ceil(d * d / numel) for d in shape if d > 1])
    return need


def _grafting(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(GRAFTINGS)
    eps = rng.choice((1e-8, 1e-10))
    return {"none": ("none", {}), "sgd": ("sgd", {}), "adagrad": ("adagrad", {"epsilon": eps}),
            "rmsprop": ("rmsprop", {"beta2": rng.choice((0.9, 0.99)), "epsilon": eps}),
            "adam": ("adam", {"beta2": rng.choice((0.95, 0.999)), "epsilon": eps})}[kind]


def _preconditioner(rng: random.Random) -> tuple[str, dict]:
    factor = rng.choice(("float32", "float32", "float32", "float64"))
    if rng.random() < 0.5:
        root = rng.choice(("eigh", "eigh", "newton"))
        return "root_inverse", {"root": root, "factor_dtype": factor}
    return "eigen_corrected", {"factor_dtype": factor}


def _group_settings(rng: random.Random, modules: tuple[ModuleDraw, ...], steps: int,
                    missing: dict[str, tuple[int, ...]], scale: float, chaotic: bool = False) -> dict:
    """Every setting of one param group, in the well-conditioned regime for its parameters
    (``chaotic``: outside it on purpose -- see :func:`draw`).

    ``full_rank``: preconditioning starts once every factor can be full rank; any epsilon.
    ``large_eps``: otherwise, a root-inverse preconditioner with epsilon 1 or 10 times the squared
    gradient scale: ``(F + eps I)^(-1/2k)`` then barely depends on the (round-off) basis of the
    factor's null space. An eigenbasis of a rank-deficient factor is arbitrary, and the
    eigenvalue-corrected direction divides coordinate-wise in that basis, so no epsilon makes it
    insensitive (measured: 3e-2 at epsilon 10): such a group is drawn root-inverse instead.
    """
    max_dim = rng.choice((3, 4, 6, 8, 16, 32))
    merge, pre1d = rng.random() < 0.8, rng.random() < 0.7
    momentum = rng.choice((0.0, 0.0, 0.5, 0.9))
    # a parameter that misses steps collects fewer factor updates before preconditioning starts
    lag = max((len(missing.get(f"{m.name}.{p.attr}", ())) for m in modules for p in m.params), default=0)
    need = full_rank_step(modules, max_dim, merge, pre1d) + lag
    if need + 1 <= steps - 2 and rng.random() < 0.9:
        regime, start = "full_rank", rng.randint(max(need, 1), steps - 2)
        eps = 10.0 ** rng.choice((-12, -10, -8, -6, -4))
    else:
        regime, start = "large_eps", rng.choice((None, 1, 2, 3))
        eps = rng.choice((1.0, 10.0)) * scale * scale
    precond = _preconditioner(rng)
    if regime == "large_eps" and precond[0] == "eigen_corrected":
        precond = ("root_inverse", {"root": "eigh", "factor_dtype": precond[1]["factor_dtype"]})
    if chaotic:
        regime, start, eps = "chaotic", 1, 1e-12
        precond = (precond[0], dict(precond[1], factor_dtype="float64"))
    return dict(lr=rng.choice((0.01, 0.03, 0.1)), betas=(rng.choice((0.0, 0.9)), rng.choice((0.99, 0.999, 1.0))),
                epsilon=eps, weight_decay=rng.choice((0.0, 0.0, 0.01, 0.1)),
                use_decoupled_weight_decay=rng.random() < 0.5, momentum=momentum,
                dampening=rng.choice((0.0, 0.0, 0.1)) if momentum else 0.0,
                use_nesterov=bool(momentum) and rng.random() < 0.5, max_preconditioner_dim=max_dim,
                precondition_frequency=rng.choice((1, 2, 3, 5)), start_preconditioning_step=start,
                use_bias_correction=rng.random() < 0.8, grafting=_grafting(rng), preconditioner=precond,
                blocking={"precondition_1d": pre1d, "merge_dims": merge}, regime=regime)


def _update_stage(rng: random.Random, group: tuple[tuple[str, object], ...]) -> tuple[tuple[str, object], ...]:
    """GPA / Schedule-Free for some groups without momentum, and a ``weight_decay_type`` (which then
    replaces ``use_decoupled_weight_decay``) for some decoupled ones, with their ``peak_lr``.

    Drawn from a generator of its own (see :func:`draw`), so every other draw of a seed -- and
    with it every seed documented in the tests -- stays what it was.
    """
    g = dict(group)
    if not g:
        return group
    if g["momentum"] == 0 and rng.random() < 0.4:
        g["iterate_averaging"] = rng.choice((
            ("gpa", {"eval_interp_coeff": rng.choice((0.5, 0.9)), "train_interp_coeff": rng.choice((0.8, 1.0))}),
            ("schedule_free", {"train_interp_coeff": rng.choice((0.5, 0.8)), "eval_coeff_lr_power": rng.choice((0, 2))})))
    if g["use_decoupled_weight_decay"] and rng.random() < 0.5:
        g["weight_decay_type"] = rng.choice(("DECOUPLED", "corrected", "INDEPENDENT"))
        g["peak_lr"] = g["lr"] * rng.choice((1, 2))
    return tuple(g.items())


def _config(rng: random.Random, modules: tuple[ModuleDraw, ...], steps: int,
            missing: dict[str, tuple[int, ...]], scale: float, chaotic: bool) -> ConfigDraw:
    """Group 0 (its settings are the constructor's), an optional second dense group, the experts' group."""
    first = tuple(m for m in modules if m.group == 0)
    kwargs = _group_settings(rng, first, steps, missing, scale, chaotic)
    second = _group_settings(rng, tuple(m for m in modules if m.group == 1), steps, missing, scale, chaotic) \
        if any(m.group == 1 for m in modules) else {}
    factor64 = any(g and g["preconditioner"][1]["factor_dtype"] == "float64" for g in (kwargs, second))
    # fp64 factors with fp32 communication: pieces from other ranks are rounded, local ones are not
    kwargs.update(comm_dtype="float64" if factor64 and rng.random() < 0.5 and not chaotic else "float32",
                  nonfinite_grads=rng.choice(("raise", "skip")))
    expert = {}
    if any(m.kind == "experts" for m in modules) and rng.random() < 0.5:
        expert = dict(lr=rng.choice((0.02, 0.05)), weight_decay=rng.choice((0.0, 0.05)))
    regime = "chaotic" if chaotic else "large_eps" if "large_eps" in (kwargs["regime"], second.get("regime")) \
        else "full_rank"
    return ConfigDraw(tuple(kwargs.items()), tuple(second.items()), tuple(expert.items()), regime)


def _grad_steps(rng: random.Random, modules: tuple[ModuleDraw, ...], steps: int, p: float) -> tuple:
    """Parameters (fqn) drawn with probability ``p`` and 1-2 of their steps (never step 0)."""
    out = []
    for m in modules:
        if m.frozen:
            continue
        for pd in m.params:
            if rng.random() < p:
                out.append((f"{m.name}.{pd.attr}", tuple(sorted(rng.sample(range(1, steps), rng.randint(1, 2))))))
    return tuple(out)


def draw(seed: int, chaotic: bool = False) -> Case:
    """The case of ``seed`` (deterministic: Python's ``random.Random`` with only this seed).

    ``chaotic=True`` draws the same model, layout and events but leaves the well-conditioned regime
    on purpose (epsilon 1e-12, preconditioning from step 1 on rank-deficient factors, fp64 factors
    fed by fp32 communication, so other ranks' pieces are rounded and local ones are not): the
    fuzzer then *measures* how far round-off moves such runs instead of asserting 1e-6.
    """
    rng = random.Random(seed)
    layout = rng.choice(tuple(LAYOUT_WORLD))
    modules = _modules(rng, layout)
    steps = rng.randint(6, 12)
    no_grad = _grad_steps(rng, modules, steps, 0.2)
    zero_grad = _grad_steps(rng, modules, steps, 0.1)
    scale = rng.choice((0.1, 1.0, 3.0))
    config = _config(rng, modules, steps, {n: s for n, s in no_grad + zero_grad}, scale, chaotic)
    stage = random.Random(f"update-stage-{seed}")
    config = ConfigDraw(_update_stage(stage, config.kwargs), _update_stage(stage, config.second_group),
                        config.expert_group, config.regime)
    nonfinite = None
    if rng.random() < 0.4:
        names = [f"{m.name}.{p.attr}" for m in modules if not m.frozen for p in m.params]
        nonfinite = NonFiniteDraw(rng.randrange(steps), rng.randrange(LAYOUT_WORLD[layout]), rng.choice(names),
                                  rng.choice(NONFINITE_KINDS), rng.choice(("raise", "skip")))
    checkpoint = None
    if layout in CKPT_LAYOUTS and rng.random() < 0.35:
        targets = [t for t in CKPT_LAYOUTS if (t not in EP_LAYOUTS or any(m.kind == "experts" for m in modules))]
        checkpoint = CheckpointDraw(rng.randint(1, steps - 1), rng.choice(targets), flatten=rng.random() < 0.7,
                                    async_save=rng.random() < 0.2)
    config = _with_stateless_kinds(_with_kl(_with_family_options(_with_storage(config, seed), seed), seed), modules,
                                   seed)
    return Case(seed, layout, modules, config, steps, no_grad, scale, zero_grad=zero_grad,
                nonfinite=nonfinite, checkpoint=checkpoint)


def _with_storage(config: ConfigDraw, seed: int) -> ConfigDraw:
    """A quarter of the groups store full matrices (``symmetric_packing=False``), the rest packed (the default).

    Drawn from a generator of its own, so every other draw of a seed stays what it was before this one.
    """
    rng = random.Random(seed * 7919 + 17)

    def storage(group: tuple) -> tuple:
        out = dict(group)
        if "preconditioner" in out and rng.random() < 0.25:
            kind, kw = out["preconditioner"]
            out["preconditioner"] = (kind, dict(kw, symmetric_packing=False))
        return tuple(out.items())

    return dataclasses.replace(config, kwargs=storage(config.kwargs), second_group=storage(config.second_group))


def _with_kl(config: ConfigDraw, seed: int) -> ConfigDraw:
    """A third of the root-inverse groups become KL-Shampoo (``kl_shampoo``, the same root method, dtype and
    storage). Drawn from a generator of its own, so every other draw of a seed stays what it was."""
    rng = random.Random(f"kl-shampoo-{seed}")

    def kl(group: tuple) -> tuple:
        out = dict(group)
        if out.get("preconditioner", ("",))[0] == "root_inverse" and rng.random() < 1 / 3:
            out["preconditioner"] = ("kl_shampoo", out["preconditioner"][1])
        return tuple(out.items())

    return dataclasses.replace(config, kwargs=kl(config.kwargs), second_group=kl(config.second_group))


#: preconditioner kinds without factors a group may be switched to (see :func:`_with_stateless_kinds`)
STATELESS_KINDS = ("spectral", "sign")


def spectral_blocks_ok(modules: tuple[ModuleDraw, ...], group: dict, experts: bool) -> bool:
    """Whether spectral descent can block every parameter of these modules under ``group``'s settings (2-D
    blocks, 1-D ones on grafting); ``experts``: the stacked experts too (batch_dims=1, group 0's blocking)."""
    from sharded_shampoo import BlockingConfig, SpectralDescent, plan_blocks

    blocking = dict(group["blocking"], precondition_1d=False)
    todo = [(m, p) for m in modules if m.kind != "experts" or experts for p in m.params]
    try:
        for m, p in todo:
            plan_blocks([("p", p.shape)], group["max_preconditioner_dim"], SpectralDescent(),
                        BlockingConfig(**blocking, batch_dims=int(m.kind == "experts")))
    except ValueError:
        return False
    return True


def _with_stateless_kinds(config: ConfigDraw, modules: tuple[ModuleDraw, ...], seed: int) -> ConfigDraw:
    """Some groups run spectral descent (Newton-Schulz or SVD; their 1-D blocks on grafting, so
    ``precondition_1d=False``) where every block can be 2-D, others sign descent (one or l1 scale).

    Drawn from a generator of its own, so every other draw of a seed stays what it was before this one.
    """
    rng = random.Random(f"stateless-kinds-{seed}")

    def switch(group: tuple, members: tuple[ModuleDraw, ...], experts: bool) -> tuple:
        out = dict(group)
        if not out:
            return group
        factor = out["preconditioner"][1]["factor_dtype"]
        u = rng.random()
        if u < 0.2 and spectral_blocks_ok(members, out, experts):
            orth = rng.choice(("newton_schulz", "newton_schulz", "svd"))
            out["preconditioner"] = ("spectral", {"orthogonalization": orth, "factor_dtype": factor,
                                                  "scale_by_dims_fn": rng.choice(("one", "muon"))})
            out["blocking"] = dict(out["blocking"], precondition_1d=False)
        elif u < 0.35:
            out["preconditioner"] = ("sign", {"scale_fn": rng.choice(("one", "l1_norm")), "factor_dtype": factor})
        return tuple(out.items())

    first = tuple(m for m in modules if m.group == 0)
    second = tuple(m for m in modules if m.group == 1)
    return dataclasses.replace(config, kwargs=switch(config.kwargs, first, True),
                               second_group=switch(config.second_group, second, False))


def _with_family_options(config: ConfigDraw, seed: int) -> ConfigDraw:
    """Issue 16's Shampoo-family options on some well-conditioned groups: eigendecomposed Shampoo in place of
    an eigh root-inverse one, the adaptive refresh ``tolerance``, ``trace_scaling_exponent``,
    ``drop_weighting_factor_on_gsquare``, a pseudo-inverse root (with ``epsilon=0``) and ``beta3``.

    Drawn from a generator of its own, so every other draw of a seed stays what it was before this one.
    Eigendecomposed Shampoo and ``beta3`` in any regime (the same map as the root, the same first moment);
    the other options only in ``full_rank`` groups: a pseudo-inverse or a kept eigenbasis of a
    rank-deficient factor is not determined by the math (round-off picks it), and trace scaling or an
    unweighted factor moves a ``large_eps`` group's epsilon relative to its factors.
    """
    rng = random.Random(f"family-options-{seed}")

    def options(group: tuple) -> tuple:
        out = dict(group)
        if not out:
            return group
        kind, kw = out["preconditioner"]
        kw = dict(kw)
        if kind == "root_inverse" and kw["root"] == "eigh" and rng.random() < 0.5:
            kind = "eigendecomposed"
        if out["betas"][0] > 0 and rng.random() < 0.25:
            out["beta3"] = rng.choice((0.5, 0.95))
        out["preconditioner"] = (kind, kw)
        if out["regime"] != "full_rank":
            return tuple(out.items())
        if kind in ("eigendecomposed", "eigen_corrected") and rng.random() < 0.5:
            kw["tolerance"] = rng.choice((0.05, 0.2, 0.5))
        if rng.random() < 0.2:
            kw["trace_scaling_exponent"] = rng.choice((0.25, 0.5, 1.0))
        if rng.random() < 0.15:
            kw["drop_weighting_factor_on_gsquare"] = True
        if kw.get("root") == "eigh" and rng.random() < 0.15:
            kw["pseudo_inverse_rtol"] = rng.choice((0.0, 1e-10))
            out["epsilon"] = 0.0
        out["preconditioner"] = (kind, kw)
        return tuple(out.items())

    first, second = options(config.kwargs), options(config.second_group)
    if dict(first).get("beta3") is not None and second and dict(second)["betas"][0] == 0:
        second = second + (("beta3", None),)      # a group without a first moment must not inherit beta3
    return dataclasses.replace(config, kwargs=first, second_group=second)
