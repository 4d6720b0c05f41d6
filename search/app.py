"""`hwprune-search`: the main job.

    hwprune-search                                          # embedded default, a few minutes on a laptop CPU
    hwprune-search task=sts task.build.train_path=.../sts-train.csv task.build.eval_path=.../sts-dev.csv
    hwprune-search -m hardware=gpu_h100,tpu_v5e,npu_hexagon  # one run per device + comparison table

Each run writes trials.csv, pareto.csv, pareto.png/.html, plans/*.yaml and report.md to its Hydra
output directory under results/runs/. Re-running with `hydra.run.dir=<that directory>` resumes the
study from its journal instead of starting over.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hwprune.search import tasks
from hwprune.search._cli import one_line_errors, run_app, save_hydra_record
from hwprune.search._report import TOLERANCES, best_within, choice_column, tolerance_label
from hwprune.search.config import AppConfig, to_object

log = logging.getLogger("hwprune.search")


def _interrupted() -> str:
    """What Ctrl-C leaves of a search, and the command that resumes it."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.run.dir=")]
    command = shlex.join(["hwprune-search", *overrides, f"hydra.run.dir={run_dir}"])  # pasteable as is
    return f"the study's finished trials are kept in {run_dir}; resume with: {command}"


@hydra.main(config_path="pkg://hwprune.conf", config_name="config", version_base=None)
@one_line_errors(interrupted=_interrupted)
def main(cfg: DictConfig) -> None:
    from hwprune.search._from_config import run_config
    from hwprune.search._report import write_report

    app = to_object(cfg)  # fails here, before any work, on an unknown key or a missing field
    assert isinstance(app, AppConfig)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    write_report(run_config(app, run_dir, accepted=lambda: save_hydra_record(cfg, run_dir)))


class CompareDevices(Callback):
    """After a multirun, one table comparing the devices' fronts (comparison.md / .csv in the sweep dir).

    Per device: the dense latency and metric, and the fastest re-scored plan whose metric is within
    0.5 %, 1 %, 2 % and 5 % of the dense model's (on the worse side; the metric's direction respected).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = []
        for pareto_path in sorted(sweep.glob("*/pareto.csv")):
            frame = pd.read_csv(pareto_path)
            dense = frame[frame.kind == "dense"].iloc[0]
            front = frame[(frame.kind == "search") & (frame.dominated == False)]  # noqa: E712
            if "degenerate" not in frame:  # pareto.csv files written before 2026-12-07
                frame["degenerate"] = ""
            row = {
                "run": pareto_path.parent.name,
                "latency_source": dense.latency_source,
                "metric": dense.metric_name,
                "dense_ms": dense.latency_ms,
                "dense_metric": dense.metric,
                "chosen_on": choice_column(frame),  # the metric plans were picked on
            }
            better = tasks.higher_is_better(str(dense.metric_name))
            for tol in TOLERANCES:
                best = best_within(frame, tol, higher_is_better=better)
                best = dense if best is None else best
                label = tolerance_label(tol)
                row |= {
                    f"within_{label}_speedup": best.speedup,
                    f"within_{label}_metric": best.metric,
                    f"within_{label}_plan": best.label,
                }
            row |= {
                "fastest_ms": front.latency_ms.min() if len(front) else float("nan"),
                "front_points": len(front),
            }
            rows.append(row)
        if not rows:
            return
        table = pd.DataFrame(rows)
        table.to_csv(sweep / "comparison.csv", index=False)
        header = (
            "# Devices compared (predicted latency; metric re-scored on the task)\n\n"
            "`within_X`: the fastest front plan whose metric is at most X of the dense model's metric worse "
            "(`dense` where no plan is).\n\n"
        )
        (sweep / "comparison.md").write_text(header + markdown_table(table))
        log.info("wrote %s", sweep / "comparison.csv")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of `frame` (floats to 4 significant digits)."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def entry() -> None:
    run_app("config", main)
