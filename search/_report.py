"""The outputs of a run: trials.csv, pareto.csv, pareto.png/.html, plans/*.yaml and report.md."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from optuna.trial import TrialState

from hwprune import cost_models, prunable
from hwprune.search._outcome import RunOutcome
from hwprune.search._pareto import pareto_mask
from hwprune.search._space import SearchSpace

log = logging.getLogger("hwprune.search")

PARETO_COLUMNS = [
    "plan_path",
    "kind",
    "label",
    "latency_ms",
    "latency_source",
    "speedup",
    "metric",
    "metric_validation",
    "metric_precision",
    "precisions",
    "metric_unquantized",
    "quantization",
    "metric_unrecovered",
    "recovery",
    "recovery_seconds",
    "metric_name",
    "params",
    "flops",
    "proxy_loss",
    "dominated",
    "degenerate",
    "layers",
    "units",
    "mlp",
    "experts",
    "expert_width",
]


def memory_lines(outcome: RunOutcome) -> list[str]:
    """The run's peak resident memory per phase (each phase's own high-water mark)."""
    memory = outcome.extras.get("memory")
    rows = [r for r in memory.rows() if r["peak_gib"] is not None] if memory is not None else []
    if not rows:
        return []
    lines = [
        "",
        "## Memory (resident set of this process, GiB)",
        "",
        "| phase | peak | after |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['phase']} | {r['peak_gib']:.2f} | {r['resident_after_gib']:.2f} |" for r in rows]
    return lines


def trials_frame(outcome: RunOutcome) -> pd.DataFrame:
    rows = []
    for t in outcome.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        units, mlp = t.user_attrs["units"], t.user_attrs["mlp"]
        # Optuna 5 stores each trial.set_constraint value as a "constraints:<name>" system attribute.
        constraints = [v for k, v in t.system_attrs.items() if k.startswith("constraints:")]
        row = {
            "trial": t.number,
            "latency_ms": t.values[0],
            "latency_source": outcome.cost_model.source,
            "proxy_loss": t.values[1],
            "block_params": t.user_attrs["block_params"],
            "feasible": all(c <= 0 for c in constraints),
        }
        row |= {f"units_{i}": u for i, u in enumerate(units)} | {f"mlp_{i}": m for i, m in enumerate(mlp)}
        for axis in ("experts", "expert_width", "attention_precision", "mlp_precision"):  # where searched
            row |= {f"{axis}_{i}": v for i, v in enumerate(t.user_attrs.get(axis, []))}
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_frame(outcome: RunOutcome) -> pd.DataFrame:
    dense_ms = outcome.candidates[0].latency_ms
    rows = [
        {
            "plan_path": c.plan_path,
            "kind": c.kind,
            "label": c.label,
            "latency_ms": c.latency_ms,
            "latency_source": outcome.cost_model.source,
            "speedup": dense_ms / c.latency_ms,
            "metric": c.metric,
            "metric_validation": c.metric_validation,
            "metric_precision": c.metric_precision,
            "precisions": "" if c.precisions is None else prunable.precision_summary(*c.precisions),
            "metric_unquantized": c.metric_unquantized,
            "quantization": c.quantization,
            "metric_unrecovered": c.metric_unrecovered,
            "recovery": c.recovery,
            "recovery_seconds": c.recovery_seconds,
            "metric_name": outcome.task.metric_name,
            "params": c.params,
            "flops": c.flops,
            "proxy_loss": c.proxy_loss,
            "dominated": c.dominated,
            "degenerate": c.degenerate,
            "layers": c.layers,
            "units": " ".join(map(str, c.units)),
            "mlp": " ".join(map(str, c.mlp)),
            "experts": "" if c.widths.experts is None else " ".join(map(str, c.widths.experts)),
            "expert_width": ""
            if c.widths.expert_width is None
            else " ".join(map(str, c.widths.expert_width)),
        }
        for c in outcome.candidates
    ]
    return pd.DataFrame(rows, columns=PARETO_COLUMNS)


# "Close to dense": fractions of the dense model's metric, so a tolerance means the same for Spearman
# x 100 (dense ~87), fidelity (dense 100) and perplexity (lower is better).
TOLERANCES = (0.005, 0.01, 0.02, 0.05)


def tolerance_label(tol: float) -> str:
    return f"{tol * 100:g}%"


def choice_column(pareto: pd.DataFrame) -> str:
    """The column plans are chosen on: `metric_validation` where the run measured it, else `metric`."""
    has_validation = "metric_validation" in pareto and pareto.metric_validation.notna().all()
    return "metric_validation" if has_validation else "metric"


def best_within(pareto: pd.DataFrame, tol: float, *, higher_is_better: bool) -> pd.Series | None:
    """The fastest re-scored plan (search or uniform, not degenerate) whose metric is at most `tol` of
    the dense model's worse, or None; judged on the validation metric where there is one."""
    column = choice_column(pareto)
    dense = pareto[pareto.kind == "dense"].iloc[0]
    sign = 1.0 if higher_is_better else -1.0
    plans = pareto[(pareto.kind != "dense") & (pareto.degenerate.fillna("") == "")]
    loss = sign * (dense[column] - plans[column])  # how much worse than dense, in metric units
    close = plans[loss <= tol * abs(dense[column])]
    return close.sort_values("latency_ms").iloc[0] if len(close) else None


def which_plan(
    pareto: pd.DataFrame, *, higher_is_better: bool, source: str, validation: str | None = None
) -> list[str]:
    """The report's "which plan to take" table: per tolerance, the fastest plan within it."""
    dense = pareto[pareto.kind == "dense"].iloc[0]
    chosen = choice_column(pareto) == "metric_validation"
    how = (
        f"chosen on the validation split ({validation}: `metric_validation`), reported on the evaluation data "
        "(`metric`), which played no part in the choice"
        if chosen
        else "chosen and reported on the evaluation data: the task has no validation split, so each figure is "
        "the best of the plans tried and biased upwards"
    )
    lines = [
        "## Which plan to take",
        "",
        f"The fastest re-scored plan whose metric is within X of the dense model's; speed predicted ({source}), "
        f"metric measured on the task after recovery; {how}. Degenerate plans are left out.",
        "",
        "| within | plan | predicted speedup | metric | vs dense |"
        + (" validation | vs dense |" if chosen else ""),
        "| --- | --- | --- | --- | --- |" + (" --- | --- |" if chosen else ""),
    ]
    for tol in TOLERANCES:
        best = best_within(pareto, tol, higher_is_better=higher_is_better)
        row = dense if best is None else best
        plan = "dense (no plan is this close)" if best is None else f"`{best.plan_path}`"
        line = (
            f"| {tolerance_label(tol)} | {plan} | {row.speedup:.2f}x | {row.metric:.3f} | "
            f"{row.metric - dense.metric:+.3f} |"
        )
        if chosen:
            line += f" {row.metric_validation:.3f} | {row.metric_validation - dense.metric_validation:+.3f} |"
        lines.append(line)
    return [*lines, ""]


def plot(outcome: RunOutcome, pareto: pd.DataFrame, trials: pd.DataFrame, path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    metric = outcome.task.metric_name
    search = pareto[pareto.kind == "search"].sort_values("latency_ms")
    front = search[~search.dominated.astype(bool)]
    recovered = (pareto.recovery != "none").any()
    if recovered:
        pruned = pareto[pareto.kind != "dense"]
        ax.scatter(
            pruned.latency_ms,
            pruned.metric_unrecovered,
            marker="x",
            c="gray",
            alpha=0.6,
            label="before recovery",
        )
    after = f" after {pareto.recovery[pareto.kind != 'dense'].iloc[0]}" if recovered else ""
    ax.scatter(search.latency_ms, search.metric, c="tab:blue", alpha=0.4, label=f"search candidates{after}")
    ax.plot(front.latency_ms, front.metric, "o-", c="tab:blue", label="front (real metric)")
    for r in front.itertuples():
        ax.annotate(r.label, (r.latency_ms, r.metric), fontsize=7, xytext=(3, 3), textcoords="offset points")
    uniform = pareto[pareto.kind == "uniform"]
    if len(uniform):
        ax.scatter(
            uniform.latency_ms, uniform.metric, marker="s", c="tab:orange", label=f"uniform pruning{after}"
        )
    dense = pareto[pareto.kind == "dense"]
    ax.scatter(dense.latency_ms, dense.metric, marker="*", s=200, c="black", label="dense")
    ax.set_xlabel(f"predicted latency, ms ({outcome.cost_model.source}, {outcome.cost_model.hardware})")
    ax.set_ylabel(metric)
    ax.set_title(f"{outcome.job.name} / {outcome.job.task.name} on {outcome.cost_model.hardware}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.scatter(trials.latency_ms, trials.proxy_loss, s=4, c="lightgray", label="trials")
    if outcome.exact is not None:
        ax2.plot(
            outcome.exact.latency, outcome.exact.loss, c="tab:green", lw=1, label="exact proxy front (DP)"
        )
    best = trials.loc[_front_rows(trials)]
    ax2.scatter(best.latency_ms, best.proxy_loss, s=10, c="tab:blue", label="Optuna front")
    ax2.set_xlabel("predicted latency, ms")
    ax2.set_ylabel(f"proxy loss increase ({outcome.scores.method} saliency)")
    ax2.set_yscale("symlog", linthresh=max(1e-9, float(np.percentile(trials.proxy_loss, 5)) or 1e-9))
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _front_rows(trials: pd.DataFrame) -> np.ndarray:
    feasible = trials.feasible.to_numpy()
    mask = np.zeros(len(trials), dtype=bool)
    idx = np.flatnonzero(feasible)
    mask[idx[pareto_mask(trials.latency_ms.to_numpy()[idx], trials.proxy_loss.to_numpy()[idx])]] = True
    return mask


def plot_html(outcome: RunOutcome, pareto: pd.DataFrame, path: Path) -> bool:
    """Interactive plot (plotly, self-contained); False when plotly is not installed."""
    try:
        import plotly.express as px
    except ImportError:
        log.info("plotly not installed: skipping %s", path.name)
        return False
    fig = px.scatter(
        pareto,
        x="latency_ms",
        y="metric",
        color="kind",
        symbol="dominated",
        hover_data=[
            "label",
            "plan_path",
            "speedup",
            "metric_unrecovered",
            "recovery",
            "params",
            "units",
            "mlp",
        ],
        title=f"{outcome.job.name} / {outcome.job.task.name} on {outcome.cost_model.hardware}",
        labels={
            "latency_ms": f"predicted latency (ms, {outcome.cost_model.source})",
            "metric": outcome.task.metric_name,
        },
    )
    fig.write_html(path, include_plotlyjs=True)
    return True


def space_summary(space: SearchSpace) -> str:
    """The choices per layer, in words."""

    def axis(name: str, choices: tuple[int, ...]) -> str:
        if len(choices) == 1:
            return f"{name} {choices[0]}"
        return f"{name} {choices[0]}-{choices[-1]} (step {choices[1] - choices[0]})"

    parts = [axis("attention units", space.unit_choices), axis("MLP width", space.mlp_choices)]
    if space.moe:
        parts += [
            axis("routed experts", space.expert_choices),
            axis("expert width", space.expert_width_choices),
        ]
    return "per layer: " + ", ".join(parts)


def write_report(outcome: RunOutcome, *, command: str | None = None) -> pd.DataFrame:
    """Write trials.csv, pareto.csv, the plots and report.md of a run; return the front's frame.

    Args:
        command: The command that made the run, stated under the report's title (a benchmark's
            run directories are committed as results, and every result names its command).
    """
    d = outcome.run_dir
    trials = trials_frame(outcome)
    trials.to_csv(d / "trials.csv", index=False)
    if "rescored_by" in outcome.extras:  # a worker of a shared study that another worker re-scores
        (d / "report.md").write_text(
            f"# hwprune worker: study `{outcome.study.study_name}`\n\n"
            f"The study is complete ({len(trials)} trials, `trials.csv`). Its front is re-scored by "
            f"{outcome.extras['rescored_by']}: the report, front and plans are there.\n"
        )
        log.info("wrote %s", d / "report.md")
        return pd.DataFrame(columns=PARETO_COLUMNS)
    pareto = pareto_frame(outcome)
    pareto.to_csv(d / "pareto.csv", index=False)
    plot(outcome, pareto, trials, d / "pareto.png")
    has_html = plot_html(outcome, pareto, d / "pareto.html")
    job, cm = outcome.job, outcome.cost_model
    fit = ""
    if isinstance(cm, cost_models.CalibratedModel):
        fit = f" (fitted to {len(cm.fit_error)} table(s) of this device, within {max(cm.fit_error):.0%} of them)"
    dense = pareto[pareto.kind == "dense"].iloc[0]
    best = pareto[(pareto.kind == "search") & ~pareto.dominated.astype(bool)].sort_values("latency_ms")
    lines = [
        f"# hwprune run: {job.name} / {job.task.name} on {cm.hardware}",
        "",
        *([f"Command: {command}", ""] if command else []),
        f"- Model: `{job.source}` ({outcome.structure.describe()})",
        f"- Task: {outcome.task.description}; metric `{outcome.task.metric_name}`; plans chosen on "
        + (
            f"a validation split ({outcome.task.validation}, `metric_validation`), reported on the evaluation data"
            if outcome.task.validation
            else "the evaluation data (the task has no validation split)"
        ),
        f"- Device: `{cm.hardware}`, workload {cm.workload.describe()}",
        f"- Latency source: **{cm.source}**{fit} (predicted; `table` = profiled lookup, `calibrated` = roofline fitted "
        "to a profiled table, `analytical` = datasheet roofline)",
        f"- Saliency: `{outcome.scores.method}` on {outcome.scores.meta.get('calibration', '')}",
        f"- Search: {len(trials)} trials, sampler `{job.describe_sampler()}`, {space_summary(outcome.space)}"
        + (", depth pruning (a layer left without units is dropped)" if job.settings.depth else ""),
        f"- Metric measured at **{pareto.metric_precision.iloc[0]}**"
        + (
            f" (the device runs {cm.workload.dtype}, priced here; its quantisation is not measured yet, so the "
            "front pairs its latency with the fp32 model's metric)"
            if pareto.metric_precision.iloc[0] != cm.workload.dtype
            else f" (the precision the latency is priced at; {pareto.quantization.iloc[0]})"
            if pareto.quantization.iloc[0]
            else " (the precision the latency is priced at)"
        ),
        f"- Recovery of every re-scored pruned plan before its metric: `{job.recovery.name}`"
        + ("" if job.recovery.name == "none" else f" ({job.recovery_samples} training samples of the task)"),
    ]
    if isinstance(cm, cost_models.MixedPrecisionModel):
        lines.append(
            f"- Precision axis: each layer's attention and the rest of its block choose among {list(cm.precisions)} "
            f"(latency per precision: {', '.join(f'{p} {src}' for p, src in cm.sources.items())}); every plan's "
            "metric is measured with its blocks at their precisions (`precisions` in pareto.csv, the plan files' "
            "`precision`); proxy loss adds each block's Hessian-estimated precision loss"
        )
    if "layer_scores" in outcome.extras:
        lines.append(
            "- Layer scores (measured loss of dropping each layer alone): "
            + ", ".join(f"{v:.3g}" for v in outcome.extras["layer_scores"])
        )
    if outcome.hv_ratio is not None:
        lines.append(
            f"- Hypervolume of the Optuna front / the exact DP front of the proxy: **{outcome.hv_ratio:.4f}**"
        )
    lines += [
        "",
        f"Dense: {dense.latency_ms:.3f} ms predicted, {outcome.task.metric_name} {dense.metric:.3f}.",
        "",
        *which_plan(
            pareto,
            higher_is_better=outcome.task.higher_is_better,
            source=cm.source,
            validation=outcome.task.validation,
        ),
        "## Front (re-scored on the task, non-dominated)",
        "",
        "| plan | predicted ms | speedup | metric | before recovery | recovery (s) | params | layers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in best.itertuples():
        note = f" (degenerate: {r.degenerate})" if isinstance(r.degenerate, str) and r.degenerate else ""
        lines.append(
            f"| `{r.plan_path}`{note} | {r.latency_ms:.3f} | {r.speedup:.2f}x | {r.metric:.3f} | "
            f"{r.metric_unrecovered:.3f} | {r.recovery} ({r.recovery_seconds:.1f}) | {r.params:,} | "
            f"{r.layers}/{outcome.structure.num_layers} |"
        )
    lines += [
        "",
        "## Uniform pruning baselines",
        "",
        "| plan | predicted ms | speedup | metric | before recovery |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in pareto[pareto.kind == "uniform"].itertuples():
        lines.append(
            f"| `{r.plan_path}` | {r.latency_ms:.3f} | {r.speedup:.2f}x | {r.metric:.3f} | {r.metric_unrecovered:.3f} |"
        )
    lines += memory_lines(outcome)
    lines += [
        "",
        "Files: `trials.csv`, `pareto.csv`, `pareto.png`"
        + (", `pareto.html`" if has_html else "")
        + ", `plans/*.yaml` (apply with `hwprune-apply plan=<file> out=<dir>`).",
    ]
    (d / "report.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", d / "report.md")
    return pareto
