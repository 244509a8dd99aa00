"""The step policy (runtime/policy.py) without a process group: outcomes, precedence, messages, and the
device evaluator agreeing with the host evaluator on every combination of flags (issue 17 item 3)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sharded_shampoo.config import NonFinitePolicy
from sharded_shampoo.runtime.agreement import RankFailureError
from sharded_shampoo.runtime.flags import FlagLayout, GradientFlags
from sharded_shampoo.runtime.policy import (NonFiniteGradientError, PartialGradientsError, StepOutcome, decide,
                                            device_masks, error_of)

LAYOUT = FlagLayout(params=2, world=2)
NAMES = ["w", "b"]


def _agreed(ranks: list[dict]) -> list[float]:
    """MAX over per-rank flag vectors, as the all-reduce does. Each rank: present, failed, digest, nan, bad, nonzero."""
    vectors = []
    for r, spec in enumerate(ranks):
        head = LAYOUT.host_part(spec["present"], spec.get("failed", False), r, spec.get("digest", 7))
        vectors.append(head + list(spec.get("nan", [0, 0])) + list(spec.get("bad", [0, 0]))
                       + list(spec.get("nonzero", [1, 1])))
    return [max(col) for col in zip(*vectors)]


def _both(values: list[float], policy: NonFinitePolicy, lr_zero: bool = False):
    host = decide(GradientFlags.read(values, LAYOUT), policy, lr_zero)
    mask = device_masks(torch.tensor(values, dtype=torch.float64), LAYOUT, policy, lr_zero)
    return host, mask.tolist()


def test_layout_sections_tile_the_vector():
    sections = ["lacks", "has", "failed", "digest", "nan", "bad", "nonzero"]
    spans = [LAYOUT.section(s) for s in sections]
    assert [sp.start for sp in spans[1:]] == [sp.stop for sp in spans[:-1]]
    assert LAYOUT.size == 2 + 2 + 2 + 2 + 2 + 2 + 2 and LAYOUT.host_size == 8
    with pytest.raises(ValueError, match="3 presence flags for 2 parameters"):
        LAYOUT.host_part([True] * 3, False, 0, 0)


def test_outcomes_and_precedence():
    full = {"present": [True, True]}
    assert _both(_agreed([full, full]), NonFinitePolicy.RAISE)[0].outcome == StepOutcome.APPLIED
    nan = dict(full, nan=[0, 1], bad=[0, 1])
    host, mask = _both(_agreed([full, nan]), NonFinitePolicy.RAISE)
    assert host.outcome == StepOutcome.NONFINITE and mask == [False, False]
    assert _both(_agreed([full, nan]), NonFinitePolicy.SKIP)[0].outcome == StepOutcome.SKIPPED_NONFINITE
    host, mask = _both(_agreed([full, nan]), NonFinitePolicy.IGNORE)
    assert host.outcome == StepOutcome.APPLIED and host.active == {0, 1} and mask == [True, True]
    partial = {"present": [True, False]}
    assert _both(_agreed([full, partial]), NonFinitePolicy.RAISE)[0].outcome == StepOutcome.PARTIAL_GRADIENTS
    # a parameter no rank has a gradient for simply does not step
    host, mask = _both(_agreed([partial, partial]), NonFinitePolicy.RAISE)
    assert host.outcome == StepOutcome.APPLIED and host.active == {0} and mask == [True, False]
    none = {"present": [False, False], "nonzero": [0, 0]}
    assert _both(_agreed([none, none]), NonFinitePolicy.RAISE)[0].outcome == StepOutcome.NO_GRADIENTS
    zero = dict(full, nonzero=[0, 0])
    assert _both(_agreed([zero, zero]), NonFinitePolicy.RAISE, lr_zero=True)[0].outcome == StepOutcome.INIT_STEP
    assert _both(_agreed([zero, zero]), NonFinitePolicy.RAISE)[0].outcome == StepOutcome.APPLIED
    # precedence: a failed rank beats differing settings, which beat partial gradients, which beat NaN
    worst = dict(partial, failed=True, digest=8, nan=[1, 0], bad=[1, 0])
    assert _both(_agreed([full, worst]), NonFinitePolicy.RAISE)[0].outcome == StepOutcome.RANK_FAILED
    assert _both(_agreed([full, dict(worst, failed=False)]), NonFinitePolicy.RAISE)[0].outcome == \
        StepOutcome.SETTINGS_DIFFER
    assert _both(_agreed([full, dict(worst, failed=False, digest=7)]), NonFinitePolicy.RAISE)[0].outcome == \
        StepOutcome.PARTIAL_GRADIENTS


def test_device_and_host_evaluators_agree_on_every_combination():
    checked = 0
    bits = [0.0, 1.0]
    for present0, present1, failed, digest, nan, bad, nonzero in itertools.product(
            itertools.product([True, False], repeat=2), itertools.product([True, False], repeat=2), [False, True],
            [7, 8], itertools.product(bits, repeat=2), itertools.product(bits, repeat=2),
            itertools.product(bits, repeat=2)):
        values = _agreed([{"present": list(present0)},
                          {"present": list(present1), "failed": failed, "digest": digest, "nan": nan, "bad": bad,
                           "nonzero": nonzero}])
        for policy, lr_zero in itertools.product(NonFinitePolicy, [False, True]):
            host, mask = _both(values, policy, lr_zero)
            assert mask == [k in host.active for k in range(2)], (values, policy, lr_zero, host)
            assert host.applied or not any(mask)
            checked += 1
    assert checked == 16 * 2 * 2 * 4 * 4 * 4 * 3 * 2


def test_error_messages_name_the_cause_and_the_step():
    full = {"present": [True, True]}
    cases = [({"present": [True, True], "failed": True}, RankFailureError, r"rank\(s\) \[1\]"),
             (dict(full, digest=9), ValueError, "differ between ranks"),
             ({"present": [False, True]}, PartialGradientsError, r"\['w'\] have a gradient on some ranks"),
             (dict(full, nan=[1, 0], bad=[1, 0]), NonFiniteGradientError, r"\['w'\] \(NaN\)"),
             (dict(full, bad=[0, 1]), NonFiniteGradientError, r"\['b'\].*\['b'\]: Inf entries, or finite entries that overflow")]
    for rank1, kind, pattern in cases:
        values = _agreed([full, rank1])
        flags = GradientFlags.read(values, LAYOUT)
        error = error_of(decide(flags, NonFinitePolicy.RAISE, False), flags, NAMES, 12)
        assert isinstance(error, kind), (rank1, error)
        with pytest.raises(kind, match=pattern):
            raise error
        assert "othing was updated by step 12" in str(error)
    flags = GradientFlags.read(_agreed([full, full]), LAYOUT)
    assert error_of(decide(flags, NonFinitePolicy.RAISE, False), flags, NAMES, 1) is None
