"""`hwprune-profile`: every backend path from a hardware profile, on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hwprune import cost_models
from hwprune.search.config import ProfileAppConfig, compose
from hwprune.search.profile_app import run

TINY = ["profiler.repeats=2", "profiler.warmup=1", "profiler.unit_step=6", "profiler.mlp_step=768"]


def config(tmp_path: Path, *overrides: str) -> ProfileAppConfig:
    app = OmegaConf.to_object(compose("profile", [*TINY, f"out={tmp_path / 't.csv'}", *overrides]))
    assert isinstance(app, ProfileAppConfig)
    return app


def test_torch_cpu_profiles_real_model_layers(tmp_path: Path) -> None:
    table = run(config(tmp_path, "hardware=cpu_local", "workload.seq_len=16"), command="test")
    loaded = cost_models.LatencyTable.load(tmp_path / "t.csv")
    assert len(loaded.frame) == 9  # units {0, 6, 12} x mlp {0, 768, 1536}
    assert loaded.meta["block"] == "BertModel.layer0" and loaded.meta["command"] == "test"
    assert loaded.meta["dense_model_ms"] > loaded.meta["empty_model_ms"] > 0
    # the CSV keeps 6 significant digits, so the re-derived base agrees to that precision
    assert loaded.base_ms == pytest.approx(cost_models.TableModel(table=loaded).base_ms, rel=1e-4, abs=1e-5)
    assert loaded.workload == table.workload and loaded.workload.dtype == "fp32"  # "auto" resolved
    assert cost_models.TableModel(table=loaded).dense_ms() > 0


def test_onnxruntime_backend_profiles_a_reference_block(tmp_path: Path) -> None:
    table = run(
        config(
            tmp_path,
            "hardware=edge_tpu",
            "workload.seq_len=16",
            "workload.dtype=fp32",
            "hardware.dtypes=[int8,fp32]",
            "+hardware.peak_tflops.fp32=1.0",
        ),
        command="test",
    )
    assert (
        table.meta["backend"] == "onnxruntime" and table.meta["execution_provider"] == "CPUExecutionProvider"
    )
    assert (table.frame.latency_ms > 0).all()


def test_devices_absent_here_fail_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'QNNExecutionProvider' is not in this onnxruntime build; available"
    ):
        run(config(tmp_path, "hardware=npu_hexagon", "workload.dtype=fp16"), command="test")
    with pytest.raises(ValueError, match=r"JAX has no 'tpu' device here"):
        run(config(tmp_path, "hardware=tpu_v5e", "workload.dtype=fp32"), command="test")
    assert not (tmp_path / "t.csv").exists()
