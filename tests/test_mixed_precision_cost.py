"""Per-block precisions priced: cost_models.MixedPrecisionModel and mixed_precision_model."""

from __future__ import annotations

import numpy as np
import pytest

from hwprune import cost_models
from hwprune.cost_models import Workload
from hwprune.search.config import load_hardware as load_profile
from tests.test_cost_models import MINILM, synthetic_table

WL = Workload(batch_size=8, seq_len=128, dtype="auto")


def _mixed(tables: bool = True) -> cost_models.MixedPrecisionModel:
    profile = load_profile("gpu_a100")
    made = [synthetic_table(MINILM, Workload(batch_size=8, seq_len=128, dtype=d)) for d in ("bf16", "fp32")]
    return cost_models.mixed_precision_model(profile, MINILM, WL, ["fp32"], tables=made if tables else [])


def test_one_precision_everywhere_is_that_precision_s_own_model_exactly() -> None:
    mixed = _mixed()
    assert mixed.precisions == ("bf16", "fp32") and mixed.reference == "bf16"  # gpu_a100's default first
    rng = np.random.default_rng(0)
    units, mlp = rng.integers(0, 13, (20, 6)), rng.integers(0, 1537, (20, 6))
    for k, name in enumerate(mixed.precisions):
        own = mixed.models[name].predict(units, mlp).latency_ms
        picks = np.full(units.shape, k)
        got = mixed.predict_mixed(units, mlp, attention_precision=picks, mlp_precision=picks).latency_ms
        np.testing.assert_allclose(got, own - mixed.models[name].base_ms + mixed.base_ms)
    np.testing.assert_allclose(
        mixed.predict(units, mlp).latency_ms, mixed.models["bf16"].predict(units, mlp).latency_ms
    )


def test_a_mixed_block_costs_between_its_two_uniform_blocks_and_each_part_moves_its_own_share() -> None:
    mixed = _mixed()
    units, mlp = np.full(6, 12), np.full(6, 1536)
    bf16, fp32 = np.zeros(6, dtype=int), np.ones(6, dtype=int)

    def total(a: np.ndarray, m: np.ndarray, u: np.ndarray = units, w: np.ndarray = mlp) -> float:
        return float(mixed.predict_mixed(u, w, attention_precision=a, mlp_precision=m).latency_ms)

    fast, slow = total(bf16, bf16), total(fp32, fp32)
    assert fast < total(fp32, bf16) < slow and fast < total(bf16, fp32) < slow
    # Without attention, its precision costs nothing; without MLP, the MLP's precision still prices
    # the norms and residual additions the block keeps.
    none = np.zeros(6, dtype=int)
    assert total(fp32, bf16, u=none) == pytest.approx(total(bf16, bf16, u=none))
    assert total(bf16, fp32, w=none) > total(bf16, bf16, w=none)
    # Depth pruning: a dropped layer costs nothing at any precision.
    dropped = np.arange(6) < 2
    kept = mixed.predict_mixed(units, mlp, attention_precision=fp32, mlp_precision=fp32, dropped=dropped)
    assert float(kept.latency_ms) == pytest.approx(mixed.base_ms + 4 * (slow - mixed.base_ms) / 6)


def test_a_mixed_prediction_is_labelled_by_its_least_faithful_precision() -> None:
    profile = load_profile("gpu_a100")
    only_bf16 = [synthetic_table(MINILM, Workload(batch_size=8, seq_len=128, dtype="bf16"))]
    mixed = cost_models.mixed_precision_model(profile, MINILM, WL, ["fp32"], tables=only_bf16)
    assert mixed.sources == {"bf16": "table", "fp32": "calibrated"}
    picks = np.zeros(6, dtype=int)
    assert (
        mixed.predict_mixed(
            np.full(6, 12), np.full(6, 1536), attention_precision=picks, mlp_precision=picks
        ).source
        == "calibrated"
    )
    assert _mixed(tables=False).source == "analytical"
    assert _mixed().source == "table"
    # A block mixing precisions is composed from two tables, looked up in neither.
    units, mlp, ones = np.full(6, 12), np.full(6, 1536), np.ones(6, dtype=int)
    assert _mixed().predict_mixed(units, mlp, attention_precision=ones, mlp_precision=ones).source == "table"
    one_mixed = np.eye(6, dtype=int)[0]
    assert (
        _mixed().predict_mixed(units, mlp, attention_precision=one_mixed, mlp_precision=ones).source
        == "calibrated"
    )


def test_bad_precisions_fail_naming_the_valid_ones() -> None:
    profile = load_profile("cpu_local")
    with pytest.raises(ValueError, match=r"does not run 'int8'; its dtypes: \['fp32', 'bf16'\]"):
        cost_models.mixed_precision_model(profile, MINILM, WL, ["int8"])
    mixed = _mixed()
    with pytest.raises(ValueError, match=r"attention_precision must index the precisions \['bf16', 'fp32'\]"):
        mixed.predict_mixed(
            np.full(6, 12),
            np.full(6, 1536),
            attention_precision=np.full(6, 2),
            mlp_precision=np.zeros(6, dtype=int),
        )
    with pytest.raises(ValueError, match="not priced here; valid choices"):
        mixed.index("fp8")
