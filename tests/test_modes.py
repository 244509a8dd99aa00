"""Modes are Enums validated in one place each; the API keeps accepting their strings."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import ElementwiseMode, NonFinitePolicy, ShardedShampoo
from sharded_shampoo.checkpointing import CheckpointArgumentError, HyperparameterSource, TrainState
from sharded_shampoo.compute.preconditioner import BucketHyperparams
from sharded_shampoo.runtime.placements import LOCAL_MESH, MeshKeyword


@pytest.mark.parametrize("enum, strings", [(ElementwiseMode, ("eager", "compile")),
                                           (NonFinitePolicy, ("raise", "skip", "ignore")),
                                           (HyperparameterSource, ("checkpoint", "current")),
                                           (MeshKeyword, ("local",))])
def test_each_string_parses_to_its_member_and_members_equal_their_strings(enum, strings) -> None:
    assert tuple(m.value for m in enum) == strings
    for s in strings:
        member = enum.parse(s)
        assert member is enum(s) and member == s and enum.parse(member) is member


@pytest.mark.parametrize("parse, bad, match", [
    (ElementwiseMode.parse, "fast", r"ShardedShampoo.elementwise must be one of \('eager', 'compile'\)"),
    (NonFinitePolicy.parse, "warn", r"nonfinite_grads must be one of \['raise', 'skip', 'ignore'\]"),
    (MeshKeyword.parse, "global", r"mesh must be None, 'local' or a DeviceMesh; got 'global'"),
])
def test_bad_strings_name_the_parameter_and_the_choices(parse, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse(bad)


def test_mesh_keyword_leaves_meshes_and_none_alone() -> None:
    assert MeshKeyword.parse(None) is None and MeshKeyword.parse(object()) is None
    assert LOCAL_MESH is MeshKeyword.LOCAL and f"{LOCAL_MESH.value!r}" == "'local'"


def test_train_state_stores_the_source_and_rejects_others() -> None:
    model = torch.nn.Linear(2, 2)
    opt = ShardedShampoo(model.parameters())
    assert TrainState(model, opt).hyperparameters is HyperparameterSource.CHECKPOINT
    assert TrainState(model, opt, hyperparameters="current").hyperparameters is HyperparameterSource.CURRENT
    assert TrainState(model, opt, hyperparameters=HyperparameterSource.CURRENT).hyperparameters == "current"
    with pytest.raises(CheckpointArgumentError, match=r"hyperparameters must be one of \('checkpoint', 'current'\); "
                                                      r"got 'latest'"):
        TrainState(model, opt, hyperparameters="latest")


def test_bucket_math_reads_the_enum_and_the_string_and_enum_steps_agree() -> None:
    hp = BucketHyperparams(0.9, 0.999, 1e-12, True)
    assert hp.elementwise is ElementwiseMode.EAGER
    results = []
    for mode in ("eager", ElementwiseMode.EAGER):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, 4))
        opt = ShardedShampoo([p], lr=0.1, precondition_frequency=1, elementwise=mode)
        for _ in range(3):
            p.grad = torch.randn(6, 4)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    with pytest.raises(ValueError, match="elementwise must be one of"):
        ShardedShampoo([torch.nn.Parameter(torch.ones(2))], elementwise="fast")
