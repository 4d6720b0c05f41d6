"""`hwprune-apply`: turn a plan into a deployable model and check its speedup by measurement.

    hwprune-apply plan=results/runs/.../plans/trial_12.yaml out=deploy/minilm-pruned
    hwprune-apply plan=... out=... device=cuda workload.batch_size=32     # on the GPU it was searched for

Loads the model the plan names, checks its fingerprints, prunes it physically, saves the pruned
directory (`prunable.load_pruned`) and an ONNX export, evaluates the task metric of both models,
then times both on `device` (CPU or a CUDA GPU: median of interleaved rounds, each round timing
dense and pruned in a shuffled order). The figures go to `<out>/apply.json`. A plan whose model
cannot be found or does not match, or a device or dtype that cannot be timed, fails before anything
is written.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TORCH_DTYPES, interleaved, nvml_metadata, torch_device, torch_timer
from hwprune.search.config import TaskConfig, WorkloadConfig, build_task, register_configs

log = logging.getLogger("hwprune.apply")


@dataclass
class ApplyConfig:
    plan: str = MISSING
    out: str = MISSING
    task: TaskConfig = MISSING
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    device: str = "cpu"
    repeats: int = 20
    onnx: bool = True


def apply_config(*, plan: str | Path, out: str | Path, task: Any, **settings: Any) -> ApplyConfig:
    """An `ApplyConfig` for callers from Python, validated against the same schema as the CLI.

    Args:
        plan: Plan file.
        out: Output directory.
        task: A composed `task` config node (e.g. `search.compose("config", ["task=sts", ...]).task`).
        **settings: Other `ApplyConfig` fields (workload, device, repeats, onnx).
    """
    values: dict[str, Any] = {"task": task, "plan": str(plan), "out": str(out), **settings}
    merged = OmegaConf.merge(OmegaConf.structured(ApplyConfig), values)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ApplyConfig)
    return cfg


class _TextEncoder(torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden state: the signature ONNX export needs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def example_inputs(model: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    config = model.config
    if config.model_type == "vit":
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size)}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timing_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The dtype to time in: `dtype`, or for "auto" fp32 on CPU and bf16 (tensor cores) on CUDA."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype not in TORCH_DTYPES:
        raise ValueError(
            f"workload.dtype={dtype!r} cannot be timed with torch; valid choices: {sorted(TORCH_DTYPES)} or 'auto'"
        )
    return TORCH_DTYPES[dtype]


def measure_ms(
    models: list[torch.nn.Module],
    inputs: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> list[float]:
    """Median latency (ms) of each model on `device` in `dtype`, timed in interleaved rounds.

    Models and inputs move to the device and dtype in place, so call this after anything that needs
    them as they were (the task metric, the ONNX export).
    """
    feed = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    timers = []
    for model in models:
        model.to(device, dtype)
        timers.append(torch_timer(partial(model, **feed), device))
    samples = interleaved(timers, rounds=repeats, warmup=3)
    return [statistics.median(times) for times in samples]


def export_onnx(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    if "pixel_values" in inputs:
        wrapped: torch.nn.Module = model
        names = ["pixel_values"]
        args: tuple[torch.Tensor, ...] = (inputs["pixel_values"],)
        axes = {"pixel_values": {0: "batch"}}
    else:
        wrapped = _TextEncoder(model)
        names = ["input_ids", "attention_mask"]
        args = (inputs["input_ids"], inputs["attention_mask"])
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(
        wrapped.eval(),
        args,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=["output"],
        dynamic_axes=axes,
        opset_version=17,
    )


def device_metadata(device: torch.device) -> dict[str, Any]:
    """What the latencies were measured on: the CPU's name, or the GPU's with its NVML details."""
    if device.type == "cuda":
        index = device.index or 0
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "nvml": nvml_metadata(index)}
    return {"type": "cpu", "name": cost_models.cpu_name()}


def run(cfg: ApplyConfig) -> dict[str, Any]:
    plan = prunable.PrunePlan.load(cfg.plan)
    if plan.model.source is None:
        raise ValueError(f"{cfg.plan}: the plan names no model source, so there is nothing to load")
    device = torch_device(cfg.device)
    dtype = timing_dtype(device, cfg.workload.dtype)
    if cfg.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {cfg.repeats}")
    model = prunable.load_model(plan.model.source, plan.model.class_name)
    plan.check(prunable.discover(model), weights_fingerprint=prunable.weights_fingerprint(model))
    out = Path(cfg.out)

    pruned = prunable.apply_plan(copy.deepcopy(model), plan)
    prunable.save_pruned(pruned, plan, out)
    wl = cfg.workload
    inputs = example_inputs(model, wl.batch_size, wl.seq_len)
    if cfg.onnx:
        export_onnx(pruned, inputs, out / "model.onnx")

    task = build_task(cfg.task, plan.model.source)
    task.prepare(model)
    metric_dense, metric_pruned = task.evaluate(model), task.evaluate(pruned)
    dense_ms, pruned_ms = measure_ms([model, pruned], inputs, device=device, dtype=dtype, repeats=cfg.repeats)
    meta = dict(plan.metadata)
    predicted = None
    if meta.get("latency_ms") and meta.get("dense_latency_ms"):
        predicted = float(meta["dense_latency_ms"]) / float(meta["latency_ms"])
    result = {
        "plan": str(Path(cfg.plan).resolve()),
        "hardware": plan.hardware,
        "predicted_speedup": predicted,
        "predicted_for": {
            "hardware": plan.hardware,
            "workload": meta.get("workload"),
            "source": meta.get("latency_source"),
        },
        "measured_speedup": dense_ms / pruned_ms,
        "latency_ms_dense": dense_ms,
        "latency_ms_pruned": pruned_ms,
        "metric_dense": metric_dense,
        "metric_pruned": metric_pruned,
        "metric_name": task.metric_name,
        "workload": {
            **asdict(wl),
            "dtype": next(name for name, d in TORCH_DTYPES.items() if d == dtype),
            "device": device_metadata(device),
            "threads": torch.get_num_threads(),
            "repeats": cfg.repeats,
            "timing": f"median of {cfg.repeats} interleaved rounds ({'CUDA events' if device.type == 'cuda' else 'wall clock'})",
        },
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in pruned.parameters()),
        "onnx": str(out / "model.onnx") if cfg.onnx else None,
    }
    (out / "apply.json").write_text(json.dumps(result, indent=2))
    pred = f"{predicted:.2f}x" if predicted else "n/a"
    log.info(
        "speedup predicted %s (%s), measured %.2fx here (%.2f -> %.2f ms); %s %.3f -> %.3f; wrote %s",
        pred,
        plan.hardware,
        result["measured_speedup"],
        dense_ms,
        pruned_ms,
        task.metric_name,
        result["metric_dense"],
        result["metric_pruned"],
        out,
    )
    return result


@hydra.main(config_path="pkg://hwprune.conf", config_name="apply", version_base=None)
def main(cfg: DictConfig) -> None:
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, ApplyConfig)
    run(app)


def entry() -> None:
    register_configs()
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="apply_schema", node=ApplyConfig)
    main()
