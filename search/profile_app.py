"""`hwprune-profile`: measure a device's per-block latency table with the project's own profiler.

    hwprune-profile hardware=cpu_local workload=b32_s128
    hwprune-profile hardware=gpu_h100 workload=b32_s128 workload.dtype=bf16     # on the GPU machine

The backend comes from the hardware profile (torch / jax / onnxruntime). The table (CSV + JSON
sidecar with device metadata, NVML on NVIDIA) goes to `out`; list it under the profile's `tables`
to make the search use it.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import (
    Profiler,
    ProfilerSettings,
    profiler_for,
    steady_allocator,
    torch_threads,
)
from hwprune.errors import ConfigError, UnsupportedModelError
from hwprune.search._blocks import block_spec, head_width, model_timer, real_block_factory
from hwprune.search._cli import one_line_errors, run_app
from hwprune.search.config import ProfileAppConfig, to_object

log = logging.getLogger("hwprune.profile")


def make_profiler(cfg: ProfileAppConfig, model: torch.nn.Module) -> Profiler:
    """The profiler of the target's backend (`cost_models.profilers.PROFILERS`), set up from `cfg`."""
    hw, p = cfg.hardware, cfg.profiler
    settings = ProfilerSettings(
        device=hw.device,
        execution_provider=hw.execution_provider,
        warmup=p.warmup,
        repeats=p.repeats,
        threads=p.threads,
        stack=p.stack or prunable.discover(model).num_layers,
        block_factory=real_block_factory(model) if p.real_blocks and hw.backend == "torch" else None,
    )
    return profiler_for(hw.backend, settings)


def run(cfg: ProfileAppConfig, command: str) -> cost_models.LatencyTable:
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise ConfigError(
            f"out={cfg.out} already holds a table; pass overwrite=true to replace it, or another out="
        )
    profile = cfg.hardware.validate()
    # Timed forwards reuse freed activations instead of faulting fresh pages in (the table records it).
    steady_allocator()
    model = prunable.load_model(cfg.model.source, cfg.model.class_name)
    structure = prunable.discover(model)
    spec = block_spec(structure, head_width=head_width(model))
    if spec.experts:
        raise UnsupportedModelError(
            f"{cfg.model.name} has mixture-of-experts layers: tables are profiled over (attention units, MLP "
            "width) of dense blocks; MoE latency comes from the analytical or a calibrated model"
        )
    workload = cfg.workload.build()
    workload = profile.resolve_workload(workload)
    step = cfg.profiler.mlp_step or cost_models.width_step(profile, spec.mlp)
    units_grid = list(cost_models.width_grid(spec.units, cfg.profiler.unit_step))
    mlp_grid = list(cost_models.width_grid(spec.mlp, step))
    profiler = make_profiler(cfg, model)
    log.info(
        "profiling %s on %s: %d x %d grid, %s",
        cfg.model.name,
        profile.name,
        len(units_grid),
        len(mlp_grid),
        workload.describe(),
    )
    # With real blocks the whole model is timed beside the grid, each round, dense and with every
    # block emptied: the emptied model minus its empty blocks is the time outside the blocks
    # (embeddings, pooler, masks), a difference of small numbers measured under the grid's conditions.
    references = {}
    if profile.backend == "torch" and cfg.profiler.real_blocks:
        ref = prunable.model_ref(model, with_weights=False)
        empty_plan = prunable.PrunePlan.from_units(
            structure, ref, attention=[range(0)] * spec.num_layers, mlp=[range(0)] * spec.num_layers
        )
        empty = prunable.apply_plan(copy.deepcopy(model), empty_plan, check_weights=False)
        # At a dtype other than the device's first, the dense model at that one is timed too: the
        # common reference that puts this table on the time base of the first dtype's table, which
        # was profiled in another session of a machine whose speed drifts (`cost_models.session_scales`).
        first = profile.resolve_dtype("auto")
        if workload.dtype != first:
            at_first = replace(workload, dtype=first)
            references[f"dense_model_{first}"] = model_timer(copy.deepcopy(model), at_first, profile.device)
            # And the dense model as a plan deploys blocks at this dtype: each block between casts
            # from and back to the first dtype's stream (what `cost_models.edge_costs` prices).
            n = spec.num_layers
            deployed = prunable.PrunePlan.dense(structure, ref).with_precisions(
                [workload.dtype] * n, [workload.dtype] * n
            )
            blocks_at_dtype = prunable.set_precisions(
                prunable.apply_plan(copy.deepcopy(model), deployed, check_weights=False), deployed
            )
            references["dense_model_blocks"] = model_timer(blocks_at_dtype, at_first, profile.device)
        references |= {
            "dense_model": model_timer(model, workload, profile.device),
            "empty_model": model_timer(empty, workload, profile.device),
        }
    # The whole-model references run at the profiler's threads too (torch's own count outside).
    threads = cfg.profiler.threads if profile.backend == "torch" else None
    with torch_threads(threads):
        table = profiler.profile(
            spec,
            workload,
            units_grid=units_grid,
            mlp_grid=mlp_grid,
            hardware=profile.name,
            command=command,
            rounds=cfg.profiler.rounds,
            references=references,
        )
    # Stored for readers of the raw CSV; TableModel derives the same from the metadata.
    table.base_ms = cost_models.TableModel(table=table, fit=profile.table_fit).base_ms
    path = table.save(cfg.out)
    log.info("wrote %s (base %.3f ms outside the blocks)", path, table.base_ms)
    return table


def _interrupted() -> str:
    return "no table was written"


@hydra.main(config_path="pkg://hwprune.conf", config_name="profile", version_base=None)
@one_line_errors(interrupted=_interrupted)
def main(cfg: DictConfig) -> None:
    app = to_object(cfg)
    assert isinstance(app, ProfileAppConfig)
    run(app, command="hwprune-profile " + " ".join(sys.argv[1:]))


def entry() -> None:
    run_app("profile", main)


if __name__ == "__main__":  # `python -m hwprune.search.profile_app`, where the package is not installed
    entry()
