"""From the apps' checked configuration to the core's plain objects: the CLI layer's one bridge."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from hydra.utils import instantiate

from hwprune import hessian, prunable
from hwprune.search._identity import check_resumable
from hwprune.search._job import SearchJob, check_depth
from hwprune.search._outcome import RunOutcome
from hwprune.search._run import open_run_storage, run_search
from hwprune.search.config import AppConfig, build_task
from hwprune.search.recovery import Recovery

log = logging.getLogger("hwprune.search")


def run_config(cfg: AppConfig, run_dir: Path, *, accepted: Callable[[], None] | None = None) -> RunOutcome:
    """`hwprune-search`'s run: what `cfg` names, checked and built cheapest first, then `run_search`.

    Every configured method is built before anything expensive, so bad settings fail first; then the
    study's storage opens (a server that cannot be reached, or a run directory another process
    holds, fails before the model loads) and a study already there is checked against every setting
    that needs no model (a resume with other settings is refused here, not after the model loads);
    then `accepted` is called (the app writes its `.hydra` record of the settings); then the model
    loads, and the task's data only once the saliency method has accepted the model's structure.
    """
    saliency: hessian.Saliency = instantiate(cfg.saliency.method)
    settings = cfg.search.settings()
    check_depth(settings, saliency)
    recovery: Recovery = instantiate(cfg.recovery.method)
    sampler = instantiate(cfg.search.sampler, _partial_=True)  # seeded in run_search
    hardware = cfg.hardware.validate()
    storage = open_run_storage(settings, run_dir)
    known = {
        "model": {"source": cfg.model.source},
        "hardware": hardware.name,
        "workload": asdict(hardware.resolve_workload(cfg.workload.build())),
        "saliency": {"method": saliency.name, "params": saliency.params(), "dtype": cfg.saliency.dtype},
        "constraints": asdict(settings.constraints()),
    }
    check_resumable(storage, known, settings.study_name)
    if accepted is not None:
        accepted()
    model = prunable.load_model(cfg.model.source, cfg.model.class_name)
    saliency.check_structure(prunable.discover(model))
    job = SearchJob(
        model=model,
        source=cfg.model.source,
        name=cfg.model.name,
        task=build_task(cfg.task, cfg.model.source),
        saliency=saliency,
        hardware=hardware,
        workload=cfg.workload.build(),
        settings=settings,
        recovery=recovery,
        recovery_samples=cfg.recovery.samples,
        recovery_seed=cfg.recovery.seed,
        sampler=sampler,
        scoring=cfg.saliency.options(),
        cache_dir=cfg.saliency.cache_dir,
        int8=cfg.int8.build(),
    )
    return run_search(job, run_dir, storage=storage)
