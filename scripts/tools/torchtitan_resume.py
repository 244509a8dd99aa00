"""Losses of torchtitan's Llama3 debug model with ShardedShampoo, saved on one layout and resumed on another.

    python -m scripts.tools.torchtitan_resume          # needs the [torchtitan] extra; 4 CPU gloo ranks

Two scenarios of tests/test_torchtitan_dist.py (2 steps, save through torchtitan's CheckpointManager,
2 more steps; a fresh model and optimizer on the other layout load and run the same 2 steps):

* FSDP 4 -> HSDP 2 x 2 (``test_fsdp_llama3_shampoo_trains_and_resumes_on_hsdp``), once more resuming
  without the optimizer state for comparison;
* Llama3 shrunk to 2 layers, pipeline parallel pp=2 x fsdp=2 (torchtitan's pipelining, GPipe) ->
  pp=1 x fsdp=4 and -> the same layout (``test_pipeline_llama3_resumes_*``).

Prints the Markdown tables shown in docs/parallelism.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from tests.support import titan_harness as th
from tests.support import titan_scenarios
from tests.support.titan_ranks import TitanRanks

Row = tuple[str, list[Optional[float]]]


def _run(runner: TitanRanks, first: tuple, second: tuple, optimizers: str, load_optimizer: bool = True) -> Any:
    with tempfile.TemporaryDirectory() as d:
        return runner.run(4, titan_scenarios.train_save_resume, str(Path(d) / "ckpt"), first, second, optimizers, 2,
                          load_optimizer)[0]


def _print_table(rows: list[Row]) -> None:
    print("| step | 1 | 2 | 3 | 4 |\n|---|---|---|---|---|")
    for label, losses in rows:
        print(f"| {label} | " + " | ".join("" if x is None else f"{x:.4f}" for x in losses) + " |")
    print()


def main() -> None:
    runner = TitanRanks()
    hsdp: list[Row] = []
    pipeline: list[Row] = []
    try:
        for label, load_optimizer in (("resumed after step 2", True), ("resumed without the optimizer state", False)):
            res = _run(runner, ("llama3", th.Layout()), ("llama3", th.Layout(dp_replicate=2, dp_shard=2)), "shampoo",
                       load_optimizer)
            if not hsdp:
                hsdp.append(("FSDP 4, uninterrupted", res["losses"]))
            hsdp.append((f"HSDP 2 x 2, {label}", [None, None] + res["resumed_losses"]))
        pp = ("llama3-2layers", th.Layout(pp=2, dp_shard=2))
        for label, second in (("pp=2 x fsdp=2", pp), ("pp=1 x fsdp=4", ("llama3-2layers", th.Layout()))):
            res = _run(runner, pp, second, "shampoo+adamw")
            if not pipeline:
                pipeline.append(("pp=2 x fsdp=2, uninterrupted", res["losses"]))
            pipeline.append((f"{label}, resumed after step 2", [None, None] + res["resumed_losses"]))
    finally:
        runner.close()
    _print_table(hsdp)
    _print_table(pipeline)


if __name__ == "__main__":
    main()
