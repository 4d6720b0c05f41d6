"""Profilers on the three backends, run for real on this machine's CPU (small blocks, few repeats)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hwprune.cost_models import BlockSpec, LatencyTable, TableModel, Workload
from hwprune.cost_models.profilers import (
    PROFILERS as BACKENDS,  # by backend name (PROFILERS below: the suite's)
)
from hwprune.cost_models.profilers import (
    JaxProfiler,
    OnnxRuntimeProfiler,
    Profiler,
    ProfilerSettings,
    ReferenceBlock,
    Timing,
    TorchProfiler,
    block_graph,
    interleaved,
    nvml_metadata,
    repeat_timed,
    torch_device,
    torch_timer,
)

SPEC = BlockSpec(
    hidden=64, head_dim=16, heads=4, kv_heads=2, mlp=96, num_layers=2, gated_mlp=True, norm="rmsnorm"
)
WORKLOAD = Workload(batch_size=2, seq_len=8, dtype="fp32")
DECODE = Workload(batch_size=2, seq_len=1, dtype="fp32", phase="decode", kv_len=16)


def check_table(table: LatencyTable, units: list[int], mlp: list[int]) -> None:
    assert len(table.frame) == len(units) * len(mlp)
    assert (table.frame["latency_ms"] > 0).all()
    assert (table.frame["p10_ms"] <= table.frame["latency_ms"]).all()
    assert (table.frame["latency_ms"] <= table.frame["p90_ms"]).all()
    assert set(table.frame["heads"]) == {u * SPEC.heads_per_unit for u in units}
    model = TableModel(table=table)
    assert model.source == "table"
    assert np.isfinite(model.predict(np.array([1, 2]), np.array([0, 96])).latency_ms)


def _jax() -> Profiler:
    pytest.importorskip("jax", reason="the JAX profiler is tested where jax is installed ('hwprune[jax]')")
    return JaxProfiler(platform="cpu", warmup=1, repeats=3)


PROFILERS: dict[str, Callable[[], Profiler]] = {
    "torch": lambda: TorchProfiler(device="cpu", warmup=1, repeats=3),
    "onnxruntime": lambda: OnnxRuntimeProfiler(
        execution_provider="CPUExecutionProvider", warmup=1, repeats=3
    ),
    "jax": _jax,
}


@pytest.mark.parametrize("workload", [WORKLOAD, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize("backend", sorted(PROFILERS))
def test_profiler_conformance(backend: str, workload: Workload, tmp_path: Path) -> None:
    """Every profiler: a table of the grid asked for, positive ordered statistics, the shape, workload
    and profile it measured, metadata saying where and when, a file round trip, bad grids refused."""
    profiler = PROFILERS[backend]()
    table = profiler.profile(SPEC, workload, units_grid=[0, 1, 2], mlp_grid=[0, 48, 96], hardware="dev_x")
    check_table(table, [0, 1, 2], [0, 48, 96])
    assert table.spec == SPEC and table.workload == workload and table.hardware == "dev_x"
    assert table.meta["backend"] == backend and table.meta["date"] and table.meta["host_cpu"]
    assert table.base_ms >= 0
    again = LatencyTable.load(table.save(tmp_path / "t.csv"))
    assert again.spec == table.spec and again.workload == table.workload
    # The CSV keeps 6 significant digits (`LatencyTable.save`): 0.5 ns at 1 ms, 50 ns at 100 ms.
    np.testing.assert_allclose(again.frame["latency_ms"], table.frame["latency_ms"], rtol=5e-6, atol=0)
    with pytest.raises(ValueError, match=r"units_grid needs >= 2 distinct values in \[0, 2\], got \[0, 5\]"):
        profiler.profile(SPEC, workload, units_grid=[0, 5], mlp_grid=[0, 96], hardware="dev_x")


def test_torch_profiler_validates() -> None:
    with pytest.raises(ValueError, match=r"unknown torch device 'tpu'; valid choices"):
        TorchProfiler(device="tpu")
    with pytest.raises(ValueError, match=r"units_grid needs >= 2 distinct values in \[0, 2\], got \[0, 5\]"):
        TorchProfiler(repeats=1).profile(SPEC, WORKLOAD, units_grid=[0, 5], mlp_grid=[0, 96], hardware="x")
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        TorchProfiler(repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            TorchProfiler(device="cuda")


def test_torch_profiler_stacks_blocks_and_reports_per_block_time() -> None:
    import time

    built: list[tuple[int, int]] = []

    class Sleeper(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.005)
            return x

    def factory(spec: object, units: int, mlp: int) -> torch.nn.Module:
        built.append((units, mlp))
        return Sleeper()

    profiler = TorchProfiler(block_factory=factory, warmup=0, repeats=2, stack=3)
    t = profiler.measure_block(SPEC, WORKLOAD, units=1, mlp=96)
    assert built == [(1, 96)] * 3
    assert 4.9 <= t.median_ms < 15.0  # three 5 ms blocks per call, reported per block
    assert profiler.metadata()["stack"] == 3
    with pytest.raises(ValueError, match="stack must be >= 1, got 0"):
        TorchProfiler(stack=0)


def test_interleaved_calls_every_timer_once_per_round_in_shuffled_orders() -> None:
    calls: list[int] = []

    def timer(k: int) -> Callable[[], float]:
        def run() -> float:
            calls.append(k)
            return float(10 * k + len(calls))

        return run

    samples = interleaved([timer(0), timer(1), timer(2)], rounds=6, warmup=2, seed=3)
    assert calls[:6] == [0, 0, 1, 1, 2, 2]  # warm-up, untimed
    timed = calls[6:]
    rounds = [timed[i : i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # orders change from round to round
    assert [len(s) for s in samples] == [6, 6, 6]
    # Each timer's samples are its own returns, in round order.
    for k, ks in enumerate(samples):
        assert all(10 * k <= v < 10 * k + 25 for v in ks) and ks == sorted(ks)
    calls.clear()
    interleaved([timer(0), timer(1), timer(2)], rounds=6, warmup=2, seed=3)
    assert calls[6:] == timed  # the seed fixes the orders
    with pytest.raises(ValueError, match="need rounds >= 1 and warmup >= 0, got rounds=0, warmup=1"):
        interleaved([timer(0)], rounds=0)


def test_torch_timer_times_a_run_on_cpu_and_validates_the_device() -> None:
    import time

    ran: list[bool] = []

    def run() -> None:
        ran.append(torch.is_inference_mode_enabled())
        time.sleep(0.004)

    ms = torch_timer(run, "cpu")()
    assert ran == [True] and 3.9 <= ms < 50.0
    assert torch_device("cpu") == torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"device 'cuda:{gpus}' requested but torch sees"):
        torch_device(f"cuda:{gpus}")  # one past the last GPU this process has (there may be none)
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(ValueError, match=rf"unknown torch device '{bad}'; valid choices: 'cpu', 'cuda'"):
            torch_timer(run, bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' requested but torch sees no CUDA device"):
            torch_device("cuda:1")


def test_reference_block_skips_empty_sublayers() -> None:
    x = torch.randn(2, 5, 64)
    empty = ReferenceBlock(SPEC, units=0, mlp=0)
    assert torch.equal(empty(x), x)
    full = ReferenceBlock(SPEC, units=2, mlp=96)
    assert full(x).shape == x.shape
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in empty.parameters())


def test_backend_specific_metadata() -> None:
    assert (
        PROFILERS["torch"]()
        .profile(SPEC, WORKLOAD, units_grid=[0, 2], mlp_grid=[0, 96], hardware="x")
        .meta["device"]
        == "cpu"
    )
    ort_table = PROFILERS["onnxruntime"]().profile(
        SPEC, WORKLOAD, units_grid=[0, 2], mlp_grid=[0, 96], hardware="x"
    )
    assert ort_table.meta["execution_provider"] == "CPUExecutionProvider"


def test_onnx_block_graph_is_valid_for_every_shape() -> None:
    import onnx
    import onnxruntime as ort

    for units, mlp, workload in [(2, 96, WORKLOAD), (0, 96, WORKLOAD), (1, 0, DECODE), (0, 0, WORKLOAD)]:
        model = block_graph(SPEC, workload, units=units, mlp=mlp)
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ones((workload.batch_size, workload.seq_len, SPEC.hidden), np.float32)
        (out,) = session.run(None, {"x": x})
        assert out.shape == x.shape and np.isfinite(out).all()


def test_onnxruntime_unknown_provider_lists_available() -> None:
    with pytest.raises(
        ValueError, match=r"'QNNExecutionProvider' is not in this onnxruntime build; available: \["
    ):
        OnnxRuntimeProfiler(execution_provider="QNNExecutionProvider")


def test_timing_statistics() -> None:
    timing = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median_ms, timing.p10_ms, timing.p90_ms, timing.repeats) == (3.0, 1.0, 5.0, 5)
    calls: list[int] = []

    def run() -> float:
        calls.append(1)
        return float(len(calls))

    result = repeat_timed(run, warmup=2, repeats=3)
    assert len(calls) == 5 and result.median_ms == 4.0


def test_nvml_metadata_reads_the_device_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    class NVMLError(Exception):
        pass

    def fake_nvml(*, init_fails: bool) -> types.ModuleType:
        nvml = types.ModuleType("pynvml")
        nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
        nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 0, 1, 0  # type: ignore[attr-defined]

        def init() -> None:
            if init_fails:
                raise NVMLError("Driver Not Loaded")

        calls = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetHandleByIndex": lambda i: f"gpu{i}",
            "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=80 * 2**30),
            "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",
            "nvmlSystemGetDriverVersion": lambda: "560.35",
            "nvmlDeviceGetClockInfo": lambda h, c: 1980 if c == 0 else 2619,
            "nvmlDeviceGetMaxClockInfo": lambda h, c: 1980 if c == 0 else 2619,
            "nvmlDeviceGetPowerManagementLimit": lambda h: 700_000,
            "nvmlDeviceGetTemperature": lambda h, t: 41,
        }
        for name, fn in calls.items():
            setattr(nvml, name, fn)
        return nvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_fails=False))
    meta = nvml_metadata(0)
    assert meta["name"] == "NVIDIA H100 80GB HBM3" and meta["driver"] == "560.35"
    assert (
        meta["power_limit_w"] == 700.0
        and meta["memory_total_mib"] == 80 * 1024
        and meta["temperature_c"] == 41
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_fails=True))
    assert nvml_metadata(0) == {"error": "NVML unavailable: Driver Not Loaded"}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import` sees when the package is absent
    assert nvml_metadata(0)["error"].startswith("nvidia-ml-py not importable")


def test_profile_rounds_interleave_the_grid_and_time_the_reference_each_round() -> None:
    calls: list[tuple[int, int, int]] = []

    class Fake(Profiler):
        backend = "fake"

        @classmethod
        def configured(cls, settings: ProfilerSettings) -> Profiler:
            return cls(warmup=settings.warmup, repeats=settings.repeats)

        def measure_block(self, spec: object, workload: object, *, units: int, mlp: int) -> Timing:
            calls.append((units, mlp, self.repeats))
            return Timing.of([float(units + mlp)] * self.repeats)

    assert BACKENDS.pop("fake") is Fake  # registered by being defined; the other tests see the shipped ones

    # Warmed up like a grid point, then timed per round as often as a grid point.
    references = iter([100.0, 1.0, 1.0, 2.0, 2.0, 3.0, 50.0])
    profiler = Fake(warmup=1, repeats=6, seed=1)
    table = profiler.profile(
        SPEC,
        WORKLOAD,
        units_grid=[0, 2],
        mlp_grid=[0, 96],
        hardware="x",
        rounds=3,
        references={"dense_model": lambda: next(references)},
    )
    assert len(calls) == 4 * 3 and {c[2] for c in calls} == {2}  # 6 repeats split over 3 rounds
    assert len({tuple(calls[i * 4 : (i + 1) * 4]) for i in range(3)}) > 1  # a fresh order per round
    assert profiler.repeats == 6  # restored
    assert table.frame["repeats"].tolist() == [6, 6, 6, 6]
    assert table.frame["latency_ms"].tolist() == [0.0, 96.0, 2.0, 98.0]
    assert table.meta["dense_model_ms"] == 2.0 and table.meta["rounds"] == 3
    assert next(references, None) is None  # 1 warm-up + 2 per round
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        profiler.profile(SPEC, WORKLOAD, units_grid=[0, 2], mlp_grid=[0, 96], hardware="x", rounds=0)


def test_each_backend_makes_its_profiler_from_the_settings_it_uses() -> None:
    from hwprune import cost_models
    from hwprune.cost_models.profilers import profiler_for
    from hwprune.errors import ConfigError

    assert (
        set(BACKENDS) == set(cost_models.BACKENDS) == {"torch", "jax", "onnxruntime"}
    )  # profiles name these
    made = profiler_for("torch", ProfilerSettings(warmup=2, repeats=3, threads=1, stack=4))
    assert isinstance(made, TorchProfiler)
    assert (made.warmup, made.repeats, made.threads, made.stack) == (2, 3, 1, 4)
    ort = profiler_for("onnxruntime", ProfilerSettings(repeats=7))
    assert isinstance(ort, OnnxRuntimeProfiler) and (ort.provider, ort.threads, ort.repeats) == (
        "CPUExecutionProvider",
        0,
        7,
    )
    with pytest.raises(
        ConfigError, match=r"backend 'tpu' has no profiler; valid: \['jax', 'onnxruntime', 'torch'\]"
    ):
        profiler_for("tpu", ProfilerSettings())
