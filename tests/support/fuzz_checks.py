"""Randomized multi-rank fuzzing, part 5: the assertions on one case's job results (parent process).

Kept apart from scheduling so that what is claimed is in one short file: every rank's local data
equals the 1-process run's region of it, the non-finite policy is the same on every rank and
changes nothing, step counters are right before and after a checkpoint load.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.support.fuzz_cases import TOLERANCE, Case
from tests.support.fuzz_ranks import Job


def _region(full: torch.Tensor, offset: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    for d, (o, s) in enumerate(zip(offset, shape)):
        full = full.narrow(d, o, s)
    return full


def param_diff(local: torch.Tensor, offset: tuple[int, ...], ref: torch.Tensor) -> float:
    """max |local - ref region| / max |ref| (inf when the local data is not finite)."""
    if local.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(local).all()):
        return float("inf")
    region = _region(ref, offset, local.shape).double()
    return float((local.double() - region).abs().max() / ref.double().abs().max().clamp_min(1e-12))


def nonfinite_problems(case: Case, events: list[dict[str, Any]]) -> list[str]:
    nf = case.nonfinite
    assert nf is not None
    seen = [e.get("nonfinite") for e in events]
    if any(s is None for s in seen):
        return ["non-finite step: a rank did not record the injected step"]
    hit = [r for r, s in enumerate(seen) if s["hit"]]
    no_grads = not any(s["any_grad"] for s in seen)      # a step with no gradient anywhere does nothing
    out = []
    for r, s in enumerate(seen):
        if hit and nf.policy == "raise":
            ok = s["outcome"] == "raised" and s["unchanged"]
        elif hit:
            ok = s["outcome"] == "stepped" and s["skipped"] and s["unchanged"]
        else:
            ok = s["outcome"] == "stepped" and s["skipped"] == no_grads and (s["unchanged"] or not no_grads)
        if not ok:
            out.append(f"non-finite {nf.kind} on rank {hit} ({s['hit'] or '-'} here), policy {nf.policy!r}: rank {r} "
                       f"{s['outcome']}, skipped={s['skipped']}, state unchanged={s['unchanged']}")
    return out


def _job_problems(case: Case, job: Job, ranks: list[Any], ref: dict[str, Any],
                  saved_steps: Any = None) -> tuple[list[str], float]:
    what = f"{job.kind} job ({job.layout})"
    missing = [r for r, res in enumerate(ranks) if res is None]
    if missing:
        return [f"{what}: no result from rank(s) {missing} (the launch died or hung)"], 0.0
    if any("error" in res for res in ranks):
        return [], 0.0      # reported by check_case
    out: list[str] = []
    worst = 0.0
    for r, res in enumerate(ranks):
        for name, (local, offset) in res["params"].items():
            d = param_diff(local, offset, ref["params"][name][0])
            worst = max(worst, d)
            if not d <= TOLERANCE and case.config.regime != "chaotic":   # chaotic: measured, not asserted
                out.append(f"{what} rank {r}: {name} differs from the 1-process run by {d:.3g} > {TOLERANCE:g}")
    events = [res["events"] for res in ranks]
    expected = ref["events"]["final_steps"]      # a step in which no parameter has a gradient does not count
    if any(e["final_steps"] != expected for e in events):
        out.append(f"{what}: step counters {[e['final_steps'] for e in events]} != {expected} (1-process run)")
    if job.kind == "main" and case.nonfinite is not None:
        out += nonfinite_problems(case, events)
    if job.kind == "load":
        k = case.checkpoint.save_step if case.checkpoint else -1
        saved = saved_steps
        if any(e["loaded_at"] != k or e["loaded_steps"] != saved for e in events):
            out.append(f"{what}: after the load, extra step / step counters are "
                       f"{[(e['loaded_at'], e['loaded_steps']) for e in events]}, saved {k} / {saved}")
    return out, worst


def check_case(case: Case, jobs: list[Job], results: dict[tuple[int, int], Any]) -> tuple[list[str], float]:
    """Every problem of one case (empty: it passed) and its largest relative difference."""
    refs = [j for j in jobs if j.kind == "ref"]
    if len(refs) != 1:
        return ["harness: no reference job"], 0.0
    ref = results.get((refs[0].id, 0))
    problems: list[str] = []
    for job in jobs:       # a job that raised is reported even when there is nothing to compare it with
        errors = [(r, res["error"]) for r in range(job.world)
                  if (res := results.get((job.id, r))) is not None and "error" in res]
        # the root cause first: a rank's own error, not another rank's RankFailureError about it
        errors.sort(key=lambda e: "RankFailureError" in e[1].strip().splitlines()[-1])
        if errors:
            r, tb = errors[0]
            problems.append(f"{job.kind} job ({job.layout}) rank {r} raised: " + " | ".join(tb.strip().splitlines()[-4:]))
    if ref is None or "error" in ref:
        return problems or ["1-process reference: no result (its launch stopped before it ran)"], 0.0
    worst = 0.0
    mains = [results.get((j.id, 0)) for j in jobs if j.kind == "main"]
    saved = mains[0]["events"].get("saved_steps") if mains and mains[0] and "events" in mains[0] else None
    for job in jobs:
        if job.kind == "ref":
            continue
        ranks = [results.get((job.id, r)) for r in range(job.world)]
        p, d = _job_problems(case, job, ranks, ref, saved)
        problems += p
        worst = max(worst, d)
    return problems, worst
