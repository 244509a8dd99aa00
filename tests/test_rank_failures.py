"""No hang: a local failure on one rank becomes an error on every rank within seconds (2 gloo ranks)."""

from __future__ import annotations

from tests.support import rank_failure_scenarios as hs
from tests.support.dist_utils import run_ranks

FAST = 15.0   # seconds; the process-group timeout of the harness is 90 s


def test_local_failures_become_errors_on_every_rank_quickly():
    r0, r1 = run_ranks(2, hs.scenario_local_failures)
    for case in ("wrong_size", "bad_lr", "different_lr", "nan_raise", "different_frequency", "bad_state_dict"):
        (k0, _, t0), (k1, _, t1) = r0[case], r1[case]
        assert k0 != "ok" and k1 != "ok", f"{case}: {k0} / {k1}"
        assert max(t0, t1) < FAST, f"{case} took {max(t0, t1):.1f} s"
    # the rank that failed locally says why; the other names the failing rank
    assert r1["wrong_size"][0] == "ValueError" and "(7, 4)" in r1["wrong_size"][1]
    assert r0["wrong_size"][0] == "RankFailureError" and "[1]" in r0["wrong_size"][1]
    assert r1["bad_lr"][0] == "ValueError" and "lr" in r1["bad_lr"][1]
    assert r0["bad_lr"][0] == "RankFailureError"
    assert r0["different_lr"][0] == r1["different_lr"][0] == "ValueError"
    assert "differ between ranks" in r0["different_lr"][1]
    assert r0["nan_raise"][0] == r1["nan_raise"][0] == "NonFiniteGradientError"
    assert "precondition_frequency" in r0["different_frequency"][1]
    assert r1["bad_state_dict"][0] == "ValueError" and r0["bad_state_dict"][0] == "RankFailureError"
    # issue 18 item 2: an edited param list, item 4: a failing load pre-hook (one rank or all), through the agreement
    for case in ("edit_one_rank", "edit_every_rank", "load_edit_one_rank", "load_pre_hook_fails"):
        (k0, _, t0), (k1, _, t1) = r0[case], r1[case]
        assert k0 != "ok" and k1 != "ok" and "AssertionError" not in (k0, k1), f"{case}: {r0[case]} / {r1[case]}"
        assert max(t0, t1) < FAST, f"{case} took {max(t0, t1):.1f} s"
    assert r1["edit_one_rank"][0] == "ValueError" and "'extra'" in r1["edit_one_rank"][1]
    assert "param_groups[0]['params']" in r1["edit_one_rank"][1]
    assert r0["edit_one_rank"][0] == "RankFailureError" and "[1]" in r0["edit_one_rank"][1]
    assert all(r["edit_every_rank"][0] == "ValueError" and "'b' was removed" in r["edit_every_rank"][1]
               for r in (r0, r1))
    assert r1["load_edit_one_rank"][0] == "ValueError" and r0["load_edit_one_rank"][0] == "RankFailureError"
    # a gradient on one rank only: masked on the device, reported on both ranks at opt.check(), nothing changed
    assert all(r["partial_gradients"][0] == "PartialGradientsError" and "['b']" in r["partial_gradients"][1]
               and r["partial_gradients"][2] < FAST for r in (r0, r1)), (r0["partial_gradients"], r1["partial_gradients"])
    assert r1["load_pre_hook_fails"][:2] == ("RuntimeError", "load pre-hook failed on rank 1")
    assert r0["load_pre_hook_fails"][0] == "RankFailureError"
    # item 3: a lowered start computes the roots on every rank, as one process does
    assert r0["lowered_start"][0] == r1["lowered_start"][0] == "ok", (r0["lowered_start"], r1["lowered_start"])
    # skipping is agreed too, and the optimizer keeps working after every agreed failure
    assert r0["nan_skip"][0] == r1["nan_skip"][0] == "ok"
    assert r0["still_works"][0] == r1["still_works"][0] == "ok", (r0["still_works"], r1["still_works"])
    # a local failure on a step the others refresh roots in: no hang, the failing rank's cause, the others' report
    assert r1["wrong_size_at_refresh"][0] == "ValueError" and r0["wrong_size_at_refresh"][0] == "RankFailureError"
    assert max(r0["wrong_size_at_refresh"][2], r1["wrong_size_at_refresh"][2]) < FAST
