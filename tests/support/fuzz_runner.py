"""Randomized multi-rank fuzzing, part 4: schedule cases onto launches, run them, check every claim.

For every case (``fuzz_cases.draw(seed)``) the runner asserts:

(a) every rank's local data of every parameter (shards *and* replicas) after the ``N``-rank run
    equals the same region of the 1-process run fed the same gradients (<= 1e-6 relative);
(b) nothing hangs: every launch runs under a bounded process-group timeout and a deadline, and a
    launch that dies names the seeds it was running;
(c) a NaN/Inf/overflow injected on one rank at one step: ``raise`` -> every rank of the layout
    raises ``NonFiniteGradientError`` and nothing changed; ``skip`` -> every rank skips with state,
    parameters and step counters untouched; then training goes on;
(d) a checkpoint saved at a random step and loaded into another layout (another world size, mesh,
    or one process) continues exactly like the uninterrupted run (<= 1e-6 relative).

Launch order: checkpoints are collective over the whole process group, so a save happens in a
launch of exactly its layout's world and the load in the same or a later launch of the target's
world; single-process saves run in this (parent) process before the launches, single-process
loads after them. Cases without a checkpoint run in the launch of their world size, or inside a
bigger launch on a sub-range of its ranks when there is none.
"""

from __future__ import annotations

import glob
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional


from tests.support.fuzz_cases import LAYOUT_WORLD, TOLERANCE, Case, draw
from tests.support.fuzz_ranks import Job, LaunchPlan, launch, run_job


@dataclass
class Schedule:
    worlds: list[int]                                  # launch sequence
    pre: list[Job] = field(default_factory=list)       # parent process, before the launches
    launches: list[list[Job]] = field(default_factory=list)
    post: list[Job] = field(default_factory=list)      # parent process, after the launches
    unschedulable: list[int] = field(default_factory=list)


def launch_sequence(cases: list[Case]) -> list[int]:
    """The fewest launches (ascending worlds, then re-visits) that serve every case's save -> load order."""
    exact = sorted({w for c in cases if c.checkpoint for w in (c.world, LAYOUT_WORLD[c.checkpoint.load_layout])
                    if w > 1})
    seq = list(exact)
    fit = max((c.world for c in cases if not c.checkpoint), default=1)
    if fit > 1 and not any(w >= fit for w in seq):
        seq = sorted(seq + [fit])
    changed = True
    while changed:
        changed = False
        for c in cases:
            ws, wl = c.world, LAYOUT_WORLD[c.checkpoint.load_layout] if c.checkpoint else 0
            if c.checkpoint and ws > 1 and wl > 1 and wl not in seq[seq.index(ws):]:
                seq.append(wl)
                changed = True
    return seq


def schedule(cases: list[Case], worlds: Optional[list[int]], root: str) -> Schedule:
    seq = launch_sequence(cases) if worlds is None else list(worlds)
    sched = Schedule(seq, launches=[[] for _ in seq])
    next_id = 0

    def job(case: Case, kind: str, layout: str) -> Job:
        nonlocal next_id
        next_id += 1
        return Job(next_id, case.seed, kind, layout, root, case.config.regime == "chaotic")

    for c in cases:
        if c.checkpoint is None:
            exact = [i for i, w in enumerate(seq) if w == c.world]
            fits = [i for i, w in enumerate(seq) if w >= c.world]
            where = exact[0] if exact else (fits[0] if fits else None)
            if where is None and c.world > 1:
                sched.unschedulable.append(c.seed)
                continue
            target = sched.pre if where is None else sched.launches[where]
            target += [job(c, "ref", "single"), job(c, "main", c.layout)]
            continue
        ws, wl = c.world, LAYOUT_WORLD[c.checkpoint.load_layout]
        save_at = -1 if ws == 1 else (seq.index(ws) if ws in seq else None)
        later = [i for i, w in enumerate(seq) if w == wl and save_at is not None and i >= save_at]
        load_at = len(seq) if wl == 1 else (later[0] if later else None)
        if save_at is None or load_at is None:
            sched.unschedulable.append(c.seed)
            continue
        (sched.pre if save_at < 0 else sched.launches[save_at]).extend([job(c, "ref", "single"),
                                                                       job(c, "main", c.layout)])
        (sched.post if load_at == len(seq) else sched.launches[load_at]).append(job(c, "load",
                                                                                     c.checkpoint.load_layout))
    return sched


def pack_rounds(world: int, jobs: list[Job]) -> tuple[tuple[tuple[int, Job], ...], ...]:
    """First-fit packing of jobs onto disjoint rank ranges; loads after every save of the launch."""
    rounds: list[list[tuple[int, Job]]] = []
    for loads in (False, True):
        opened: list[list[tuple[int, Job]]] = []
        free: list[int] = []
        for j in sorted((j for j in jobs if (j.kind == "load") == loads), key=lambda j: (-j.world, j.id)):
            slot = next((k for k, f in enumerate(free) if f >= j.world), None)
            if slot is None:
                opened.append([])
                free.append(world)
                slot = len(opened) - 1
            opened[slot].append((world - free[slot], j))
            free[slot] -= j.world
        rounds += opened
    return tuple(tuple(r) for r in rounds)


# ----------------------------------------------------------------------------- running


def _run_parent(jobs: list[Job], results: dict[tuple[int, int], Any]) -> None:
    """Single-process saves and loads, here (no process group)."""
    for j in jobs:
        try:
            with warnings.catch_warnings():   # DCP notes that it saves in a single process: it is meant to
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                results[(j.id, 0)] = run_job(j, None, 0, 0)
        except Exception:  # noqa: BLE001 - becomes a failure of that seed
            results[(j.id, 0)] = {"error": traceback.format_exc()}


def _run_launch(world: int, jobs: list[Job], timeout_s: float, results: dict[tuple[int, int], Any],
                notes: list[str], relaunches: int = 3) -> None:
    """Run the jobs' rounds on ``world`` ranks; after a failed or hung round, relaunch the rest."""
    rounds = pack_rounds(world, jobs)
    while rounds:
        stopped = _one_launch(world, rounds, timeout_s, results, notes)
        if stopped is None or relaunches == 0:
            return
        rounds, relaunches = rounds[stopped + 1:], relaunches - 1


def _one_launch(world: int, rounds: tuple, timeout_s: float, results: dict[tuple[int, int], Any],
                notes: list[str]) -> Optional[int]:
    """One launch; the index of the round it stopped after (None: it ran every round)."""
    from tests.support.dist_utils import run_ranks

    plan = LaunchPlan(world, rounds, timeout_s)
    by_id = {str(j.id): j for r in rounds for _, j in r}
    stopped: Optional[int] = None
    with tempfile.TemporaryDirectory() as out:
        deadline = 60.0 + 2 * timeout_s + 4.0 * len(by_id)
        try:
            status = run_ranks(world, launch, plan, out, timeout_s=timeout_s, deadline_s=deadline)[0]
            if status != "done":
                stopped = int(status.split()[-1])
                notes.append(f"launch of {world} ranks {status}: a job failed; the rest was relaunched")
        except Exception as err:  # noqa: BLE001 - a deadline (hang) or a rank that died: report, go on
            progress = [open(f).read().split() for f in glob.glob(os.path.join(out, "progress*"))]
            stopped = max((int(r) for r, _ in progress), default=None)
            seeds = sorted({by_id[i].seed for _, i in progress if i in by_id})
            last = ([line for line in str(err).splitlines() if line.strip()] or [repr(err)])[-1]
            notes.append(f"launch of {world} ranks died or hung ({last.strip()[:160]}) in round {stopped}, running "
                         f"seeds {seeds}")
        for f in glob.glob(os.path.join(out, "job*_rank*.pkl")):
            jid, grank = os.path.basename(f)[3:-4].split("_rank")
            with open(f, "rb") as fh:
                results[(int(jid), int(grank))] = pickle.load(fh)
    return stopped


@dataclass
class Report:
    cases: list[Case]
    failures: dict[int, list[str]]
    seconds: float
    worlds: list[int]
    notes: list[str]
    max_diff: dict[str, float]                       # regime -> largest relative difference seen
    identical: int = 0                               # cases whose every rank equals the 1-process run bit for bit
    above: int = 0                                   # cases beyond the tolerance (only the chaotic regime may have any)

    def summary(self) -> str:
        layouts = Counter(c.layout for c in self.cases)
        loads = Counter(f"{c.layout}->{c.checkpoint.load_layout}" for c in self.cases if c.checkpoint)
        moves: Counter = Counter()
        for c in self.cases:
            if c.checkpoint:
                a, b = c.world, LAYOUT_WORLD[c.checkpoint.load_layout]
                moves["grows" if b > a else "shrinks" if b < a else "stays"] += 1
                moves["from/to 1"] += 1 in (a, b)
        nf = Counter(f"{c.nonfinite.kind}/{c.nonfinite.policy}" for c in self.cases if c.nonfinite)
        cfg = Counter(f"{dict(c.config.kwargs)['preconditioner'][0]}+{dict(c.config.kwargs)['grafting'][0]}"
                      for c in self.cases)
        seeds = [c.seed for c in self.cases]
        lines = [f"cases: {len(self.cases)} (seeds {min(seeds)}..{max(seeds)}), launches {self.worlds}, "
                 f"{self.seconds:.0f} s wall",
                 "layouts: " + ", ".join(f"{k} {v}" for k, v in sorted(layouts.items())),
                 "group-0 configs: " + ", ".join(f"{k} {v}" for k, v in sorted(cfg.items())),
                 _model_line(self.cases),
                 "regimes: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(c.config.regime
                                                                                 for c in self.cases).items())),
                 f"non-finite injections: {sum(nf.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(nf.items()))
                 + ")",
                 f"checkpoint resumes: {sum(loads.values())} ({len(loads)} distinct layout pairs; world grows "
                 f"{moves['grows']}, shrinks {moves['shrinks']}, stays {moves['stays']}; {moves['from/to 1']} from or to "
                 f"one process)",
                 "largest relative difference to the 1-process run: " + ", ".join(
                     f"{k} {v:.2g}" for k, v in sorted(self.max_diff.items()))
                 + f"; bit-identical in {self.identical} of {len(self.cases)} cases"
                 + (f"; {self.above} above {TOLERANCE:g} (measured, not asserted)" if self.above else ""),
                 f"failures: {len(self.failures)}"]
        lines += self.notes
        return "\n".join(lines)


def _model_line(cases: list[Case]) -> str:
    params = [(m, p) for c in cases for m in c.modules for p in m.params]
    orders = Counter(len(p.shape) for _, p in params)
    kinds = Counter(m.dtype for m, _ in params)
    return (f"parameters: {len(params)} (order " + ", ".join(f"{k}: {v}" for k, v in sorted(orders.items()))
            + "; " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + f"; frozen {sum(m.frozen for m, _ in params)}, channels_last "
            f"{sum(p.memory == 'channels_last' for _, p in params)}, transposed "
            f"{sum(p.memory == 'transposed' for _, p in params)}, empty {sum(0 in p.shape for _, p in params)}, "
            f"experts {sum(m.kind == 'experts' for m, _ in params)}); second param group in "
            f"{sum(bool(c.config.second_group) for c in cases)} cases, no-gradient steps in "
            f"{sum(bool(c.no_grad) for c in cases)}, zero-gradient steps in {sum(bool(c.zero_grad) for c in cases)}")


def run_cases(seeds: list[int], worlds: Optional[list[int]] = None, timeout_s: float = 60.0,
              progress: bool = False, chaotic: bool = False) -> Report:
    """Draw, schedule, run and check ``seeds``; the report lists every failure with its seed."""
    from tests.support.fuzz_checks import check_case

    t0 = time.perf_counter()
    cases = [draw(s, chaotic) for s in seeds]
    results: dict[tuple[int, int], Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as root:
        sched = schedule(cases, worlds, root)
        _run_parent(sched.pre, results)
        for w, jobs in zip(sched.worlds, sched.launches):
            if jobs:
                if progress:
                    print(f"launch of {w} ranks: {len(jobs)} jobs", file=sys.stderr, flush=True)
                _run_launch(w, jobs, timeout_s, results, notes)
        _run_parent(sched.post, results)
    failures: dict[int, list[str]] = {}
    max_diff: dict[str, float] = {}
    identical = above = 0
    all_jobs = sched.pre + [j for js in sched.launches for j in js] + sched.post
    for c in cases:
        if c.seed in sched.unschedulable:
            failures[c.seed] = [f"not schedulable on launches {sched.worlds}"]
            continue
        problems, diff = check_case(c, [j for j in all_jobs if j.seed == c.seed], results)
        max_diff[c.config.regime] = max(max_diff.get(c.config.regime, 0.0), diff)
        identical += not problems and diff == 0.0
        above += diff > TOLERANCE
        if problems:
            failures[c.seed] = problems
    return Report(cases, failures, time.perf_counter() - t0, sched.worlds, notes, max_diff, identical, above)


def reproduce(seed: int, worlds: Optional[list[int]], chaotic: bool = False) -> str:
    """The one-line command that reruns exactly this case (on the same launch sequence, if forced)."""
    extra = f" --worlds {','.join(map(str, worlds))}" if worlds else ""
    return f"python -m scripts.tools.fuzz --seed {seed}{extra}{' --chaotic' if chaotic else ''}"


def probe_hang(world: int = 2, timeout_s: float = 5.0) -> tuple[list[str], dict[tuple[int, int], Any], float]:
    """The harness's own check of claim (b): a job whose rank 0 waits in a collective that the other
    ranks never join must come back as an error of that job within the process-group timeout.
    Returns the launch notes, the job results and the seconds it took."""
    t0 = time.perf_counter()
    results: dict[tuple[int, int], Any] = {}
    notes: list[str] = []
    _run_launch(world, [Job(1, -1, "hang", f"ddp{world}")], timeout_s, results, notes, relaunches=0)
    return notes, results, time.perf_counter() - t0

