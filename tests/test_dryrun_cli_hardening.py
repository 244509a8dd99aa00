"""Regression tests of issue 18 (hardening, round 2) on ``sharded-shampoo plan``: items 10-13.

* 10: a tensor-parallel degree that does not divide a dim names the degree and the dim;
* 11, 12 (+ siblings): every output path is checked before planning, naming the flag and the
  cause (an unwritable place, a parent that is a file, an empty name, a directory name, the same
  file twice); a failed write at the end names the flag too; a check never truncates or leaves a file;
* 13: every option has one line of help with its default; ``--comm-dtype`` lists every dtype it accepts.
"""

from __future__ import annotations

import os
import re

import time

import pytest
import torch
import torch.distributed as dist

from sharded_shampoo.config import COMM_DTYPES
from sharded_shampoo.dryrun import cli
from sharded_shampoo.dryrun.cli import main

BIG = ["plan", "--model", "llama3-405b", "--mesh", "32x64"]   # minutes of planning if the check came late
FAST = 5.0


@pytest.fixture(autouse=True)
def no_leaked_process_group():
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized(), "the dry-run must destroy its fake process group"


def _fails_fast(argv: list[str], capsys) -> str:
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < FAST, "outputs must be checked before planning"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    return err


# ----------------------------------------------------------------------------- item 10


def test_tp_degree_that_does_not_divide_a_dim_is_named(capsys):
    assert main(["plan", "--model", "llama-tiny", "--mesh", "4", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "tp=3 does not divide" in err and "size 1000" in err and "tok_embeddings.weight" in err, err
    assert "other order" not in err
    assert "tp degree that divides 1000" in err


def test_tp_message_on_an_unnamed_mesh():
    """The layout error names the mesh dim by position when the mesh has no dim names."""
    from torch.distributed.tensor import Shard
    from sharded_shampoo._torch_compat import StridedShard

    from sharded_shampoo.planning.layout import Layout, MeshSpec, ParamSpec, SubMesh, param_geometry

    mesh = MeshSpec((3, 2))
    layout = Layout(SubMesh.root(mesh), (StridedShard(0, split_factor=2), Shard(0)))
    with pytest.raises(ValueError, match=r"parameter 'w'.*dim 0 has size 13, which mesh dim 1 \(size 2\) does not "
                                         r"divide.*a degree that divides 13"):
        param_geometry(ParamSpec("w", (13, 4), layout=layout), mesh)
    # divisible: supported; rank 5 (fsdp 2, tp 1) holds the last FSDP chunk of the second TP half
    assert param_geometry(ParamSpec("w", (12, 4), layout=layout), mesh).held(5) == ((10, 12), (0, 4))


# ----------------------------------------------------------------------------- items 11, 12 and siblings


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_unwritable_place_fails_before_planning_naming_the_flag(option, capsys):
    err = _fails_fast(BIG + [option, f"/proc/x{option[2:]}"], capsys)
    assert f"{option} '/proc/x" in err and "cannot be written" in err


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_parent_that_is_a_file_is_named(option, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = _fails_fast(BIG + [option, str(blocker / "sub" / "out.x")], capsys)
    assert f"{option} " in err and f"{str(blocker)!r} is a file, not a directory" in err
    assert "does not exist" not in err


def test_etc_passwd_parent(capsys):
    if not os.path.isfile("/etc/passwd"):
        pytest.skip("no /etc/passwd here")
    err = _fails_fast(BIG + ["--json", "/etc/passwd/x.json"], capsys)
    assert "'/etc/passwd' is a file, not a directory" in err


@pytest.mark.parametrize("path,message", [("", "empty file name"), ("newdir/", "directory name")])
def test_empty_and_directory_names(path, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _fails_fast(BIG + ["--json", path], capsys)
    assert "--json" in err and message in err


def test_same_file_for_json_and_png(tmp_path, capsys):
    out = str(tmp_path / "plan.out")
    err = _fails_fast(BIG + ["--json", out, "--png", os.path.join(str(tmp_path), ".", "plan.out")], capsys)
    assert "--json and --png" in err and "same file" in err


def test_check_neither_truncates_nor_leaves_files(tmp_path, capsys):
    existing = tmp_path / "keep.json"
    existing.write_text("previous plan")
    new = tmp_path / "new.png"
    assert main(["plan", "--model", "no_such_preset_q", "--mesh", "2", "--json", str(existing),
                 "--png", str(new)]) == 2
    assert "no_such_preset_q" in capsys.readouterr().err
    assert existing.read_text() == "previous plan" and not new.exists()


def test_write_failure_at_the_end_names_the_flag(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    real = cli.plan_model

    def plan_then_remove_folder(*args, **kwargs):
        plan = real(*args, **kwargs)
        folder.rmdir()       # the directory disappears while the plan is computed
        return plan

    monkeypatch.setattr(cli, "plan_model", plan_then_remove_folder)
    assert main(["plan", "--model", "llama-tiny", "--mesh", "2", "--json", str(folder / "p.json")]) == 2
    err = capsys.readouterr().err
    assert f"--json {str(folder / 'p.json')!r}" in err and "No such file or directory" in err


# ----------------------------------------------------------------------------- item 13


def _help_entries(capsys) -> dict[str, str]:
    """``plan --help``: option -> its help text (argparse may wrap it over several lines)."""
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    entries: dict[str, str] = {}
    current = None
    for line in options.splitlines()[1:]:
        m = re.match(r"^  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = line
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


def test_every_option_has_help_and_its_default(capsys):
    entries = _help_entries(capsys)
    assert len(entries) >= 20, sorted(entries)
    for option, text in entries.items():
        if option == "-h":
            continue
        assert "default" in text, f"{option} has no default in its help: {text!r}"
    for option in ("--max-preconditioner-dim", "--precondition-frequency", "--preconditioner", "--grafting",
                   "--beta1", "--momentum"):
        assert option in entries and len(entries[option].split()) > 4, entries.get(option)
    assert "default: 1024" in entries["--max-preconditioner-dim"]
    assert "default: 100" in entries["--precondition-frequency"]
    assert "default: 0.9" in entries["--beta1"] and "default: 0.0" in entries["--momentum"]


def test_comm_dtype_help_lists_every_accepted_dtype(capsys):
    listed = re.findall(r"\bfp\d+|\bbf16", _help_entries(capsys)["--comm-dtype"].split("default")[0])
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    assert sorted(listed) == sorted(short[d] for d in COMM_DTYPES)
    for name in listed:
        assert main(["plan", "--model", "llama-tiny", "--mesh", "1", "--comm-dtype", name]) == 0, name
    capsys.readouterr()
    assert main(["plan", "--model", "llama-tiny", "--mesh", "1", "--comm-dtype", "int8"]) == 2
    assert "--comm-dtype" in capsys.readouterr().err


def test_param_dtype_help_lists_every_accepted_dtype(capsys):
    text = _help_entries(capsys)["--param-dtype"]
    assert all(name in text for name in ("fp32", "bf16", "fp16", "fp64")), text

