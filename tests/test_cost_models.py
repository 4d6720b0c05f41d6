"""Cost models: the conformance suite every implementation passes, and each model's own contract."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cost_models
from cost_models import AnalyticalModel, BlockSpec, LatencyTable, TableModel, Workload
from search.config import load_hardware as load_profile
from tests.test_configs import PROFILES

MINILM = BlockSpec(hidden=384, head_dim=32, heads=12, kv_heads=12, mlp=1536, num_layers=6)
LLAMA = BlockSpec(
    hidden=512, head_dim=64, heads=8, kv_heads=2, mlp=1408, num_layers=4, gated_mlp=True, norm="rmsnorm"
)


def synthetic_table(spec: BlockSpec, workload: Workload, *, step: int = 256) -> LatencyTable:
    """A table whose values come from a known analytical model (so tests know the truth)."""
    truth = AnalyticalModel(profile=load_profile("gpu_a100"), spec=spec, workload=workload)
    units = np.arange(0, spec.units + 1)
    mlp = np.unique(np.r_[np.arange(0, spec.mlp + 1, step), spec.mlp])
    uu, mm = np.meshgrid(units, mlp, indexing="ij")
    lat = truth.block_latency_ms(uu.ravel(), mm.ravel())
    frame = pd.DataFrame(
        {
            "units": uu.ravel(),
            "heads": uu.ravel() * spec.heads_per_unit,
            "mlp": mm.ravel(),
            "latency_ms": lat,
            "p10_ms": lat,
            "p90_ms": lat,
            "repeats": 1,
        }
    )
    return LatencyTable(frame=frame, spec=spec, workload=workload, profile="gpu_a100", base_ms=0.25)


def all_models() -> list[tuple[str, cost_models.CostModel]]:
    workload = Workload(batch_size=8, seq_len=128, dtype="auto")
    models: list[tuple[str, cost_models.CostModel]] = []
    for name in PROFILES:
        if name == "cpu_local":
            continue  # measured peaks; covered by test_cpu_local_uses_measured_peaks
        models.append(
            (
                f"analytical-{name}",
                AnalyticalModel(profile=load_profile(name), spec=MINILM, workload=workload),
            )
        )
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    for fit in cost_models.TABLE_FITS:
        models.append((f"table-{fit}", TableModel(table=synthetic_table(MINILM, wl, step=128), fit=fit)))
    models.append(
        ("calibrated", cost_models.calibrate(load_profile("gpu_a100"), synthetic_table(MINILM, wl)))
    )
    models.append(
        ("analytical-gqa", AnalyticalModel(profile=load_profile("gpu_h100"), spec=LLAMA, workload=wl))
    )
    decode = Workload(batch_size=4, seq_len=1, dtype="bf16", phase="decode", kv_len=512)
    models.append(
        ("analytical-decode", AnalyticalModel(profile=load_profile("gpu_h100"), spec=LLAMA, workload=decode))
    )
    return models


MODELS = all_models()


@pytest.mark.parametrize(("name", "model"), MODELS, ids=[n for n, _ in MODELS])
def test_conformance(name: str, model: cost_models.CostModel) -> None:
    spec = model.spec
    rng = np.random.default_rng(0)
    units = rng.integers(0, spec.units + 1, size=(50, spec.num_layers))
    mlp = rng.integers(0, spec.mlp + 1, size=(50, spec.num_layers))
    pred = model.predict(units, mlp)
    # Finite, positive, one per configuration, labelled with its source and profile.
    assert pred.latency_ms.shape == (50,)
    assert np.isfinite(pred.latency_ms).all() and (pred.latency_ms > 0).all()
    assert pred.source in cost_models.SOURCES and pred.source == model.source
    assert pred.profile == model.profile
    # Deterministic.
    assert np.array_equal(model.predict(units, mlp).latency_ms, pred.latency_ms)
    # Monotone in width: growing any one layer's width never lowers latency.
    widths = np.arange(spec.mlp + 1)
    block = model.block_latency_ms(np.full_like(widths, spec.units), widths)
    assert (np.diff(block) >= -1e-12).all()
    block = model.block_latency_ms(np.arange(spec.units + 1), np.full(spec.units + 1, spec.mlp))
    assert (np.diff(block) >= -1e-12).all()
    # The dense model is the slowest configuration.
    assert model.dense_ms() >= pred.latency_ms.max() - 1e-12
    # A single configuration gives a scalar.
    assert float(model.predict(units[0], mlp[0])) == pytest.approx(pred.latency_ms[0])


def test_predict_rejects_bad_widths() -> None:
    model = AnalyticalModel(profile=load_profile("gpu_t4"), spec=MINILM, workload=Workload(dtype="fp16"))
    with pytest.raises(ValueError, match=r"need matching \(\.\.\., 6\) widths"):
        model.predict(np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"mlp widths must lie in \[0, 1536\], got range \[0, 2000\]"):
        model.predict(np.zeros(6, int), np.array([0, 0, 0, 0, 0, 2000]))


def test_unsupported_dtype_names_the_device_dtypes() -> None:
    with pytest.raises(
        ValueError, match=r"gpu_t4 does not run 'bf16'; its dtypes: \['fp16', 'int8', 'fp32'\]"
    ):
        AnalyticalModel(profile=load_profile("gpu_t4"), spec=MINILM, workload=Workload(dtype="bf16"))


def test_tpu_latency_is_a_staircase_in_mlp_width() -> None:
    """v5e pads to 128-wide MXU tiles: 129..256 neurons cost the same, 128 costs less."""
    model = AnalyticalModel(
        profile=load_profile("tpu_v5e"),
        spec=MINILM,
        workload=Workload(batch_size=64, seq_len=256, dtype="bf16"),
    )
    lat = model.block_latency_ms(np.full(4, 12), np.array([128, 129, 200, 256]))
    assert lat[1] == lat[2] == lat[3] > lat[0]
    v6e = AnalyticalModel(profile=load_profile("tpu_v6e"), spec=MINILM, workload=model.workload)
    lat6 = v6e.block_latency_ms(np.full(3, 12), np.array([129, 256, 257]))
    assert lat6[0] == lat6[1] < lat6[2]  # 256-wide MXUs on v6e


def test_gpu_wave_quantisation() -> None:
    """A100: 108 SMs of 128x128 tiles; a GEMM of 108 tiles runs in one wave, 109 tiles in two."""
    profile = load_profile("gpu_a100")
    model = AnalyticalModel(
        profile=profile, spec=MINILM, workload=Workload(batch_size=32, seq_len=432, dtype="bf16")
    )
    # tokens = 13,824 = 108 row tiles: N <= 128 is one wave, N in (128, 256] two.
    ones = np.ones(3, dtype=bool)
    t = model._gemm(ones, 13_824, np.array([128, 129, 256]), 4096)
    assert t[1] == t[2] > t[0]


def test_npu_charges_weight_spill_beyond_on_chip_memory() -> None:
    profile = load_profile("npu_hexagon")
    spec = BlockSpec(hidden=2048, head_dim=64, heads=32, kv_heads=32, mlp=4096, num_layers=1)
    model = AnalyticalModel(
        profile=profile, spec=spec, workload=Workload(batch_size=1, seq_len=32, dtype="int8")
    )
    mlp = np.arange(0, 4097, 32)
    resident = model._weights_resident(np.zeros_like(mlp), mlp)
    assert resident[0] and not resident[-1]
    lat = model.block_latency_ms(np.zeros_like(mlp), mlp)
    edge = int(np.argmin(resident))  # first width whose weights spill
    step = lat[edge] - lat[edge - 1]
    assert step > 5 * (lat[edge - 1] - lat[edge - 2])  # a jump, not the usual increment


def test_table_model_interpolates_and_never_extrapolates() -> None:
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    table = synthetic_table(MINILM, wl, step=512)
    model = TableModel(table=table, fit="grid")
    grid = table.frame.set_index(["units", "mlp"])["latency_ms"]
    assert model.block_latency_ms(np.array(6), np.array(512)) == pytest.approx(grid[6, 512])
    mid = model.block_latency_ms(np.array(6), np.array(768))
    assert mid == pytest.approx((grid[6, 512] + grid[6, 1024]) / 2)
    assert model.base_ms == 0.25 and model.source == "table"
    small = replace(table, frame=table.frame[table.frame.mlp <= 1024])
    with pytest.raises(
        ValueError, match=r"mlp width 1536 is outside the profiled range \[0, 1024\].*not extrapolating"
    ):
        TableModel(table=small).block_latency_ms(np.array(3), np.array(1536))
    with pytest.raises(
        ValueError, match="was profiled at prefill batch 8 x seq 128, bf16, not prefill batch 1"
    ):
        TableModel(table=table, workload=Workload(batch_size=1, dtype="bf16"))


def test_additive_fit_averages_noise_and_keeps_the_staircase() -> None:
    # Truth: a block is attention(units) + mlp(width), with a stair every 256 neurons (a tile).
    units, mlp = np.arange(13), np.arange(0, 1537, 128)
    attention = 0.1 * units + 0.05 * (units > 0)
    mlp_ms = 0.4 * np.ceil(mlp / 256)
    truth = 0.02 + attention[:, None] + mlp_ms[None, :]  # (13 units, 13 widths)
    noisy = truth * np.random.default_rng(0).lognormal(0.0, 0.05, truth.shape)
    uu, mm = np.meshgrid(units, mlp, indexing="ij")
    frame = pd.DataFrame(
        {"units": uu.ravel(), "heads": uu.ravel(), "mlp": mm.ravel(), "latency_ms": noisy.ravel()}
    ).assign(p10_ms=0.0, p90_ms=0.0, repeats=1)
    table = LatencyTable(frame=frame, spec=MINILM, workload=Workload(), profile="cpu_local")
    additive, grid = TableModel(table=table), TableModel(table=table, fit="grid")
    err_additive = np.abs(additive.block_latency_ms(uu, mm) / truth - 1)
    err_grid = np.abs(grid.block_latency_ms(uu, mm) / truth - 1)
    assert err_additive.mean() < 0.5 * err_grid.mean()  # about 1/sqrt(13) of the noise in theory
    assert grid.fit_error == 0.0 and 0.03 < additive.fit_error < 0.07  # the 5 % noise it removed
    stairs = np.diff(additive.block_latency_ms(np.full(13, 6), mlp))
    assert np.all(stairs[1::2] < 0.1) and np.all(stairs[0::2] > 0.3)  # flat inside a tile, a step at it
    with pytest.raises(
        ValueError, match=r"unknown table fit 'smooth'; valid choices: \['additive', 'grid'\]"
    ):
        TableModel(table=table, fit="smooth")


def test_table_base_comes_from_the_whole_model_minus_fitted_blocks() -> None:
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    table = synthetic_table(MINILM, wl, step=128)
    grid = TableModel(table=table, fit="grid")
    dense_block = float(grid.block_latency_ms(np.array(12), np.array(1536)))
    empty_block = float(grid.block_latency_ms(np.array(0), np.array(0)))
    table.meta["dense_model_ms"] = 6 * dense_block + 1.5
    for fit in cost_models.TABLE_FITS:
        model = TableModel(table=table, fit=fit)
        fitted_block = float(model.block_latency_ms(np.array(12), np.array(1536)))
        assert model.base_ms == pytest.approx(6 * dense_block + 1.5 - 6 * fitted_block)
        assert model.dense_ms() == pytest.approx(table.meta["dense_model_ms"])
    table.meta["empty_model_ms"] = 6 * empty_block + 1.0  # preferred: small minus small
    assert TableModel(table=table, fit="grid").base_ms == pytest.approx(1.0)
    table.meta["empty_model_ms"] = 1e-6  # whole model faster than its blocks: no negative base
    assert TableModel(table=table).base_ms == 0.0


def test_table_round_trip(tmp_path: Path) -> None:
    table = synthetic_table(MINILM, Workload(dtype="bf16"))
    table.meta = {"backend": "torch", "nvml": {"name": "x"}}
    loaded = LatencyTable.load(table.save(tmp_path / "t.csv"))
    assert loaded.spec == table.spec and loaded.workload == table.workload and loaded.meta == table.meta
    pd.testing.assert_frame_equal(loaded.frame, table.frame, check_dtype=False, rtol=1e-5)
    (tmp_path / "t.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs both the CSV and its t\.json sidecar"):
        LatencyTable.load(tmp_path / "t.csv")


def test_calibration_recovers_known_efficiencies() -> None:
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    profile = load_profile("gpu_a100")
    truth = AnalyticalModel(
        profile=profile,
        spec=MINILM,
        workload=wl,
        efficiency=cost_models.Efficiency(compute=0.35, memory=0.5, overhead=2.0),
    )
    table = synthetic_table(MINILM, wl)
    table.frame["latency_ms"] = truth.block_latency_ms(
        table.frame["units"].to_numpy(), table.frame["mlp"].to_numpy()
    )
    fitted = cost_models.calibrate(profile, table)
    assert fitted.source == "calibrated"
    units, mlp = np.array([3, 12, 7]), np.array([100, 1536, 900])
    np.testing.assert_allclose(
        fitted.block_latency_ms(units, mlp), truth.block_latency_ms(units, mlp), rtol=0.02
    )


def test_factory_prefers_table_then_calibrated_then_analytical(tmp_path: Path) -> None:
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    path = synthetic_table(MINILM, wl).save(tmp_path / "a100.csv")
    profile = replace(load_profile("gpu_a100"), tables=[str(path)])
    assert cost_models.cost_model_for(profile, MINILM, wl).source == "table"
    assert cost_models.cost_model_for(profile, MINILM, replace(wl, batch_size=1)).source == "calibrated"
    bare = replace(profile, tables=[str(tmp_path / "missing.csv")])
    assert cost_models.cost_model_for(bare, MINILM, wl).source == "analytical"


def test_cpu_local_uses_measured_peaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_peaks() -> dict[str, float]:
        calls.append(1)
        return {"fp32": 0.5, "bf16": 0.25, "bandwidth_gbs": 20.0}

    monkeypatch.setattr(cost_models._cpu_peaks, "measure_peaks", fake_peaks)
    profile = cost_models.local_profile(load_profile("cpu_local"), cache=tmp_path / "peaks.json")
    again = cost_models.local_profile(load_profile("cpu_local"), cache=tmp_path / "peaks.json")
    assert len(calls) == 1  # cached
    assert profile.peak_tflops["fp32"] == again.peak_tflops["fp32"] == 0.5
    assert profile.memory_bandwidth_gbs == 20.0


def test_micro_benchmark_measures_positive_peaks() -> None:
    peaks = cost_models.measure_peaks(size=128, copy_mib=4, repeats=2)
    assert set(peaks) == {"fp32", "bf16", "bandwidth_gbs"}
    assert all(v > 0 for v in peaks.values())


def test_spec_and_workload_validation() -> None:
    with pytest.raises(ValueError, match=r"heads \(12\) must be a multiple of kv_heads \(5\)"):
        BlockSpec(hidden=384, head_dim=32, heads=12, kv_heads=5, mlp=1536, num_layers=6)
    with pytest.raises(ValueError, match=r"unknown phase 'train'; valid choices: \['prefill', 'decode'\]"):
        Workload(phase="train")
    with pytest.raises(ValueError, match="decode needs kv_len >= 1"):
        Workload(phase="decode")
    with pytest.raises(ValueError, match=r"unknown dtype 'fp64'"):
        Workload(dtype="fp64")
