"""Print the DTensor placements torchtitan 0.3.0 gives every parameter, as Markdown tables.

    python -m scripts.tools.torchtitan_placements            # needs the [torchtitan] extra; 4 CPU gloo ranks

Builds torchtitan's Llama3 debug model and the (shrunk) qwen3 MoE debug model with torchtitan's own
parallelize functions on 4 CPU ranks, one table per layout, parameters of all layers folded into
one row per kind ("layers.*"; the build fails if two layers of a kind differ), with the box of the
global tensor each rank holds (checked against the parameter's values). The output is the table
in docs/parallelism.md; tests/test_torchtitan_dist.py asserts the FSDP x TP and EP rows.
"""

from __future__ import annotations

from typing import Any

from tests.support import titan_harness as th
from tests.support.titan_ranks import TitanRanks
from tests.support.titan_scenarios import mesh_report

LAYOUTS = (
    ("Llama3 debug, FSDP 4", "llama3", th.Layout()),
    ("Llama3 debug, FSDP 2 x TP 2", "llama3", th.Layout(tp=2)),
    ("Llama3 debug, HSDP 2 x 2", "llama3", th.Layout(dp_replicate=2, dp_shard=2)),
    ("qwen3 MoE (shrunk), FSDP 4, EP 2", "moe", th.Layout(ep=2)),
    ("qwen3 MoE (shrunk), FSDP 2 x TP 2, EP 2", "moe", th.Layout(tp=2, ep=2)),
)


def report(rank: int, world: int, model: str, layout: th.Layout) -> dict[str, Any]:
    return mesh_report(th.build({"llama3": th.llama3_spec, "moe": th.moe_spec}[model](), layout))


def main() -> None:
    runner = TitanRanks()
    try:
        for title, model, layout in LAYOUTS:
            results = runner.run(4, report, model, layout)
            first = results[0]
            assert all(r["kinds"] == first["kinds"] and r["mesh_ranks"] == first["mesh_ranks"] for r in results)
            print(f"\n#### {title}\n")
            print("| parameter | global shape | mesh (dim=size) | mesh ranks | placements | local shape "
                  "| region held by rank 0 / 1 / 2 / 3 |")
            print("|---|---|---|---|---|---|---|")
            for kind, (shape, mesh, placements, local) in results[0]["kinds"].items():
                held = " / ".join(r["regions"][kind] for r in results)
                print(f"| `{kind}` | {shape} | {mesh} | {results[0]['mesh_ranks'][kind]} | `{placements}` | {local} "
                      f"| {held} |")
    finally:
        runner.close()


if __name__ == "__main__":
    main()
