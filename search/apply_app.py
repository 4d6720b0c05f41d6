"""`hwprune-apply`: turn a plan into a deployable model and check its speedup by measurement.

    hwprune-apply plan=results/runs/.../plans/trial_12.yaml out=deploy/minilm-pruned
    hwprune-apply plan=... out=... device=cuda workload.batch_size=32     # on the GPU it was searched for
    hwprune-apply plan=... out=... precision=bf16                         # prune, recover, then bf16

Loads the model the plan names, checks its fingerprints, prunes it physically, saves the pruned
directory (`prunable.load_pruned`) and an ONNX export, evaluates the task metric of both models,
then times both on `device` (CPU or a CUDA GPU: median of interleaved rounds, each round timing
dense and pruned in a shuffled order). The figures go to `<out>/apply.json`. A plan whose model
cannot be found or does not match, or a device or dtype that cannot be timed, fails before anything
is written.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hwprune import prunable
from hwprune.errors import PlanError
from hwprune.search._apply import apply_and_measure
from hwprune.search._cli import one_line_errors, run_app
from hwprune.search._interrupt import stop_at_once
from hwprune.search.config import ApplyConfig, build_task, to_object


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
    assert isinstance(merged, DictConfig)
    cfg = to_object(merged)
    assert isinstance(cfg, ApplyConfig)
    return cfg


def run(cfg: ApplyConfig) -> dict[str, Any]:
    """`hwprune-apply`'s run: the task and the recovery `cfg` names, then `apply_and_measure`."""
    plan = prunable.PrunePlan.load(cfg.plan)
    if plan.model.source is None:
        raise PlanError(f"{cfg.plan}: the plan names no model source, so there is nothing to load")
    recovery = None if cfg.recovery is None else instantiate(cfg.recovery.method)
    return apply_and_measure(
        cfg.plan,
        cfg.out,
        task=build_task(cfg.task, plan.model.source),
        workload=asdict(cfg.workload),
        int8=asdict(cfg.int8),
        recovery=recovery,
        recovery_samples=cfg.recovery.samples if cfg.recovery is not None else 2048,
        recovery_seed=cfg.recovery.seed if cfg.recovery is not None else 0,
        device=cfg.device,
        repeats=cfg.repeats,
        onnx=cfg.onnx,
        overwrite=cfg.overwrite,
        check_weights=cfg.check_weights,
        precision=cfg.precision,
    )


def _interrupted() -> str:
    return "nothing was written (out stays as it was)"


@hydra.main(config_path="pkg://hwprune.conf", config_name="apply", version_base=None)
@one_line_errors(interrupted=_interrupted)
def main(cfg: DictConfig) -> None:
    app = to_object(cfg)
    assert isinstance(app, ApplyConfig)
    with stop_at_once():
        run(app)


def entry() -> None:
    run_app("apply", main)
