"""Cost-model accuracy is stated beside the null predictor's and the FLOPs proxy's."""

from __future__ import annotations

import numpy as np
import pytest

from hwprune import cost_models

SPEC = cost_models.BlockSpec(hidden=64, head_dim=16, heads=4, kv_heads=4, mlp=256, num_layers=2)
WORKLOAD = cost_models.Workload(batch_size=2, seq_len=32)


def test_accuracy_by_hand() -> None:
    measured = np.array([1.0, 2.0, 4.0, 1.25])
    predicted = np.array([1.05, 1.5, 4.0, 1.25])  # errors 5 %, 25 %, 0, 0
    acc = cost_models.speedup_accuracy(predicted, measured)
    assert acc.mape == pytest.approx(7.5)
    assert (acc.within10, acc.within5) == (75.0, 75.0)
    assert acc.tau == pytest.approx(1.0)
    null = cost_models.speedup_accuracy(np.ones(4), measured)  # errors 0, 50 %, 75 %, 20 %
    assert null.mape == pytest.approx(36.25) and np.isnan(null.tau) and null.within10 == 25.0
    skilled = acc.against(null)
    assert skilled.skill == pytest.approx(1 - 7.5 / 36.25) and skilled.beats_null
    assert not null.against(null).beats_null  # the null predictor has no skill over itself


def test_where_pruning_changes_nothing_a_good_share_within_10_percent_is_no_skill() -> None:
    """The H200 case: measured speedups within a few % of 1. A model within ±10 % everywhere can
    still be worse than saying nothing changes, and the figures show it."""
    rng = np.random.default_rng(0)
    measured = 1 + rng.normal(0, 0.02, 50)
    model = measured * (1 + rng.normal(0, 0.05, 50))
    null = cost_models.speedup_accuracy(np.ones(50), measured)
    acc = cost_models.speedup_accuracy(model, measured).against(null)
    assert acc.within10 >= 90 and null.within10 >= 90
    assert acc.skill < 0 and not acc.beats_null


def test_reference_speedups() -> None:
    units = np.array([[4, 4], [2, 2], [0, 0]])
    mlp = np.array([[256, 256], [128, 128], [0, 0]])
    refs = cost_models.reference_speedups(SPEC, WORKLOAD, units, mlp)
    np.testing.assert_array_equal(refs[cost_models.NULL], [1.0, 1.0, 1.0])
    flops = refs[cost_models.FLOPS]
    assert flops[0] == pytest.approx(1.0) and 1.9 < flops[1] < 2.1  # half the widths: ~half the FLOPs
    assert np.isinf(flops[2])  # no block FLOPs left
    # An infinite prediction is infinitely wrong, not an error.
    acc = cost_models.speedup_accuracy(flops, np.array([1.0, 2.0, 3.0]))
    assert np.isinf(acc.mape) and acc.within10 == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("predicted", "measured"),
    [([1.0], [1.0, 2.0]), ([], []), ([1.0, 0.0], [1.0, 1.0]), ([1.0, 1.0], [1.0, -2.0])],
)
def test_bad_speedups_are_refused(predicted: list[float], measured: list[float]) -> None:
    with pytest.raises(ValueError, match="speedups"):
        cost_models.speedup_accuracy(predicted, measured)
