"""Cost models: the conformance suite every implementation passes, and each model's own contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hwprune import cost_models
from hwprune.cost_models import AnalyticalModel, BlockSpec, LatencyTable, TableModel, Workload
from hwprune.search.config import load_hardware as load_profile
from tests.test_configs import PROFILES

MINILM = BlockSpec(hidden=384, head_dim=32, heads=12, kv_heads=12, mlp=1536, num_layers=6)
LLAMA = BlockSpec(
    hidden=512, head_dim=64, heads=8, kv_heads=2, mlp=1408, num_layers=4, gated_mlp=True, norm="rmsnorm"
)


MIXTRAL = BlockSpec(
    hidden=256,
    head_dim=32,
    heads=8,
    kv_heads=2,
    mlp=0,
    num_layers=4,
    gated_mlp=True,
    norm="rmsnorm",
    experts=8,
    top_k=2,
    expert_width=512,
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
    return LatencyTable(frame=frame, spec=spec, workload=workload, hardware="gpu_a100", base_ms=0.25)


Builder = Callable[[BlockSpec, Workload], cost_models.CostModel]


def table_builder(fit: str) -> Builder:
    """A device with a profiled table at exactly the requested shape and workload."""

    def build(spec: BlockSpec, workload: Workload) -> cost_models.CostModel:
        profile = replace(load_profile("gpu_a100"), table_fit=fit)
        table = synthetic_table(spec, profile.resolve_workload(workload), step=128)
        return cost_models.cost_model_for(profile, spec, workload, tables=[table])

    return build


def calibrated_builder(spec: BlockSpec, workload: Workload) -> cost_models.CostModel:
    """A device profiled for MiniLM at two workloads, asked for any other shape or workload."""
    tables = [synthetic_table(MINILM, Workload(batch_size=b, seq_len=128, dtype="bf16")) for b in (1, 32)]
    return cost_models.cost_model_for(load_profile("gpu_a100"), spec, workload, tables=tables)


def analytical_builder(name: str) -> Builder:
    def build(spec: BlockSpec, workload: Workload) -> cost_models.CostModel:
        return cost_models.cost_model_for(load_profile(name), spec, workload)

    return build


def all_builders() -> list[tuple[str, Builder, BlockSpec, Workload]]:
    """(id, how a user gets the model, block shape, workload) for every source and device."""
    prefill = Workload(batch_size=8, seq_len=128, dtype="auto")
    bf16 = Workload(batch_size=8, seq_len=128, dtype="bf16")
    decode = Workload(batch_size=4, seq_len=1, dtype="bf16", phase="decode", kv_len=512)
    cases: list[tuple[str, Builder, BlockSpec, Workload]] = [
        (f"analytical-{name}", analytical_builder(name), MINILM, prefill)
        for name in PROFILES
        if name != "cpu_local"  # measured peaks; covered by test_cpu_local_uses_measured_peaks
    ]
    cases += [(f"table-{fit}", table_builder(fit), MINILM, bf16) for fit in cost_models.TABLE_FITS]
    cases += [
        ("calibrated", calibrated_builder, MINILM, replace(bf16, seq_len=256)),
        ("calibrated-gqa", calibrated_builder, LLAMA, bf16),
        ("analytical-gqa", analytical_builder("gpu_h100"), LLAMA, bf16),
        ("analytical-decode", analytical_builder("gpu_h100"), LLAMA, decode),
        ("calibrated-decode", calibrated_builder, LLAMA, decode),
        ("analytical-moe", analytical_builder("gpu_h100"), MIXTRAL, bf16),
        ("analytical-moe-decode", analytical_builder("gpu_h100"), MIXTRAL, decode),
        ("calibrated-moe", calibrated_builder, MIXTRAL, bf16),
    ]
    return cases


BUILDERS = all_builders()


@pytest.mark.parametrize(("name", "build", "spec", "workload"), BUILDERS, ids=[c[0] for c in BUILDERS])
def test_conformance(name: str, build: Builder, spec: BlockSpec, workload: Workload) -> None:
    model = build(spec, workload)
    assert model.source in name  # each case exercises the source it is named for
    rng = np.random.default_rng(0)
    units = rng.integers(0, spec.units + 1, size=(50, spec.num_layers))
    mlp = rng.integers(0, spec.mlp + 1, size=(50, spec.num_layers))
    pred = model.predict(units, mlp)
    # Finite, positive, one per configuration, labelled with its source, hardware and workload.
    assert pred.latency_ms.shape == (50,)
    assert np.isfinite(pred.latency_ms).all() and (pred.latency_ms > 0).all()
    assert pred.source in cost_models.SOURCES and pred.source == model.source
    assert pred.hardware == model.hardware
    assert pred.workload == model.workload == load_profile(model.hardware).resolve_workload(workload)
    assert model.spec == spec
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
    # A dropped layer costs nothing, an empty one still its norms and residuals; dropping every
    # layer leaves the cost outside the blocks.
    dropped = rng.random((50, spec.num_layers)) < 0.3
    shallower = model.predict(units, mlp, dropped=dropped).latency_ms
    blocks = model.block_latency_ms(units, mlp)
    np.testing.assert_allclose(shallower, pred.latency_ms - (blocks * dropped).sum(-1), rtol=1e-12)
    zeros = np.zeros(spec.num_layers, dtype=int)
    assert float(model.predict(zeros, zeros)) > float(model.predict(zeros, zeros, dropped=zeros == 0))
    assert float(model.predict(zeros, zeros, dropped=zeros == 0)) == pytest.approx(model.base_ms)


@pytest.mark.parametrize(("name", "build", "spec", "workload"), BUILDERS, ids=[c[0] for c in BUILDERS])
def test_conformance_latency_moves_with_the_workload_and_the_shape(
    name: str, build: Builder, spec: BlockSpec, workload: Workload
) -> None:
    """More sequences, more tokens or a longer cache cost more; another block shape costs otherwise."""
    dense = build(spec, workload).dense_ms()
    length = "kv_len" if workload.phase == "decode" else "seq_len"
    for field, factor in (("batch_size", 4), (length, 4)):
        bigger = replace(workload, **{field: getattr(workload, field) * factor})
        grown = build(spec, bigger)
        assert grown.workload.describe() == load_profile(grown.hardware).resolve_workload(bigger).describe()
        assert grown.dense_ms() > dense, f"{field} x{factor} did not raise the latency"
    wider = replace(spec, hidden=2 * spec.hidden)
    assert build(wider, workload).dense_ms() > dense
    deeper = replace(spec, num_layers=spec.num_layers + 2)
    assert build(deeper, workload).dense_ms() > dense


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
    table = LatencyTable(frame=frame, spec=MINILM, workload=Workload(), hardware="cpu_local")
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


def test_calibration_recovers_known_efficiencies_and_predicts_other_workloads() -> None:
    profile = load_profile("gpu_a100")
    eff = cost_models.Efficiency(compute=0.35, attention=0.2, memory=0.5, overhead=2.0, half_rows=300.0)

    def truth(spec: BlockSpec, workload: Workload) -> AnalyticalModel:
        return AnalyticalModel(profile=profile, spec=spec, workload=workload, efficiency=eff)

    tables = []
    for batch in (1, 32):
        wl = Workload(batch_size=batch, seq_len=128, dtype="bf16")
        table = synthetic_table(MINILM, wl)
        frame = table.frame
        table.frame["latency_ms"] = truth(MINILM, wl).block_latency_ms(
            frame.units.to_numpy(), frame.mlp.to_numpy()
        )
        tables.append(table)
    # Another model and a workload no table has: the fit still answers with the truth.
    target = Workload(batch_size=4, seq_len=256, dtype="bf16")
    fitted = cost_models.calibrate(profile, tables, spec=LLAMA, workload=target)
    assert isinstance(fitted, cost_models.CalibratedModel) and fitted.source == "calibrated"
    assert fitted.spec == LLAMA and fitted.workload == target
    assert max(fitted.fit_error) < 0.01 and len(fitted.fitted_on) == 2
    units, mlp = np.array([0, 1, 2]), np.array([100, 1408, 900])
    np.testing.assert_allclose(
        fitted.block_latency_ms(units, mlp), truth(LLAMA, target).block_latency_ms(units, mlp), rtol=0.03
    )


def test_a_calibrated_model_reproduces_its_own_tables_within_its_fit_error() -> None:
    profile = load_profile("gpu_a100")
    noise = np.random.default_rng(1)
    tables = []
    for batch in (1, 8):
        table = synthetic_table(MINILM, Workload(batch_size=batch, seq_len=128, dtype="bf16"))
        table.frame["latency_ms"] *= noise.lognormal(0.0, 0.03, len(table.frame))
        tables.append(table)
    for i, table in enumerate(tables):
        model = cost_models.calibrate(profile, tables, spec=table.spec, workload=table.workload)
        frame = table.frame
        smooth = TableModel(table=table).block_latency_ms(frame.units.to_numpy(), frame.mlp.to_numpy())
        predicted = model.block_latency_ms(frame.units.to_numpy(), frame.mlp.to_numpy())
        error = float(np.sqrt(np.mean((predicted / smooth - 1) ** 2)))
        assert error == pytest.approx(model.fit_error[i], rel=1e-6)
        assert error < 0.05  # the 3 % noise is averaged away; the roofline holds the rest


def test_calibration_rejects_what_it_cannot_fit() -> None:
    profile = load_profile("gpu_a100")
    with pytest.raises(ValueError, match="calibrating gpu_a100 needs at least one profiled table, got none"):
        cost_models.calibrate(profile, [], spec=MINILM, workload=Workload(dtype="bf16"))
    other = replace(synthetic_table(MINILM, Workload(dtype="bf16")), hardware="gpu_h100")
    with pytest.raises(ValueError, match="a table of 'gpu_h100' cannot calibrate 'gpu_a100'"):
        cost_models.calibrate(profile, [other], spec=MINILM, workload=Workload(dtype="bf16"))


def test_factory_prefers_table_then_calibrated_then_analytical() -> None:
    wl = Workload(batch_size=8, seq_len=128, dtype="bf16")
    profile = load_profile("gpu_a100")
    tables = [synthetic_table(MINILM, wl)]
    assert cost_models.cost_model_for(profile, MINILM, wl, tables=tables).source == "table"
    other = cost_models.cost_model_for(profile, MINILM, replace(wl, batch_size=1), tables=tables)
    assert other.source == "calibrated" and other.workload.batch_size == 1
    assert cost_models.cost_model_for(profile, LLAMA, wl, tables=tables).source == "calibrated"
    assert cost_models.cost_model_for(profile, MINILM, wl).source == "analytical"
    with pytest.raises(ValueError, match="a table of 'gpu_a100' was passed for hardware 'gpu_h100'"):
        cost_models.cost_model_for(load_profile("gpu_h100"), MINILM, wl, tables=tables)


def test_regression_calibrated_model_answers_the_requested_model_and_workload() -> None:
    """Was: the fallback returned a model of the table's own spec and workload (issue 17).

    A 3-layer model crashed (`need matching (..., 6) widths`), and MiniLM at batch 8 x 64 and at
    batch 64 x 512 both "predicted" the batch-1 table's dense latency, labelled calibrated.
    """
    profile = replace(load_profile("cpu_local"), peak_tflops={"fp32": 0.15, "bf16": 0.4}, measure_peaks=False)
    tables = [
        replace(synthetic_table(MINILM, Workload(batch_size=b, dtype="fp32")), hardware="cpu_local")
        for b in (1, 32)
    ]
    small = replace(LLAMA, num_layers=3)
    model = cost_models.cost_model_for(profile, small, Workload(), tables=tables)
    pred = model.predict(np.full(3, 2), np.full(3, 700))
    assert pred.source == "calibrated" and np.isfinite(pred.latency_ms)
    b8 = cost_models.cost_model_for(profile, MINILM, Workload(batch_size=8, seq_len=64), tables=tables)
    b64 = cost_models.cost_model_for(profile, MINILM, Workload(batch_size=64, seq_len=512), tables=tables)
    table_dense = cost_models.TableModel(table=tables[0]).dense_ms()
    assert b8.dense_ms() != pytest.approx(table_dense, rel=0.05)
    assert b64.dense_ms() > 20 * b8.dense_ms()  # 64x the tokens, and 8x the attention per token
    assert b8.predict(np.full(6, 12), np.full(6, 1536)).workload == Workload(batch_size=8, seq_len=64)


def test_load_tables_keeps_only_this_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    here = {"host_cpu": cost_models.cpu_name(), "threads": torch.get_num_threads()}
    paths = {}
    for name, meta in {
        "here": here,
        "other_cpu": {**here, "host_cpu": "Some Other CPU"},
        "other_threads": {**here, "threads": here["threads"] + 7},
    }.items():
        table = replace(synthetic_table(MINILM, Workload()), hardware="cpu_local", meta=meta)
        paths[name] = str(table.save(tmp_path / f"{name}.csv"))
    profile = replace(load_profile("cpu_local"), tables=[*paths.values(), str(tmp_path / "missing.csv")])
    with caplog.at_level("INFO"):
        tables = cost_models.load_tables(profile)
    assert [t.meta for t in tables] == [here]
    assert "Some Other CPU" in caplog.text and "missing.csv, which does not exist" in caplog.text
    gpu_table = synthetic_table(MINILM, Workload(dtype="bf16")).save(tmp_path / "a100.csv")
    assert len(cost_models.load_tables(replace(load_profile("gpu_a100"), tables=[str(gpu_table)]))) == 1
    wrong = replace(load_profile("gpu_h100"), tables=[str(gpu_table)])
    assert cost_models.load_tables(wrong) == []


def test_tables_of_several_machines_sit_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A glob entry finds every machine's directory; only this machine's tables are used."""
    import torch

    here = {"host_cpu": cost_models.cpu_name(), "threads": torch.get_num_threads()}
    key = cost_models.machine_key()
    assert key.endswith(f"-x{torch.get_num_threads()}") and "/" not in key and " " not in key
    assert cost_models.table_dir("cpu_local", "cpu") == f"cpu_local/{key}"
    assert cost_models.table_dir("gpu_h100", "gpu") == "gpu_h100"
    for machine, meta in {key: here, "other-cpu-x2": {**here, "host_cpu": "Other CPU"}}.items():
        for batch in (1, 8):
            table = replace(
                synthetic_table(MINILM, Workload(batch_size=batch)), hardware="cpu_local", meta=meta
            )
            table.save(tmp_path / "cpu_local" / machine / f"minilm_b{batch}_s128.csv")
    shipped = cost_models.find_tables("cpu_local/*/*.csv")  # from the package: nothing here has it
    assert len(shipped) >= 6 and all(p.parent.parent.name == "cpu_local" for p in shipped)
    monkeypatch.chdir(tmp_path)  # a relative entry is read from the working directory first
    assert len(cost_models.find_tables("cpu_local/*/*.csv")) == 4
    assert cost_models.find_tables("cpu_local/nothing-*/*.csv") == []
    profile = replace(load_profile("cpu_local"), tables=["cpu_local/*/*.csv"])
    tables = cost_models.load_tables(profile)
    assert sorted(t.workload.batch_size for t in tables) == [1, 8]
    assert all(t.meta == here for t in tables)


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


def test_decode_is_one_new_token_and_as_fast_as_its_bytes() -> None:
    """Issue 17: a decode step was priced as a compute-bound 128-row tile (1.05x where bytes say 1.14x)."""
    assert Workload(phase="decode", kv_len=2048).seq_len == 1 and Workload().seq_len == 128
    assert Workload(phase="decode", kv_len=2048, seq_len=4).tokens == 4
    spec = BlockSpec(
        hidden=4096,
        head_dim=128,
        heads=32,
        kv_heads=8,
        mlp=14336,
        num_layers=32,
        gated_mlp=True,
        norm="rmsnorm",
    )
    workload = Workload(batch_size=1, phase="decode", kv_len=8192, dtype="bf16")
    h100 = load_profile("gpu_h100")
    model = AnalyticalModel(profile=h100, spec=spec, workload=workload)
    # Every GEMM of the step is memory-bound: its time is its bytes (plus one launch).
    ops = model.op_times(np.array(8), np.array(14336))
    launch = h100.launch_overhead_us * 1e-6
    for name, weights in (("q_proj", 4096 * 4096), ("k_proj", 4096 * 1024), ("mlp_up", 4096 * 14336)):
        memory = 2 * (weights + 4096 + (weights // 4096)) / (h100.memory_bandwidth_gbs * 1e9 * 0.8)
        assert float(ops[name]) == pytest.approx(memory + launch, rel=0.01), name
    # Without launch overhead (CUDA graphs), halving the KV groups saves what the bytes say.
    model = AnalyticalModel(
        profile=h100, spec=spec, workload=workload, efficiency=cost_models.Efficiency(overhead=0.0)
    )

    def block_bytes(units: int) -> int:
        # Weights of Q/K/V/O and the MLP; the K and V cache read by attention, and read + written
        # again by DynamicCache's append (three passes in all).
        heads = units * spec.heads_per_unit
        weights = spec.hidden * spec.head_dim * (2 * heads + 2 * units) + 3 * spec.hidden * spec.mlp
        return 2 * (weights + 3 * 2 * units * workload.kv_len * spec.head_dim)

    ratio = float(
        model.block_latency_ms(np.array(8), np.array(14336))
        / model.block_latency_ms(np.array(4), np.array(14336))
    )
    assert ratio == pytest.approx(block_bytes(8) / block_bytes(4), rel=0.03)
    # A 4x longer cache costs attention what its three passes over the extra bytes take.
    longer = AnalyticalModel(
        profile=h100, spec=spec, workload=replace(workload, kv_len=32768), efficiency=model.efficiency
    )
    grown = float(
        longer.block_latency_ms(np.array(8), np.array(0)) - model.block_latency_ms(np.array(8), np.array(0))
    )
    cache_ms = 3 * 2 * 2 * 8 * (32768 - 8192) * 128 / (3350e9 * 0.8) * 1e3  # three passes over K and V
    assert grown == pytest.approx(cache_ms, rel=0.1)


def test_moe_latency_follows_the_routed_experts() -> None:
    """Expert width costs every token's GEMMs; expert count costs the weights of experts that get
    tokens, so in a one-token decode step (top-2 of 8 touched) removing experts saves little."""
    profile = load_profile("gpu_h100")
    # Mixtral-8x7B's block: at the toy shape above every expert GEMM is one kernel launch.
    big = replace(MIXTRAL, hidden=4096, head_dim=128, heads=32, kv_heads=8, expert_width=14336)
    n = big.num_layers
    units, mlp = np.full(n, big.units), np.zeros(n, dtype=int)
    for workload in (
        Workload(batch_size=8, seq_len=128, dtype="bf16"),
        Workload(dtype="bf16", phase="decode", kv_len=512),
    ):
        model = AnalyticalModel(profile=profile, spec=big, workload=workload)
        widths = np.arange(8, 14337, 8)
        block = model.block_latency_ms(
            np.full_like(widths, 2), np.zeros_like(widths), np.full_like(widths, 8), widths
        )
        assert (np.diff(block) >= -1e-12).all() and block[-1] > block[0]
        counts = np.arange(2, 9)
        block = model.block_latency_ms(
            np.full_like(counts, 2), np.zeros_like(counts), counts, np.full_like(counts, 14336)
        )
        # In decode more experts are more weights read; in prefill the count changes how the same
        # tokens split into per-expert GEMMs, whose waves need not fall monotonically.
        assert workload.phase != "decode" or (np.diff(block) >= -1e-12).all()
        assert block[-1] > block[0]
        dense = model.dense_ms()
        assert float(model.predict(units, mlp)) == pytest.approx(dense)
        fewer = dense / float(model.predict(units, mlp, experts=np.full(n, 4)))
        narrower = dense / float(model.predict(units, mlp, expert_width=np.full(n, 7168)))
        if workload.phase == "decode":  # 2 of 8 experts touched either way: the count barely matters
            assert fewer < 1.05 < narrower
        else:  # every expert gets tokens: half of them is half the expert weights read
            assert fewer > 1.0 and narrower > 1.0
    with pytest.raises(ValueError, match=r"experts widths must lie in \[2, 8\], got range \[1, 8\]"):
        model.predict(units, mlp, experts=np.array([1, 8, 8, 8]))
    dense_model = AnalyticalModel(profile=profile, spec=LLAMA, workload=Workload(dtype="bf16"))
    with pytest.raises(ValueError, match="experts and expert_width apply to mixture-of-experts blocks"):
        dense_model.predict(np.full(LLAMA.num_layers, 1), np.full(LLAMA.num_layers, 1), experts=2)


def test_moe_params_and_flops_count_every_expert_and_each_tokens_top_k() -> None:
    s = MIXTRAL
    attention = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
    assert s.params(s.units, 0) == pytest.approx(attention + s.hidden * 8 * (3 * 512 + 1))
    assert s.params(s.units, 0, experts=4, expert_width=256) == pytest.approx(
        attention + s.hidden * 4 * (3 * 256 + 1)
    )
    wl = Workload(batch_size=1, seq_len=10, dtype="bf16")
    flops = s.flops(wl, np.full(4, s.units), np.zeros(4), np.full(4, 4), np.full(4, 256))
    per_token = 2 * (attention + 2 * 3 * s.hidden * 256 + 4 * s.hidden) + 2 * 2 * 10 * s.head_dim * s.heads
    assert float(flops) == pytest.approx(4 * 10 * per_token)
    with pytest.raises(ValueError, match="needs 1 <= top_k <= experts and expert_width >= 1"):
        replace(s, top_k=9)


def test_calibration_scales_the_outside_of_the_tables_model_only() -> None:
    """Regression: a MiniLM table whose measured time outside the blocks is 20x the roofline's set
    that factor for a Mixtral-like model too, and its calibrated prefill speedups came out 2.3x low
    (results/benchmarks/moe_mixtral_analytical.md vs the first calibrated run)."""
    profile = load_profile("gpu_a100")
    bf16 = Workload(batch_size=8, seq_len=128, dtype="bf16")
    table = synthetic_table(MINILM, bf16)
    modelled = AnalyticalModel(profile=profile, spec=MINILM, workload=bf16).base_ms
    table = replace(table, base_ms=20 * modelled)
    own = cost_models.calibrate(profile, [table], spec=MINILM, workload=replace(bf16, batch_size=4))
    other = cost_models.calibrate(profile, [table], spec=MIXTRAL, workload=bf16)
    assert own.efficiency.outside == pytest.approx(20.0, rel=0.05)
    assert other.efficiency.outside == 1.0
    assert other.base_ms == pytest.approx(
        AnalyticalModel(profile=profile, spec=MIXTRAL, workload=bf16, efficiency=other.efficiency).base_ms
    )


def test_width_grid_steps_from_the_start_and_ends_at_the_dense_width() -> None:
    assert cost_models.width_grid(96, 32) == (0, 32, 64, 96)
    assert cost_models.width_grid(100, 32, start=8) == (8, 40, 72, 100)
    assert cost_models.width_grid(0, 16) == (0,)
    with pytest.raises(ValueError, match="width step must be >= 1, got 0"):
        cost_models.width_grid(96, 0)


def test_calibration_fits_the_dtype_it_predicts_where_that_dtype_was_measured() -> None:
    """Tables of two dtypes of one device (AMX bf16 tiles and AVX-512 fp32 run different kernels): a
    bf16 prediction at another batch is fitted to the bf16 tables alone, as if the others were not
    there."""
    profile = load_profile("gpu_a100")
    fp32 = synthetic_table(MINILM, Workload(batch_size=32, dtype="fp32"))
    bf16 = synthetic_table(MINILM, Workload(batch_size=32, dtype="bf16"))
    frame = bf16.frame.assign(**{c: bf16.frame[c] * 3.0 for c in ("latency_ms", "p10_ms", "p90_ms")})
    bf16 = replace(bf16, frame=frame, base_ms=bf16.base_ms * 3.0)  # a third of the datasheet's rate
    wanted = Workload(batch_size=8, dtype="bf16")
    both = cost_models.cost_model_for(profile, MINILM, wanted, tables=[fp32, bf16])
    alone = cost_models.cost_model_for(profile, MINILM, wanted, tables=[bf16])
    assert both.source == alone.source == "calibrated"
    assert both.dense_ms() == pytest.approx(alone.dense_ms())
    pooled = cost_models.calibrate(profile, [fp32, bf16], spec=MINILM, workload=wanted)  # the old fit
    assert pooled.dense_ms() != pytest.approx(alone.dense_ms(), rel=0.05)


def test_a_workload_of_a_set_dtype_names_its_tables_apart() -> None:
    assert Workload(batch_size=32, seq_len=128, dtype="auto").tag() == "b32_s128"
    assert Workload(batch_size=32, seq_len=128, dtype="bf16").tag() == "b32_s128_bf16"
    decode = Workload(batch_size=1, seq_len=1, phase="decode", kv_len=2048, dtype="int8")
    assert decode.tag() == "decode_b1_kv2048_int8"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, ["fp32", "bf16"]),
        ({"avx512f", "amx_bf16", "amx_tile"}, ["fp32", "bf16"]),
        ({"fp", "asimd", "bf16"}, ["fp32", "bf16"]),  # ARM's BF16 extension
        ({"avx2", "fma"}, ["fp32"]),  # bf16 would be emulated: slower than fp32, never a choice
        (set(), ["fp32", "bf16"]),  # flags unknown: the profile as written
    ],
)
def test_cpu_local_runs_the_dtypes_this_cpu_runs_natively(
    flags: set[str], expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import torch

    from hwprune.cost_models import _cpu_peaks

    key = f"{cost_models.cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    cache = tmp_path / "peaks.json"
    cache.write_text(json.dumps({key: {"fp32": 0.2, "bf16": 0.5, "bandwidth_gbs": 20.0}}))  # no measuring
    monkeypatch.setattr(_cpu_peaks, "cpu_flags", lambda: flags)
    profile = cost_models.local_profile(load_profile("cpu_local"), cache=cache)
    assert profile.dtypes == expected and profile.peak_tflops["fp32"] == 0.2
    assert profile.resolve_dtype("auto") == "fp32"
