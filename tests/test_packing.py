"""Packed symmetric storage: the layout, lossless round trips, packed == unpacked optimizer runs, exact
planner bytes, and the bounded unpacking workspace."""

from __future__ import annotations

import pytest
import torch

from tests.support.dist_scenarios import owned_state_bytes
from tests.support.numerics import grad_for, max_rel_diff
from sharded_shampoo import (AdaGradGrafting, CoupledNewtonConfig, EigendecomposedKLShampoo, EigendecomposedShampoo,
                             EigenvalueCorrectedShampoo, KLShampoo, QREigenbasisConfig, RootInverseShampoo,
                             ShardedShampoo, pack_symmetric, unpack_symmetric)
from sharded_shampoo.compute import low_precision
from sharded_shampoo.compute.packing import matrix_dim, packed_identity, packed_numel
from sharded_shampoo.compute.workspace import Workspace
from sharded_shampoo.config import WarmStartRootConfig, config_from_dict, config_to_dict

F64 = torch.float64
BF16 = torch.bfloat16


def test_layout_is_the_row_major_upper_triangle():
    """Element (i, j), i <= j, at offset i d - i (i - 1) / 2 + (j - i): the reference implementation's layout."""
    assert pack_symmetric(torch.arange(9.0).view(3, 3)).tolist() == [0, 1, 2, 4, 5, 8]
    d = 7
    A = torch.randn(d, d)
    P = pack_symmetric(A)
    for i in range(d):
        for j in range(i, d):
            assert P[i * d - i * (i - 1) // 2 + (j - i)] == A[i, j]
    assert packed_identity(4, torch.float32, torch.device("cpu")).tolist() == [1, 0, 0, 0, 1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, F64, BF16])
@pytest.mark.parametrize("d", [1, 2, 7, 64, 129])
def test_pack_unpack_round_trip_is_bit_exact(d, dtype):
    g = torch.Generator().manual_seed(d)
    packed = torch.randn(3, 2, packed_numel(d), generator=g).to(dtype)     # any leading dims
    full = unpack_symmetric(packed)
    assert full.shape == (3, 2, d, d)
    assert torch.equal(full, full.mT)                                        # exactly symmetric
    assert torch.equal(pack_symmetric(full), packed)                        # lossless
    out = torch.empty(3, 2, d, d, dtype=dtype)
    assert unpack_symmetric(packed, out=out) is out and torch.equal(out, full)
    # a symmetric matrix survives pack -> unpack; a non-symmetric one becomes its upper triangle mirrored
    A = torch.randn(d, d, generator=g).to(dtype)
    S = A.triu() + A.triu(1).mT
    assert torch.equal(unpack_symmetric(pack_symmetric(S)), S)
    assert torch.equal(unpack_symmetric(pack_symmetric(A)), S)


def test_matrix_dim_rejects_non_triangular_sizes():
    assert [matrix_dim(packed_numel(d)) for d in (1, 2, 5, 1024)] == [1, 2, 5, 1024]
    with pytest.raises(ValueError, match="not the packed size"):
        matrix_dim(7)


def test_symmetric_packing_option_is_validated_and_serialised():
    with pytest.raises(ValueError, match=r"RootInverseShampoo\.symmetric_packing must be True"):
        RootInverseShampoo(symmetric_packing="yes")
    with pytest.raises(ValueError, match=r"EigenvalueCorrectedShampoo\.symmetric_packing"):
        EigenvalueCorrectedShampoo(symmetric_packing=1)
    # the default is left out of the dict (old checkpoints' config dicts and fingerprints stay the same)
    assert "symmetric_packing" not in config_to_dict(RootInverseShampoo())
    off = RootInverseShampoo(symmetric_packing=False)
    assert config_to_dict(off)["symmetric_packing"] is False
    assert config_from_dict(config_to_dict(off)) == off != RootInverseShampoo()


# ----------------------------------------------------------------------------- packed == unpacked


def _run(pre, steps: int = 14, shapes=((12, 10), (9,), (3, 4, 5)), dtype=F64, skip: bool = False):
    """A well-conditioned run: the first root comes after the factors are full rank (step 12 >= 12 = max d)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    opt = ShardedShampoo([(f"p{i}", p) for i, p in enumerate(params)], lr=0.01, betas=(0.9, 0.99), epsilon=1e-8,
                         precondition_frequency=3, start_preconditioning_step=12, max_preconditioner_dim=16,
                         grafting=AdaGradGrafting(1e-8), preconditioner=pre)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = None if skip and (t + i) % 4 == 3 else grad_for(p, i, t)
        opt.step()
    return params, opt


CONFIGS = {
    "eigh": dict(),
    "newton": dict(root=CoupledNewtonConfig(tolerance=1e-12, max_iterations=300)),
    "warm": dict(root=WarmStartRootConfig(tolerance=1e-6)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("skip", [False, True])
def test_root_inverse_packed_equals_unpacked(name, skip):
    packed, opt = _run(RootInverseShampoo(factor_dtype=F64, **CONFIGS[name]), skip=skip)
    full, _ = _run(RootInverseShampoo(factor_dtype=F64, symmetric_packing=False, **CONFIGS[name]), skip=skip)
    for a, b in zip(packed, full):
        assert max_rel_diff(a, b) < 1e-10
    state = opt.state[packed[0]]["block_0"]
    assert state["factor_0"].shape == state["root_0"].shape == (packed_numel(12),)


@pytest.mark.parametrize("basis", [None, QREigenbasisConfig()])
def test_eigenvalue_corrected_packed_equals_unpacked(basis):
    kw = {} if basis is None else {"eigenbasis": basis}
    packed, opt = _run(EigenvalueCorrectedShampoo(factor_dtype=F64, **kw), skip=True)
    full, _ = _run(EigenvalueCorrectedShampoo(factor_dtype=F64, symmetric_packing=False, **kw), skip=True)
    for a, b in zip(packed, full):
        assert max_rel_diff(a, b) < 1e-10
    state = opt.state[packed[0]]["block_0"]
    assert state["factor_0"].shape == (packed_numel(12),) and state["eigenbasis_0"].shape == (12, 12)


def test_float32_packed_close_to_unpacked():
    """fp32: the packed root is the symmetrised eigh root Q L Q^T (round-off apart): runs agree to fp32 accuracy."""
    packed, _ = _run(RootInverseShampoo(), dtype=torch.float32)
    full, _ = _run(RootInverseShampoo(symmetric_packing=False), dtype=torch.float32)
    for a, b in zip(packed, full):
        assert max_rel_diff(a, b) < 1e-5


# ----------------------------------------------------------------------------- bytes and workspace


@pytest.mark.parametrize("kind", ["root", "eigen", "kl", "eigendecomposed", "eigendecomposed-kl"])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("storage", [None, BF16])
def test_planned_bytes_equal_allocated(kind, packing, storage):
    cls = {"root": RootInverseShampoo, "eigen": EigenvalueCorrectedShampoo, "kl": KLShampoo,
           "eigendecomposed": EigendecomposedShampoo, "eigendecomposed-kl": EigendecomposedKLShampoo}
    pre = cls[kind](symmetric_packing=packing, factor_storage_dtype=storage, root_storage_dtype=storage)
    params, opt = _run(pre, steps=3, dtype=torch.float32)
    assert opt.plan.ranks[0].optimizer_state_bytes == owned_state_bytes(opt)
    for bucket in opt.runtime.buckets:
        for name, field in bucket.fields.items():
            assert tuple(bucket.state[name].shape[1:]) == field.stored_shape
            assert field.packed == (packing and field.symmetric)
            symmetric = name.startswith("factor_") or (name.startswith("root_") and name != "root_failures")
            assert field.symmetric == symmetric
            if name.startswith("eigenvalues_"):      # eigendecomposed: (d,) per dim in the math dtype, never packed
                assert field.shape == (field.shape[0],) and field.dtype == torch.float32


@pytest.mark.parametrize("storage", [None, BF16])
def test_chunked_unpacking_equals_one_chunk_and_bounds_the_workspace(monkeypatch, storage):
    """Buckets are processed in chunks of at most CHUNK_BYTES of unpacked matrices: same numbers, bounded scratch."""
    shapes = tuple((8, 6) for _ in range(10))         # one bucket of 10 blocks; 8x8 fp64 = 512 B per matrix
    pre = RootInverseShampoo(factor_dtype=F64, factor_storage_dtype=storage, root_storage_dtype=storage)
    one, _ = _run(pre, shapes=shapes)
    monkeypatch.setattr(low_precision, "CHUNK_BYTES", 3 * 8 * 8 * 8)   # three blocks of one 8 x 8 fp64 matrix
    # the scratch is freed at the end of every step: record its largest size just before
    largest: dict[str, int] = {}
    release = Workspace.release

    def recording_release(ws: Workspace, indices: bool = False) -> None:
        for name in ("matrices", "second"):
            size = ws.buffer(name, 0, storage or F64).untyped_storage().nbytes()
            largest[name] = max(largest.get(name, 0), size)
        release(ws, indices)

    monkeypatch.setattr(Workspace, "release", recording_release)
    chunked, opt = _run(pre, shapes=shapes)
    # bf16 GEMMs (operands in the storage dtype) round a little differently by batch size
    for a, b in zip(one, chunked):
        assert max_rel_diff(a, b) < (1e-12 if storage is None else 1e-9)
    for name in ("matrices", "second"):
        assert largest[name] <= 3 * 8 * 8 * 8, name
    # unpacked matrices of several blocks (an 8 x 8 matrix is 128 B in bf16, 512 B in fp64), within the budget
    assert largest["matrices"] >= 2 * 8 * 8 * (2 if storage else 8)
    # and nothing of it stays between steps
    assert opt.runtime.workspace.nbytes() == opt.plan.ranks[0].resident_buffer_bytes - 8 * len(opt.runtime.blocks)


def test_workspace_is_shared_by_the_buckets_of_a_rank():
    _, opt = _run(RootInverseShampoo())
    assert len(opt.runtime.buckets) > 1
    assert len({id(b.workspace) for b in opt.runtime.buckets}) == 1
