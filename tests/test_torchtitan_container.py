"""ShardedShampooContainer on one process: config resolution, numbers, torchtitan's flat state dict.

Skipped without torchtitan (``pip install -c constraints.txt -e ".[test,torchtitan]"``). The
multi-rank tests on torchtitan's own models are in test_torchtitan_dist.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig

from sharded_shampoo import AdamGrafting, BlockingConfig, ShardedShampoo
from sharded_shampoo.integrations.torchtitan import (SHAMPOO_NAME, ShardedShampooContainer,
                                                     default_sharded_shampoo)

KW = dict(lr=0.05, betas=(0.9, 0.95), epsilon=1e-10, weight_decay=0.01, max_preconditioner_dim=8,
          precondition_frequency=2, start_preconditioning_step=1, grafting=AdamGrafting(beta2=0.95, epsilon=1e-8))


class Block(nn.Module):
    def __init__(self, with_experts: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(12, 6)
        self.wo = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        if with_experts:
            self.moe = nn.Module()
            self.moe.experts = nn.Module()
            self.moe.experts.w1 = nn.Parameter(torch.randn(3, 6, 10))


def _model(seed: int = 0, with_experts: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return Block(with_experts)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (4, 5), generator=g)
    h = model.norm(model.wo(model.tok_embeddings(x)))
    if hasattr(model, "moe"):
        h = h + torch.einsum("bsd,edh->bsh", model.tok_embeddings(x), model.moe.experts.w1)
    return (h ** 2).mean()


def _steps(model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for s in seeds:
        opt.zero_grad()
        _loss(model, s).backward()
        opt.step()


def _config(implementation: str = "fused", **kwargs: object) -> ShardedShampooContainer.Config:
    return ShardedShampooContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=SHAMPOO_NAME, optimizer_kwargs=dict(KW))],
        implementation=implementation, **kwargs)


def test_container_step_equals_a_bare_sharded_shampoo() -> None:
    """torchtitan's fused/foreach keys are dropped and nothing else is lost: identical parameters."""
    a, b = _model(), _model()
    container = _config("fused").build(model_parts=[a])
    (shampoo,) = container.optimizers
    assert isinstance(shampoo, ShardedShampoo)
    assert not {"fused", "foreach"} & set(shampoo.param_groups[0])
    bare = ShardedShampoo(b.named_parameters(), **KW)
    _steps(a, container, range(3))
    _steps(b, bare, range(3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert shampoo.param_groups[0]["step"] == 3
    assert shampoo.plan.blocks and [blk.param_name for blk in shampoo.plan.blocks] == \
        [blk.param_name for blk in bare.plan.blocks]


def test_one_sharded_shampoo_over_all_model_parts_beside_adamw() -> None:
    """PP-style model parts share ONE ShardedShampoo; other names are built as torchtitan does."""
    part0, part1 = _model(0), _model(1)
    part1 = nn.ModuleDict({"stage1": part1})  # distinct FQNs, as torchtitan's pipeline split keeps them
    config = ShardedShampooContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r"tok_embeddings", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 1e-3, "eps": 1e-8}),
                      ParamGroupConfig(pattern=r".*", optimizer_name=SHAMPOO_NAME, optimizer_kwargs=dict(KW))],
        implementation="for-loop",
        optimizer_factory_kwargs_by_name={SHAMPOO_NAME: {"nonfinite_grads": "skip"}})
    container = config.build(model_parts=[part0, part1])
    kinds = [type(o).__name__ for o in container.optimizers]
    assert kinds == ["AdamW", "AdamW", "ShardedShampoo"]
    shampoo = container.optimizers[-1]
    names = [n for g in shampoo.param_groups for n in g["param_names"]]
    assert names == ["wo.weight", "wo.bias", "norm.weight", "norm.bias", "stage1.wo.weight", "stage1.wo.bias",
                     "stage1.norm.weight", "stage1.norm.bias"]
    assert len(shampoo.param_groups) == 2  # one per model part, same hyperparameters
    assert shampoo.nonfinite_grads == "skip"


def test_unknown_group_key_names_the_pattern_and_key() -> None:
    config = ShardedShampooContainer.Config(param_groups=[ParamGroupConfig(
        pattern=r"wo", optimizer_name=SHAMPOO_NAME, optimizer_kwargs={"lr": 0.1, "eps": 1e-8})])
    with pytest.raises(ValueError, match=r"pattern 'wo': ShardedShampoo has no per-group option 'eps'"):
        config.build(model_parts=[_model()])


def test_other_names_still_fail_as_in_torchtitan() -> None:
    config = ShardedShampooContainer.Config(param_groups=[ParamGroupConfig(
        pattern=r".*", optimizer_name="Shampoo", optimizer_kwargs={"lr": 0.1})])
    with pytest.raises(NotImplementedError, match="Optimizer Shampoo not added"):
        config.build(model_parts=[_model()])


def test_expert_weights_get_their_own_group() -> None:
    model = _model(with_experts=True)
    config, blocking = _config(), BlockingConfig(merge_dims=False)
    config.param_groups[0].optimizer_kwargs["blocking"] = blocking
    (shampoo,) = config.build(model_parts=[model]).optimizers
    assert [g["param_names"] for g in shampoo.param_groups] == [
        ["tok_embeddings.weight", "wo.weight", "wo.bias", "norm.weight", "norm.bias"], ["moe.experts.w1"]]
    assert shampoo.param_groups[1]["blocking"] == BlockingConfig(merge_dims=False, batch_dims=1)
    assert shampoo.param_groups[0]["blocking"] == blocking  # the dense group keeps the configured one
    assert shampoo.param_groups[1]["lr"] == KW["lr"]
    # each expert is preconditioned on its own: blocks of one expert's matrix, never of the 3-D tensor
    expert_blocks = [b for b in shampoo.plan.blocks if b.param_name == "moe.experts.w1"]
    w1 = dict(model.named_parameters())["moe.experts.w1"]
    assert len(expert_blocks) >= w1.shape[0] and all(b.box[0][1] - b.box[0][0] == 1 for b in expert_blocks)
    # opting out: the expert tensor stays in the dense group as one 3-D tensor
    (shampoo,) = _config(expert_module_pattern=None).build(model_parts=[model]).optimizers
    assert len(shampoo.param_groups) == 1 and "moe.experts.w1" in shampoo.param_groups[0]["param_names"]

def test_torchtitan_flat_state_dict_round_trip() -> None:
    """The container's flat FQN-keyed state (what torchtitan's CheckpointManager saves) restores exactly."""
    a = _model()
    container = _config().build(model_parts=[a])
    _steps(a, container, range(3))
    flat = copy.deepcopy(container.state_dict())
    # keys are state.{fqn}.{block}.{key}: wo.weight (10 x 6, max dim 8) has two row blocks
    blocks = {k.split(".")[3] for k in flat if k.startswith("state.wo.weight.")}
    assert blocks == {"block_0", "block_1"}
    assert all(isinstance(v, torch.Tensor) for k, v in flat.items() if k.startswith("state."))
    assert flat["param_groups.wo.weight.step"] == 3 and flat["param_groups.wo.weight.lr"] == KW["lr"]
    reference = copy.deepcopy(a)
    ref_container = _config().build(model_parts=[reference])
    ref_container.load_state_dict(copy.deepcopy(flat))
    b = _model(seed=7)  # other weights, then the saved ones: as a resumed run
    b.load_state_dict(a.state_dict())
    resumed = _config().build(model_parts=[b])
    resumed.load_state_dict(flat)
    assert resumed.optimizers[0].param_groups[0]["step"] == 3
    _steps(a, container, range(3, 5))
    _steps(b, resumed, range(3, 5))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_state_dict_on_a_fresh_container_changes_nothing() -> None:
    """torchtitan's init_optim_state (zero-lr step before save/load) leaves parameters and steps alone."""
    a = _model()
    before = copy.deepcopy(a.state_dict())
    container = _config().build(model_parts=[a])
    flat = container.state_dict()
    assert flat["param_groups.wo.weight.step"] == 0
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torchtitan_lr_scheduler_drives_the_shampoo_groups() -> None:
    a = _model()
    container = default_sharded_shampoo(**KW).build(model_parts=[a])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=None).build(optimizers=container,
                                                                                     training_steps=4)
    lrs = []
    for s in range(4):
        lrs.append(container.optimizers[0].param_groups[0]["lr"])
        _steps(a, container, range(s, s + 1))
        schedulers.step()
    # torchtitan's schedule for 4 steps: warmup 1/2, 2/2; one stable step (its "+1 virtual step");
    # linear decay over the remaining 2 steps: 1 - 1/2
    assert lrs == pytest.approx([KW["lr"] * f for f in (0.5, 1.0, 1.0, 0.5)])


# ---------------------------------------------------------------------------------------------
# Pipeline stages: several model parts per rank (interleaved virtual stages), stages without
# ShardedShampoo parameters, stages without trainable parameters.

class Net(nn.Module):
    """Embedding, 2 linears, a norm and a head; a pipeline stage is a copy with the other modules deleted."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(12, 6)
        self.layers = nn.ModuleDict({str(i): nn.Linear(6, 6) for i in range(2)})
        self.norm = nn.LayerNorm(6)
        self.output = nn.Linear(6, 10)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Whatever part of the model this module still holds, in model order."""
        if hasattr(self, "tok_embeddings"):
            h = self.tok_embeddings(h)
        for layer in self.layers.values():
            h = torch.tanh(layer(h))
        if hasattr(self, "norm"):
            h = self.norm(h)
        return self.output(h) if hasattr(self, "output") else h


#: 4 virtual stages, interleaved over 2 pipeline ranks: rank A holds stages 0 and 2, rank B 1 and 3.
#: Stage 0 holds only the embeddings (AdamW: no ShardedShampoo parameter); stage 2 only the norm (1-D).
STAGES = (("tok_embeddings",), ("layers",), ("norm",), ("output",))
RANK_STAGES = {"A": (0, 2), "B": (1, 3)}


def _net() -> Net:
    torch.manual_seed(3)
    return Net()


def _stage(model: Net, keep: tuple[str, ...]) -> Net:
    part = copy.deepcopy(model)
    for name in [n for n, _ in part.named_children() if n not in keep]:
        delattr(part, name)
    if not hasattr(part, "layers"):
        part.layers = nn.ModuleDict()  # an empty container: no parameters
    return part


@pytest.fixture
def both_ranks_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process builds both pipeline ranks' containers; what the all-reduce over them would return.

    The patterns (embeddings, catch-all) each match on one of the two simulated ranks; the real
    all-reduce runs in the 4-rank torchtitan pipeline test (tests/test_torchtitan_dist.py).
    """
    import sharded_shampoo.integrations.torchtitan as integration

    monkeypatch.setattr(integration, "matched_on_any_rank", lambda matched, n: set(range(n)))


def _pp_config() -> ShardedShampooContainer.Config:
    return ShardedShampooContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r"tok_embeddings", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 1e-2, "eps": 1e-8}),
                      ParamGroupConfig(pattern=r".*", optimizer_name=SHAMPOO_NAME, optimizer_kwargs=dict(KW))])


def _pp_steps(parts: list[Net], containers: list[Any], seeds: range) -> None:
    """One process runs the stages in order (as the pipeline does, one microbatch) and steps every container."""
    for s in seeds:
        for c in containers:
            c.zero_grad()
        h = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(s))
        for part in parts:
            h = part(h)
        (h ** 2).mean().backward()
        for c in containers:
            c.step()


def _pipeline(model: Net) -> tuple[list[Net], dict[str, Any]]:
    """The 4 stages of ``model`` and one container per pipeline rank over its 2 interleaved stages."""
    parts = [_stage(model, keep) for keep in STAGES]
    containers = {rank: _pp_config().build(model_parts=[parts[i] for i in stages])
                  for rank, stages in RANK_STAGES.items()}
    return parts, containers


def test_interleaved_stages_equal_one_container_over_the_whole_model(both_ranks_matched: None) -> None:
    """Stage-local containers (2 virtual stages per rank) train exactly like one over the whole model."""
    whole = _net()
    whole_container = _pp_config().build(model_parts=[whole])
    parts, containers = _pipeline(_net())
    kinds = {rank: [type(o).__name__ for o in c.optimizers] for rank, c in containers.items()}
    assert kinds == {"A": ["AdamW", "ShardedShampoo"], "B": ["ShardedShampoo"]}
    # rank A's ShardedShampoo holds only the 1-D norm parameters (stage 0 has no Shampoo parameter)
    assert containers["A"].optimizers[1].param_groups[0]["param_names"] == ["norm.weight", "norm.bias"]
    b_names = [n for g in containers["B"].optimizers[0].param_groups for n in g["param_names"]]
    assert b_names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "output.weight",
                       "output.bias"]
    _pp_steps([whole], [whole_container], range(4))
    _pp_steps(parts, list(containers.values()), range(4))
    staged = {n: p for part in parts for n, p in part.named_parameters()}
    assert staged.keys() == dict(whole.named_parameters()).keys()
    for name, p in whole.named_parameters():
        assert torch.equal(staged[name], p), name
    # the stage-local flat states are the whole model's, key for key: checkpoints move across layouts
    flat = {**containers["A"].state_dict(), **containers["B"].state_dict()}
    whole_flat = whole_container.state_dict()
    state_keys = {k for k in whole_flat if k.startswith("state.")}
    assert state_keys and state_keys == {k for k in flat if k.startswith("state.")}
    for key in state_keys:
        assert torch.equal(flat[key], whole_flat[key]), key


def test_pipeline_stages_resume_from_one_container_and_back(both_ranks_matched: None) -> None:
    """Save the whole-model state, load it into 2 interleaved stage containers (and the reverse); continue equal."""
    whole = _net()
    whole_container = _pp_config().build(model_parts=[whole])
    _pp_steps([whole], [whole_container], range(3))
    saved_params, saved = copy.deepcopy(whole.state_dict()), copy.deepcopy(whole_container.state_dict())
    staged_model = _net()
    staged_model.load_state_dict(saved_params)
    parts, containers = _pipeline(staged_model)
    for c in containers.values():
        c.load_state_dict(copy.deepcopy(saved))  # each rank reads its own stages' keys from the full state
    assert [o.param_groups[0]["step"] for o in containers["B"].optimizers] == [3]
    _pp_steps([whole], [whole_container], range(3, 5))
    _pp_steps(parts, list(containers.values()), range(3, 5))
    staged = {n: p for part in parts for n, p in part.named_parameters()}
    for name, p in whole.named_parameters():
        assert torch.equal(staged[name], p), name
    # back: the stage containers' union loads into one whole-model container
    flat = {**containers["A"].state_dict(), **containers["B"].state_dict()}
    again = _net()
    again.load_state_dict({n: p.detach() for n, p in staged.items()}, strict=False)
    again_container = _pp_config().build(model_parts=[again])
    again_container.load_state_dict(copy.deepcopy(flat))
    _pp_steps([again], [again_container], range(5, 7))
    _pp_steps(parts, list(containers.values()), range(5, 7))
    for name, p in again.named_parameters():
        assert torch.equal(staged[name], p), name


def test_a_stage_without_trainable_parameters_has_no_optimizer(both_ranks_matched: None) -> None:
    """A rank whose stages hold nothing trainable: no optimizer; step, zero_grad and state dicts are no-ops."""
    frozen = _stage(_net(), ("norm",))
    frozen.requires_grad_(False)
    empty = _stage(_net(), ())
    container = _pp_config().build(model_parts=[empty, frozen])
    assert container.optimizers == [] and container.state_dict() == {}
    container.zero_grad()
    container.step()
    container.load_state_dict({})
    before = copy.deepcopy(frozen.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_a_pattern_that_matches_no_part_names_the_pattern() -> None:
    """A pattern may miss one stage, but not every stage of every rank (one process here)."""
    config = ShardedShampooContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"tok_embeddings", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2}),
        ParamGroupConfig(pattern=r"experts", optimizer_name=SHAMPOO_NAME, optimizer_kwargs=dict(KW)),
        ParamGroupConfig(pattern=r".*", optimizer_name=SHAMPOO_NAME, optimizer_kwargs=dict(KW))])
    with pytest.raises(ValueError, match=r"pattern\(s\) \['experts'\] matched no trainable parameter"):
        config.build(model_parts=[_stage(_net(), ("tok_embeddings",)), _stage(_net(), ("layers",))])


def test_parts_with_the_same_parameter_names_are_refused() -> None:
    """Parts renumbered from 0 would share state keys: the error names the parameter and the fix."""
    with pytest.raises(ValueError, match=r"'weight' occurs in two model parts.*as torchtitan's pipeline split"):
        _config().build(model_parts=[nn.Linear(6, 6), nn.Linear(6, 6)])
