"""Randomized multi-rank fuzzing of ShardedShampoo on CPU/gloo ranks (see docs/testing.md).

    python -m scripts.tools.fuzz --seeds 300            # seeds 0..299
    python -m scripts.tools.fuzz --storage --seeds 300  # checkpoint storage: damages, crafted pickles, races
    python -m scripts.tools.fuzz --seed 17              # one case (the reproduction command a failure prints)
    python -m scripts.tools.fuzz --seeds 50 --start 1000 --worlds 4

Each seed fully determines its case (model, layout, config, NaN/Inf injection, save/load points);
the run prints a summary (cases, layouts, configs, regimes, events, largest differences,
failures) and, for every failure, the seed, what failed and a one-line reproduction command.
Exit status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys

from tests.support.fuzz_cases import draw
from tests.support.fuzz_runner import reproduce, run_cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="number of seeds (from --start)")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, action="append", help="run exactly this seed (repeatable)")
    ap.add_argument("--worlds", type=str, default=None,
                    help="launch sequence, e.g. '4' or '2,3,4' (default: the fewest launches the cases need)")
    ap.add_argument("--timeout", type=float, default=60.0, help="process-group timeout of each launch, seconds")
    ap.add_argument("--batch", type=int, default=500, help="cases per batch of launches (one summary each)")
    ap.add_argument("--chaotic", action="store_true",
                    help="measure (not assert) the difference to the 1-process run outside the well-conditioned "
                         "regime: epsilon 1e-12, preconditioning from step 1, fp64 factors with fp32 communication")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--storage", action="store_true",
                    help="fuzz checkpoint storage instead: one damaged or crafted checkpoint per seed (must fail "
                         "cleanly, change nothing, run no code) and as many rounds of two processes saving the "
                         "same step into one directory")
    return ap.parse_args(argv)


def storage_main(seeds: list[int]) -> int:
    """``--storage``: the damage cases of ``seeds``, then ``len(seeds)`` race rounds drawn from the first seed."""
    from tests.support.fuzz_storage import draw_damage, run_damages, run_race, summary

    failures = run_damages(seeds)
    print(summary(seeds, failures), flush=True)
    for seed, problems in sorted(failures.items()):
        print(f"FAIL {draw_damage(seed).summary()}")
        for p in problems:
            print(f"    {p}")
        print(f"    reproduce: python -m scripts.tools.fuzz --storage --seed {seed}")
    race_failures, counts = run_race(seeds[0], len(seeds))
    print("race: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; failures: {len(race_failures)}")
    for k, problems in sorted(race_failures.items()):
        print(f"FAIL race round {k} of seed {seeds[0]}: " + "; ".join(problems))
        print(f"    reproduce: python -m scripts.tools.fuzz --storage --start {seeds[0]} --seeds {len(seeds)}")
    print(f"total: {len(seeds)} storage cases, {counts['rounds']} race rounds, "
          f"{len(failures) + len(race_failures)} failed")
    return 1 if failures or race_failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = args.seed or list(range(args.start, args.start + args.seeds))
    if args.storage:
        return storage_main(seeds)
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else None
    if args.list:
        for s in seeds:
            print(draw(s, args.chaotic).summary())
        return 0
    failed = 0
    for i in range(0, len(seeds), args.batch):
        chunk = seeds[i:i + args.batch]
        report = run_cases(chunk, worlds, args.timeout, progress=True, chaotic=args.chaotic)
        print(report.summary(), flush=True)
        for seed, problems in sorted(report.failures.items()):
            failed += 1
            print(f"FAIL {draw(seed, args.chaotic).summary()}")
            for p in problems:
                print(f"    {p}")
            print(f"    reproduce: {reproduce(seed, worlds, args.chaotic)}")
    print(f"total: {len(seeds)} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
