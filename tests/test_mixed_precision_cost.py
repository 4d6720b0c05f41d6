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


def _tables_of_two_sessions(cross_reference: float | None) -> list[cost_models.LatencyTable]:
    """bf16 (gpu_a100's reference) profiled one day, fp32 another: dense bf16 took 30 ms beside the
    bf16 grid, and `cross_reference` ms beside the fp32 grid (None: that table did not time it)."""
    bf16, fp32 = (
        synthetic_table(MINILM, Workload(batch_size=8, seq_len=128, dtype=d)) for d in ("bf16", "fp32")
    )
    bf16.meta |= {"dense_model_ms": 30.0, "date": "2026-11-26T00:00:00+00:00"}
    fp32.meta |= {"date": "2026-12-07T17:00:00+00:00"}
    if cross_reference is not None:
        fp32.meta["dense_model_bf16_ms"] = cross_reference
    return [bf16, fp32]


def test_tables_of_two_sessions_are_put_on_one_time_base() -> None:
    """The machine ran 20 % faster the day the fp32 table was profiled (dense bf16: 25 ms then,
    30 ms on the bf16 table's day): its latencies count 1.2x on the bf16 table's time base, so a
    mixed speedup is not inflated by the machine's drift between the two days."""
    profile = load_profile("gpu_a100")
    mixed = cost_models.mixed_precision_model(
        profile, MINILM, WL, ["fp32"], tables=_tables_of_two_sessions(25.0)
    )
    assert mixed.session_scales == {"bf16": 1.0, "fp32": pytest.approx(1.2)}
    units, mlp = np.full(6, 12), np.full(6, 1536)
    fp32 = np.ones(6, dtype=int)
    got = mixed.predict_mixed(units, mlp, attention_precision=fp32, mlp_precision=fp32).latency_ms
    own = mixed.models["fp32"].block_latency_ms(units, mlp).sum()
    assert float(got) == pytest.approx(mixed.base_ms + 1.2 * own)
    # The reference precision itself is untouched.
    bf16 = np.zeros(6, dtype=int)
    same = mixed.predict_mixed(units, mlp, attention_precision=bf16, mlp_precision=bf16).latency_ms
    np.testing.assert_allclose(same, mixed.predict(units, mlp).latency_ms)


def test_tables_of_two_sessions_without_a_common_reference_say_so(caplog) -> None:  # type: ignore[no-untyped-def]
    profile = load_profile("gpu_a100")
    with caplog.at_level("WARNING", logger="hwprune.cost_models._mixed"):
        mixed = cost_models.mixed_precision_model(
            profile, MINILM, WL, ["fp32"], tables=_tables_of_two_sessions(None)
        )
    assert mixed.session_scales == {"bf16": 1.0, "fp32": 1.0}
    assert "profiled in different sessions" in caplog.text and "carry the machine's drift" in caplog.text
    with pytest.raises(ValueError, match="session scales must be positive"):
        cost_models.MixedPrecisionModel(mixed.models, reference="bf16", session_scales={"fp32": 0.0})


def test_a_block_away_from_the_stream_s_precision_pays_its_edges() -> None:
    """The fp32 table's session also timed the dense model with every block at fp32 between bf16
    layers: 2.4 ms more than the whole model at fp32, less the outside's own difference, spread
    over the 6 layers, is what each fp32 block costs at its edges, on the bf16 table's time base."""
    profile = load_profile("gpu_a100")
    tables = _tables_of_two_sessions(25.0)
    fp32_table = tables[1]
    whole = 40.0
    fp32_table.meta |= {"dense_model_ms": whole, "dense_model_blocks_ms": whole + 2.4}
    mixed = cost_models.mixed_precision_model(profile, MINILM, WL, ["fp32"], tables=tables)
    ref, own = mixed.models["bf16"], mixed.models["fp32"]
    outside = ref.base_ms / 1.2 - own.base_ms  # bf16's outside in the fp32 session, less fp32's
    expected = (2.4 - outside) / 6 * 1.2
    assert mixed.edge_ms == {"bf16": 0.0, "fp32": pytest.approx(expected)}
    units, mlp = np.full(6, 12), np.full(6, 1536)
    fp32, bf16 = np.ones(6, dtype=int), np.zeros(6, dtype=int)
    priced = float(mixed.predict_mixed(units, mlp, attention_precision=bf16, mlp_precision=fp32).latency_ms)
    without = cost_models.MixedPrecisionModel(
        mixed.models, reference="bf16", session_scales=mixed.session_scales
    )
    plain = float(without.predict_mixed(units, mlp, attention_precision=bf16, mlp_precision=fp32).latency_ms)
    assert priced == pytest.approx(plain + 6 * expected)
    # Layers at the stream's own precision pay nothing; a dropped layer pays nothing either.
    np.testing.assert_allclose(
        mixed.predict_mixed(units, mlp, attention_precision=bf16, mlp_precision=bf16).latency_ms,
        without.predict_mixed(units, mlp, attention_precision=bf16, mlp_precision=bf16).latency_ms,
    )
    dropped = np.arange(6) < 6
    assert float(
        mixed.predict_mixed(
            units, mlp, attention_precision=bf16, mlp_precision=fp32, dropped=dropped
        ).latency_ms
    ) == pytest.approx(mixed.base_ms)
    with pytest.raises(ValueError, match="edge costs must be >= 0 and 0 at the reference"):
        cost_models.MixedPrecisionModel(mixed.models, reference="bf16", edge_ms={"bf16": 1.0})
