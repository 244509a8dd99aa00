"""scripts/train.py --save-every / --resume end to end: saved by 2 processes, resumed by 1."""

from __future__ import annotations

import os

import pytest

from tests.support import ckpt_scenarios as cs
from tests.support.dist_utils import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _train(*argv: str) -> list[float]:
    from scripts import train

    return train.train(train.parse_args(cs.TRAIN_ARGS + list(argv)))


def test_train_saved_with_two_processes_resumes_with_one(tmp_path, one_thread) -> None:
    two_dir, one_dir = str(tmp_path / "two"), str(tmp_path / "one")
    two = run_ranks(2, cs.scenario_train, ["--steps", "6", "--save-every", "2", "--async-save",
                                           "--checkpoint-dir", two_dir])
    assert sorted(os.listdir(two_dir)) == ["latest", "step_2", "step_4", "step_6"]
    assert open(os.path.join(two_dir, "latest")).read().strip() == "step_6"
    assert two[0] == two[1] and len(two[0]) == 6
    # saved by 2 processes at step 4, resumed by 1: the same trajectory up to the rounding of
    # FSDP's gradient reduction (a world-size effect, not a checkpoint one)
    resumed = _train("--steps", "6", "--resume", os.path.join(two_dir, "step_4"))
    assert len(resumed) == 2 and _rel(resumed, two[0][4:]) < 5e-3, (resumed, two[0][4:])
    assert len(_train("--steps", "7", "--resume", two_dir)) == 1          # the root follows 'latest'
    # same number of processes: a resumed run is bitwise the uninterrupted one
    full = _train("--steps", "6", "--save-every", "3", "--checkpoint-dir", one_dir)
    assert _train("--steps", "6", "--resume", one_dir + "/step_3") == full[3:]
    with pytest.raises(ValueError, match="other data settings"):
        _train("--steps", "6", "--seed", "1", "--resume", one_dir)


def test_train_checkpoint_flags_are_validated() -> None:
    from scripts import train

    for argv in (["--save-every", "-1"], ["--keep-last", "0"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
    args = train.parse_args([])
    assert (args.save_every, args.checkpoint_dir, args.resume, args.async_save) == (0, "checkpoints", None, False)
