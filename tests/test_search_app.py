"""The main job end to end on the bundled MiniLM (small settings): outputs, resume, apply, sweeps, tasks."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import allocator_state
from hwprune.search._from_config import run_config
from hwprune.search._report import PARETO_COLUMNS, write_report
from hwprune.search.app import CompareDevices
from hwprune.search.apply_app import apply_config
from hwprune.search.apply_app import run as run_apply
from hwprune.search.config import AppConfig, compose
from tests.conftest import SMALL, app_config


def test_run_writes_the_output_contract(run_dir: Path) -> None:
    for name in ("trials.csv", "pareto.csv", "pareto.png", "pareto.html", "report.md", "study.journal"):
        assert (run_dir / name).is_file(), name
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 30
    assert {"trial", "latency_ms", "latency_source", "proxy_loss", "units_0", "mlp_5"} <= set(trials.columns)
    pareto = pd.read_csv(run_dir / "pareto.csv")
    assert list(pareto.columns) == PARETO_COLUMNS
    dense = pareto[pareto.kind == "dense"]
    assert len(dense) == 1 and dense.speedup.iloc[0] == pytest.approx(1.0)
    assert dense.metric_unquantized.iloc[0] == pytest.approx(100.0, abs=1e-3)  # fp32 agrees with itself
    # gpu_h100 runs bf16, fp16 and fp32 in torch: each layer's attention and MLP choose among them (the
    # precision axis is on by default), the dense model at bf16 (its reference) and at each other.
    assert dense.metric_precision.iloc[0] == "bf16" and 99.9 < dense.metric.iloc[0] < 100.0
    assert {"dense fp16", "dense fp32"} <= set(pareto.label)
    assert {"bf16", "fp16", "fp32"} <= set(trials[[f"mlp_precision_{i}" for i in range(6)]].stack())
    # Each plan's metric is measured at its blocks' precisions, as its plan file deploys them.
    for row in pareto.itertuples():
        names = set(" ".join(row.precisions.split("; ")).split()) - {"attention", "mlp"}
        names = {n for n in names if not n.startswith("x")}
        assert row.metric_precision == (names.pop() if len(names) == 1 else "mixed"), row.label
    assert (pareto.latency_source == "analytical").all() and (
        pareto.metric_name == "cosine_to_dense_x100"
    ).all()
    # Plans are as fast as dense or faster; the dense model at fp32 is slower than at bf16.
    at_precision = pareto.label.str.startswith("dense ")
    assert (pareto.speedup[(pareto.kind != "dense") & ~at_precision] >= 1.0).all()
    assert pareto.speedup[pareto.label == "dense fp32"].iloc[0] < 1.0
    # Every plan file loads and applies to the model it names.
    model = prunable.load_model(prunable.MINILM, "BertModel")
    for plan_path in pareto.plan_path:
        plan = prunable.PrunePlan.load(run_dir / plan_path)
        assert plan.hardware == "gpu_h100" and plan.metadata["latency_source"] == "analytical"
        plan.check(prunable.discover(model), weights_fingerprint=prunable.weights_fingerprint(model))
    report = (run_dir / "report.md").read_text()
    assert "Latency source: **analytical**" in report and "Hypervolume of the Optuna front" in report
    assert "## Which plan to take" in report and "| 0.5% | " in report and "| 5% | " in report
    # Plans are chosen on held-out passages of their own and reported on the evaluation passages.
    assert pareto.metric_validation.notna().all() and 99.9 < dense.metric_validation.iloc[0] <= 100.0
    assert not np.allclose(pareto.metric_validation, pareto.metric)  # another split, other figures
    plan = prunable.PrunePlan.load(run_dir / pareto.plan_path.iloc[-1])
    assert plan.metadata["metric_validation"] == pytest.approx(pareto.metric_validation.iloc[-1])
    assert (
        plan.metadata["validation"]
        == "24 other passages of Python's bundled documentation (pydoc_data.topics)"
    )
    assert "chosen on the validation split (24 other passages" in report


def test_rerun_resumes_the_study(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    resumed = tmp_path / "resumed"  # a copy: the shared run directory stays as other tests expect it
    shutil.copytree(run_dir, resumed)
    app = app_config(tmp_path, "hardware=gpu_h100", "search.n_trials=36", "recovery=none")
    app.saliency.cache_dir = str(run_dir.parent / "cache")
    before = pd.read_csv(resumed / "trials.csv")
    write_report(run_config(app, resumed))
    after = pd.read_csv(resumed / "trials.csv")
    assert len(after) == 36
    pd.testing.assert_frame_equal(after.iloc[:30].reset_index(drop=True), before, check_dtype=False)


def test_rescoring_spends_its_recoveries_in_the_asked_speedup_window(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    window = tmp_path / "window"  # the same study, resumed: only the re-scored choice differs
    shutil.copytree(run_dir, window)
    app = app_config(
        tmp_path,
        "hardware=gpu_h100",
        "search.rescore=3",
        "search.rescore_min_speedup=1.5",
        "search.rescore_max_speedup=3",
        "recovery=none",  # which plans are re-scored is the question here, not how they recover
    )
    app.saliency.cache_dir = str(run_dir.parent / "cache")
    outcome = run_config(app, window)
    searched = [c.latency_ms for c in outcome.candidates if c.kind == "search"]
    dense_ms = outcome.candidates[0].latency_ms
    assert 1 <= len(searched) <= 3
    assert all(1.5 <= dense_ms / lat <= 3 for lat in searched), [dense_ms / lat for lat in searched]
    # Without the window the spread reaches the front's ends, outside it.
    everywhere = pd.read_csv(run_dir / "pareto.csv")
    assert not everywhere[everywhere.kind == "search"].speedup.between(1.5, 3).all()


def test_workers_of_a_shared_study_rescore_its_front_once(run_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared.journal"
    outcomes = []
    for worker in ("a", "b"):  # one after the other here; tests/test_workers.py runs them at once
        app = app_config(tmp_path, "hardware=gpu_h100", f"search.storage={shared}", "recovery=none")
        app.saliency.cache_dir = str(run_dir.parent / "cache")
        outcomes.append(run_config(app, tmp_path / worker))
        write_report(outcomes[-1])
    first, second = outcomes
    assert len(first.candidates) >= 2 and second.candidates == []
    assert second.extras["rescored_by"].endswith(f"into {(tmp_path / 'a').resolve()}")
    assert (tmp_path / "a" / "pareto.csv").is_file() and not (tmp_path / "b" / "pareto.csv").exists()
    assert "Its front is re-scored by worker" in (tmp_path / "b" / "report.md").read_text()
    assert len(pd.read_csv(tmp_path / "b" / "trials.csv")) == 30  # the study's total, not 2 x 30


def test_apply_prunes_exports_measures(run_dir: Path, tmp_path: Path) -> None:
    pareto = pd.read_csv(run_dir / "pareto.csv")
    plan_path = run_dir / pareto[pareto.kind == "uniform"].plan_path.iloc[0]
    cfg = apply_config(
        plan=str(plan_path),
        out=str(tmp_path / "out"),
        task=compose("config", SMALL[:3]).task,
        repeats=2,
        precision="fp32",  # the plan's is bf16 (gpu_h100): fp32 here, to hold the ONNX file to 1e-4 below
    )
    result = run_apply(cfg)
    saved = json.loads((tmp_path / "out" / "apply.json").read_text())
    for key in (
        "predicted_speedup",
        "measured_speedup",
        "latency_ms_dense",
        "latency_ms_pruned",
        "metric_dense",
        "metric_pruned",
        "metric_name",
        "workload",
    ):
        assert key in saved
    assert saved["predicted_speedup"] > 1.0 and saved["measured_speedup"] > 0
    measured_on = saved["workload"]
    assert measured_on["device"] == {"type": "cpu", "name": cost_models.cpu_name()}
    # Timed with freed activations reused (as the profiler times tables), and it says so.
    assert measured_on["allocator"] == allocator_state()
    if platform.libc_ver()[0] == "glibc" and "LD_PRELOAD" not in os.environ:
        assert "mmap threshold 32 MiB" in measured_on["allocator"]
    # The plan was searched for gpu_h100 at batch 1 x 128 in bf16: that is what is timed by default.
    assert measured_on["dtype"] == "bf16" and measured_on["batch_size"] == 1 and measured_on["repeats"] == 2
    assert saved["workload_differs_from_plan"] == []
    # The plan's recovery recipe ran again, and the saved weights are the recovered ones.
    assert saved["recovery"]["method"] == "reconstruct" and saved["recovery_seconds"] > 0
    assert saved["metric_pruned"] == pytest.approx(
        pareto[pareto.kind == "uniform"].metric_unquantized.iloc[0], abs=1e-3
    )  # fp32 here: the search's fp32 metric
    assert saved["metric_unrecovered"] == pytest.approx(
        pareto[pareto.kind == "uniform"].metric_unrecovered.iloc[0], abs=1e-3
    )
    assert len(saved["latency_ms_dense_quartiles"]) == 3
    assert measured_on["timing"] == "median of 2 interleaved rounds (wall clock)"
    assert saved["params_pruned"] < saved["params_dense"]
    assert result["metric_dense"] == pytest.approx(100.0, abs=1e-3)
    reloaded = prunable.load_pruned(tmp_path / "out")
    assert prunable.discover(reloaded).layers[0].num_heads == 6
    # The ONNX export computes what the pruned model does, padding masks included.
    import onnxruntime as ort
    import torch

    ids = torch.randint(1000, 2000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    (onnx_out,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        torch_out = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    keep = mask.numpy().astype(bool)
    assert np.abs(onnx_out - torch_out)[keep].max() < 1e-4

    # A plan for other weights fails before anything is written.
    plan = prunable.PrunePlan.load(plan_path)
    bad = prunable.PrunePlan(
        model=prunable.ModelRef(
            plan.model.class_name, plan.model.structure_fingerprint, plan.model.source, "0" * 16
        ),
        layers=plan.layers,
    )
    bad_path = bad.save(tmp_path / "bad.yaml")
    cfg.plan, cfg.out = str(bad_path), str(tmp_path / "never")
    with pytest.raises(prunable.PlanError, match="plan was made for other weights"):
        run_apply(cfg)
    assert not (tmp_path / "never").exists()
    # Unless the user says the weights differ on purpose (a fine-tuned checkpoint).
    cfg.check_weights, cfg.onnx, cfg.repeats, cfg.out = False, False, 1, str(tmp_path / "tuned")
    assert run_apply(cfg)["measured_speedup"] > 0
    # So does a device or dtype it cannot time in, naming the valid choices.
    for setting, error, match in (
        ({"device": "tpu"}, ValueError, r"unknown torch device 'tpu'; valid choices: 'cpu', 'cuda'"),
        ({"workload": {"dtype": "int8"}}, ValueError, r"workload.dtype='int8' cannot be timed.*'bf16'"),
        ({"repeats": 0}, ValueError, "repeats=0 is invalid; valid: >= 1"),
    ):
        bad_cfg = apply_config(
            plan=str(plan_path),
            out=str(tmp_path / "never"),
            task=compose("config", SMALL[:3]).task,
            **setting,
        )
        with pytest.raises(error, match=match):
            run_apply(bad_cfg)
        assert not (tmp_path / "never").exists()


def test_sweep_writes_a_device_comparison(run_dir: Path, tmp_path: Path) -> None:
    for device in ("hardware=gpu_h100", "hardware=tpu_v5e"):
        (tmp_path / device).mkdir()
        (tmp_path / device / "pareto.csv").write_text((run_dir / "pareto.csv").read_text())
    CompareDevices().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert table.run.tolist() == ["hardware=gpu_h100", "hardware=tpu_v5e"]
    assert (table.dense_ms > 0).all() and np.isfinite(table["within_5%_speedup"]).all()
    pareto = pd.read_csv(run_dir / "pareto.csv")
    assert (table.chosen_on == "metric_validation").all()  # picked on the validation split's figures
    dense = pareto[pareto.kind == "dense"].metric_validation.iloc[0]
    plans = pareto[(pareto.kind != "dense") & pareto.degenerate.isna()]
    for tol in ("0.5%", "1%", "2%", "5%"):  # each picks the fastest plan that close to dense, or dense
        close = plans[plans.metric_validation >= dense * (1 - float(tol[:-1]) / 100)]
        expected = close.sort_values("latency_ms").label.iloc[0] if len(close) else "dense"
        assert (table[f"within_{tol}_plan"] == expected).all()
    assert (table["within_1%_speedup"] <= table["within_5%_speedup"]).all()
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.startswith("# Devices compared") and "| hardware=tpu_v5e | analytical |" in markdown


def test_apply_never_loses_an_output_directory(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hwprune.search import _apply, apply_app

    plan = str(run_dir / "plans" / "dense.yaml")
    task = compose("config", SMALL[:3]).task

    def settings(out: Path, **extra: object) -> apply_app.ApplyConfig:
        return apply_config(plan=plan, out=str(out), task=task, repeats=1, onnx=False, **extra)

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out=.*out exists and is not empty; pass overwrite=true"):
        run_apply(settings(out))
    assert (out / "keep.txt").read_text() == "mine"
    source = prunable.resolve_source(prunable.MINILM)
    with pytest.raises(ValueError, match="would write over the model's own directory"):
        run_apply(settings(Path(source), overwrite=True))
    with pytest.raises(ValueError, match="would write into the model's own directory"):
        run_apply(settings(Path(source) / "pruned", overwrite=True))

    # A failure after work began leaves neither a half-written `out` nor a staging directory.
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(_apply, "measure", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_apply(settings(tmp_path / "late"))
    assert not (tmp_path / "late").exists() and not list(tmp_path.glob(".late.*"))
    monkeypatch.undo()

    # overwrite=true never deletes a directory hwprune-apply did not write.
    with pytest.raises(
        ValueError, match=r"is not an earlier hwprune-apply output \(it has no \.hwprune-apply file\)"
    ):
        run_apply(settings(out, overwrite=True))
    assert (out / "keep.txt").read_text() == "mine"

    # It replaces an earlier apply's output whole; a workload other than the plan's is recorded.
    applied = tmp_path / "applied"
    run_apply(settings(applied))
    (applied / "stale.txt").write_text("from the first apply")
    with caplog.at_level("WARNING"):
        result = run_apply(settings(applied, overwrite=True, workload={"batch_size": 2, "dtype": "fp32"}))
    assert not (applied / "stale.txt").exists() and (applied / "apply.json").is_file()
    assert sorted(result["workload_differs_from_plan"]) == ["batch_size", "dtype"]
    assert result["workload"]["batch_size"] == 2 and result["workload"]["seq_len"] == 128
    assert "the plan's speedup was predicted for prefill batch 1 x seq 128, bf16" in caplog.text


def test_depth_search_drops_layers_and_apply_times_the_shallower_model(tmp_path: Path) -> None:
    app = app_config(
        tmp_path,
        "hardware=gpu_h100",
        "search.depth=true",
        "recovery=none",
        "search.rescore_min_speedup=1.5",
    )
    outcome = run_config(app, tmp_path / "run")
    pareto = write_report(outcome, command="`hwprune-search search.depth=true`")
    assert len(outcome.extras["layer_scores"]) == 6
    report = (tmp_path / "run" / "report.md").read_text().splitlines()
    assert report[2] == "Command: `hwprune-search search.depth=true`"  # under the title
    shallower = pareto[(pareto.kind == "search") & (pareto.layers < 6)]
    assert len(shallower) >= 1  # at batch 1 on an H100 a block is mostly launches: depth pays
    assert "depth pruning" in (tmp_path / "run" / "report.md").read_text()
    row = shallower.iloc[0]
    plan = prunable.PrunePlan.load(tmp_path / "run" / row.plan_path)
    assert len(plan.kept_layers()) == row.layers
    assert plan.metadata["latency_ms"] == pytest.approx(row.latency_ms)
    out = tmp_path / "out"
    cfg = apply_config(
        plan=str(tmp_path / "run" / row.plan_path),
        out=str(out),
        task=compose("config", SMALL[:3]).task,
        repeats=2,
    )
    result = run_apply(cfg)  # the default apply, ONNX included: the shallower model exports too
    assert result["onnx"]["exported"] and result["onnx"]["max_abs_diff"] <= result["onnx"]["tolerance"]
    reloaded = prunable.load_pruned(out)
    assert prunable.discover(reloaded).num_layers == row.layers == reloaded.config.num_hidden_layers
    assert result["metric_pruned"] == pytest.approx(row.metric, abs=1e-3)
    assert result["measured_speedup"] > 0
    # Magnitude scores are no loss estimate: depth refuses them before anything loads.
    bad = app_config(tmp_path, "search.depth=true", "saliency=magnitude")
    with pytest.raises(ValueError, match=r"search.depth=true needs saliency that estimates the loss.*'nvit'"):
        run_config(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_an_image_model_other_than_vit_searches_and_applies_end_to_end(tmp_path: Path) -> None:
    """DeiT through `model.source=<dir> model.class_name=<class>` on the digits task, then applied."""
    import transformers

    from hwprune.search.config import to_object

    config = transformers.DeiTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    transformers.DeiTForImageClassification(config).save_pretrained(tmp_path / "deit")
    cfg = to_object(
        compose(
            "config",
            [
                f"model.source={tmp_path / 'deit'}",
                "model.class_name=DeiTForImageClassification",
                "model.name=deit_digits",
                "task=classification",
                "workload.seq_len=17",
                "search.n_trials=20",
                "search.rescore=1",
                "search.uniform_baselines=[0.5]",
                "search.exact_seeds=3",
                "recovery=none",
                "hardware=gpu_h100",
                f"saliency.cache_dir={tmp_path / 'cache'}",
            ],
        )
    )
    assert isinstance(cfg, AppConfig)
    pareto = write_report(run_config(cfg, tmp_path / "run"))
    plan_path = tmp_path / "run" / pareto[pareto.kind == "uniform"].plan_path.iloc[0]
    result = run_apply(apply_config(plan=plan_path, out=tmp_path / "out", task=cfg.task, repeats=2))
    assert result["onnx"]["exported"] and result["onnx"]["inputs"] == "batch 2"  # pixel_values only
    assert pareto.metric_name.iloc[0] == "accuracy_x100"
    reloaded = prunable.load_pruned(tmp_path / "out")
    assert type(reloaded).__name__ == "DeiTForImageClassification"
    assert prunable.discover(reloaded).layers[0].num_heads == 2
    assert result["params_pruned"] < result["params_dense"]


def test_apply_takes_a_workload_option_and_records_what_differs(run_dir: Path, tmp_path: Path) -> None:
    """`workload=<option>`, as the search takes it: the option's fields replace the plan's."""
    from hwprune.search.config import to_object

    plan = run_dir / "plans" / "dense.yaml"
    cfg = to_object(
        compose(
            "apply",
            [
                *SMALL[:3],
                f"plan={plan}",
                f"out={tmp_path / 'out'}",
                "workload=b8_s128",
                "repeats=1",
                "onnx=false",
            ],
        )
    )
    result = run_apply(cfg)  # type: ignore[arg-type]
    assert result["workload"]["batch_size"] == 8 and result["workload"]["seq_len"] == 128
    # The plan was searched for gpu_h100 at batch 1 in bf16; "auto" leaves the plan's dtype alone.
    assert result["workload_differs_from_plan"] == ["batch_size"] and result["workload"]["dtype"] == "bf16"


def test_a_model_the_exporter_cannot_trace_still_applies_and_says_so(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hwprune.search import _apply

    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exporting the operator 'aten::histc' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(_apply, "export_onnx", unsupported)
    plan = run_dir / "plans" / "dense.yaml"
    with caplog.at_level("WARNING"):
        result = run_apply(
            apply_config(plan=plan, out=tmp_path / "out", task=compose("config", SMALL[:3]).task, repeats=1)
        )
    assert result["onnx"] == {
        "exported": False,
        "reason": "RuntimeError: Exporting the operator 'aten::histc' to ONNX opset version 17 is not supported",
    }
    assert not (tmp_path / "out" / "model.onnx").exists()
    saved = json.loads((tmp_path / "out" / "apply.json").read_text())
    assert saved["onnx"]["exported"] is False
    assert [r.message for r in caplog.records if r.message.startswith("ONNX")] == [
        "ONNX export skipped: torch.onnx could not export this model (RuntimeError: Exporting the operator "
        "'aten::histc' to ONNX opset version 17 is not supported)"
    ]
