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
    assert "dense_model_fp32_ms" not in loaded.meta  # the reference dtype's table is its own time base


def test_a_table_at_another_dtype_times_the_dense_model_at_the_reference_dtype_beside_it(
    tmp_path: Path,
) -> None:
    """What puts a bf16 table on the fp32 table's time base (`cost_models.session_scales`) and
    prices the casts at a bf16 block's edges (`cost_models.edge_costs`)."""
    run(config(tmp_path, "hardware=cpu_local", "workload.seq_len=16", "workload.dtype=bf16"), command="test")
    meta = cost_models.LatencyTable.load(tmp_path / "t.csv").meta
    assert meta["dense_model_fp32_ms"] > 0 and meta["dense_model_ms"] > 0
    assert meta["dense_model_blocks_ms"] > 0  # blocks at bf16 between fp32 layers, as plans deploy


def test_default_out_is_a_directory_of_this_machine_on_a_cpu() -> None:
    cpu = OmegaConf.to_object(compose("profile", ["hardware=cpu_local", "workload=b8_s128"]))
    gpu = OmegaConf.to_object(compose("profile", ["hardware=gpu_h100", "workload=b8_s128"]))
    assert isinstance(cpu, ProfileAppConfig) and isinstance(gpu, ProfileAppConfig)
    assert cpu.out == f"results/tables/cpu_local/{cost_models.machine_key()}/minilm_b8_s128.csv"
    assert gpu.out == "results/tables/gpu_h100/minilm_b8_s128.csv"
    # and the shipped profile's glob finds what lands there
    assert "cpu_local/*/*.csv" in cost_models.load_profile("cpu_local").tables


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


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=120,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_decode_tables_time_real_decode_steps_against_a_real_cache(tmp_path: Path, tiny_llama: Path) -> None:
    overrides = [
        f"model.source={tiny_llama}",
        "model.class_name=LlamaForCausalLM",
        "model.name=tiny",
        "profiler.unit_step=1",
        "profiler.mlp_step=48",
        "workload=decode_b1_kv2048",
        "workload.batch_size=2",
        "workload.kv_len=32",
    ]
    table = run(config(tmp_path, "hardware=cpu_local", *overrides), command="test")
    assert table.workload.phase == "decode" and table.workload.seq_len == 1 and table.workload.kv_len == 32
    assert table.spec.head_width == 120  # the LM head is priced outside the blocks
    assert len(table.frame) == 9 and (table.frame.latency_ms > 0).all()  # units {0, 1, 2} x mlp {0, 48, 96}
    assert table.meta["dense_model_ms"] > 0 and table.meta["block"] == "LlamaForCausalLM.layer0"


def test_model_timer_decode_steps_leave_the_cache_as_they_found_it(tiny_llama: Path) -> None:
    from hwprune import prunable
    from hwprune.search._blocks import RealBlock, model_timer, prefilled_cache

    model = prunable.load_model(str(tiny_llama), "LlamaForCausalLM")
    workload = cost_models.Workload(batch_size=3, phase="decode", kv_len=20)
    step = model_timer(model, workload, "cpu")
    assert step() > 0 and step() > 0
    cache = prefilled_cache(model, 3, 20)
    assert cache.get_seq_length() == 20
    block = RealBlock(model, prunable.pruned_block(model, 0, units=1, neurons=48))
    block.prepare_decode(3, 20)
    import torch

    with torch.no_grad():
        out = block(torch.randn(3, 1, 64))
        again = block(torch.randn(3, 1, 64))
    assert out.shape == again.shape == (3, 1, 64) and block.cache.get_seq_length() == 20
    bert = prunable.load_model(prunable.MINILM, "BertModel")
    with pytest.raises(
        ValueError, match=r"workload\.phase=decode needs a decoder .* BertModel \(bert\) is an encoder"
    ):
        model_timer(bert, workload, "cpu")


def test_moe_models_are_not_profiled_into_dense_tables(tmp_path: Path) -> None:
    import transformers

    mixtral = transformers.MixtralConfig(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=2,
        vocab_size=120,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    mixtral.save_pretrained(tmp_path / "mixtral")
    cfg = config(
        tmp_path,
        f"model.source=random:{tmp_path / 'mixtral' / 'config.json'}",
        "model.class_name=MixtralForCausalLM",
        "hardware=cpu_local",
    )
    with pytest.raises(ValueError, match="mixture-of-experts layers: tables are profiled over"):
        run(cfg, "test")
    assert not Path(cfg.out).exists()
