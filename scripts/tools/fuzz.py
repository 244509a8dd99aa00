"""Randomized multi-rank fuzzing of ShardedShampoo on CPU/gloo ranks (see docs/testing.md).

    python -m scripts.tools.fuzz --seeds 300            # seeds 0..299
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = args.seed or list(range(args.start, args.start + args.seeds))
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
