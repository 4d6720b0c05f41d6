"""The ONNX artifact: every family exports, and ONNX Runtime in a fresh process computes what the
pruned torch model does, on inputs of another shape than the export's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwprune import cost_models, prunable
from hwprune.search import _onnx
from hwprune.search._onnx import check_onnx, export_onnx
from tests.conftest import CASES
from tests.test_surgery import random_plan

WORKLOAD = cost_models.Workload(batch_size=2, seq_len=8)


@pytest.mark.parametrize("name", list(CASES))
def test_every_family_exports_and_runs_the_same_in_onnxruntime(name: str, tmp_path: Path) -> None:
    """A random plan (experts and neurons too, one empty layer) exported and run in a fresh ONNX
    Runtime process."""
    case = CASES[name]
    model = case.build()
    plan = random_plan(model, 1, empty_layer=1)  # one layer keeps no unit at all
    pruned = prunable.pruned_copy(model, plan, check_weights=False)
    export_onnx(pruned, WORKLOAD, tmp_path / "model.onnx")
    check = check_onnx(pruned, tmp_path / "model.onnx", WORKLOAD)
    assert check["runtime"].startswith("onnxruntime ")
    assert check["max_abs_diff"] <= check["tolerance"] <= 1e-4 * 100
    if "pixel_values" not in case.inputs(torch.Generator()):
        assert check["inputs"] == "batch 3 x 11 tokens"  # not the exported 2 x 8: the axes are dynamic


def test_the_exportable_experts_dispatch_is_the_models_own_and_is_removed_after() -> None:
    model = CASES["mixtral"].build()
    inputs = CASES["mixtral"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(**inputs).logits
        with prunable.exportable(model):
            experts = [lc.experts.experts for lc in prunable.couplings(model) if lc.experts is not None]
            assert experts and all("forward" in vars(e) for e in experts)
            during = model(**inputs).logits
        after = model(**inputs).logits
    assert all("forward" not in vars(e) for e in experts)
    assert torch.allclose(during, before, atol=1e-6) and torch.equal(after, before)


def test_a_file_the_runtime_computes_differently_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CASES["bert"].build()
    export_onnx(model, WORKLOAD, tmp_path / "model.onnx")
    with torch.no_grad():  # the torch model changes after the export: the file no longer computes it
        model.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
    with pytest.raises(RuntimeError, match=r"model\.onnx differs from the pruned torch model by"):
        check_onnx(model, tmp_path / "model.onnx", WORKLOAD)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match=r"ONNX Runtime could not run broken\.onnx in a fresh process"):
        check_onnx(model, tmp_path / "broken.onnx", WORKLOAD)
    assert _onnx.ONNX_TOLERANCE == 1e-4


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_a_model_without_attention_keeps_its_mask_input(name: str, tmp_path: Path) -> None:
    """No layer reads the mask any more, yet a server still feeds it: the graph keeps the input."""
    import onnx

    model = CASES[name].build()
    structure = prunable.discover(model)
    plan = prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(model),
        attention=[[] for _ in structure.layers],
        mlp=[list(range(la.mlp_width)) for la in structure.layers],
    )
    pruned = prunable.pruned_copy(model, plan, check_weights=False)
    export_onnx(pruned, WORKLOAD, tmp_path / "model.onnx")
    inputs = [i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.input]
    assert inputs == ["input_ids", "attention_mask"]
    assert check_onnx(pruned, tmp_path / "model.onnx", WORKLOAD)["max_abs_diff"] <= 1e-4
