"""Losses of torchtitan's Llama3 debug model with ShardedShampoo, saved on FSDP 4 and resumed on HSDP 2 x 2.

    python -m scripts.tools.torchtitan_resume          # needs the [torchtitan] extra; 4 CPU gloo ranks

The scenario of tests/test_torchtitan_dist.py::test_fsdp_llama3_shampoo_trains_and_resumes_on_hsdp
(2 steps, save through torchtitan's CheckpointManager, 2 more steps; a fresh HSDP model and optimizer
load and run the same 2 steps), once more resuming without the optimizer state for comparison.
Prints the Markdown table shown in docs/parallelism.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.support import titan_harness as th
from tests.support import titan_scenarios
from tests.support.titan_ranks import TitanRanks


def main() -> None:
    runner = TitanRanks()
    rows = []
    try:
        for label, load_optimizer in (("resumed after step 2", True), ("resumed without the optimizer state", False)):
            with tempfile.TemporaryDirectory() as d:
                res = runner.run(4, titan_scenarios.train_save_resume, str(Path(d) / "ckpt"), ("llama3", th.Layout()),
                                 ("llama3", th.Layout(dp_replicate=2, dp_shard=2)), "shampoo", 2, load_optimizer)[0]
            if not rows:
                rows.append(("FSDP 4, uninterrupted", res["losses"]))
            rows.append((f"HSDP 2 x 2, {label}", [None, None] + res["resumed_losses"]))
    finally:
        runner.close()
    print("| step | 1 | 2 | 3 | 4 |\n|---|---|---|---|---|")
    for label, losses in rows:
        print(f"| {label} | " + " | ".join("" if x is None else f"{x:.4f}" for x in losses) + " |")


if __name__ == "__main__":
    main()
