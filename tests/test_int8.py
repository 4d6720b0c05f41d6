"""int8: the QDQ model follows its recipe, ONNX Runtime computes what the QDQ arithmetic says, and
the front, the plans and hwprune-apply measure it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import helper, numpy_helper

from hwprune import cost_models, hessian, prunable
from hwprune.search._int8 import INT8_OPS, Int8Recipe, OnnxRuntimeModel, int8_saturates, quantize_int8
from tests.test_surgery import random_plan

WORKLOAD = cost_models.Workload(batch_size=2, seq_len=8)


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=96, num_hidden_layers=2, vocab_size=120
    )
    return transformers.BertModel(config).eval()


def batches(count: int, *, rows: int = 4, length: int = 10, seed: int = 0) -> list[hessian.Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 120, (rows, length), generator=gen)
        out.append(hessian.Batch(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return out


def float_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ graph with every QuantizeLinear and DequantizeLinear written out as the float arithmetic
    the ONNX spec defines (y = clip(round(x / s) + zp), x' = (y - zp) * s): a reference of what the
    int8 file computes that never touches ONNX Runtime's int8 kernels."""
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, consts = [], []

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            nodes.append(n)
            continue
        scale, zero = inits[n.input[1]].astype(np.float32), inits[n.input[2]].astype(np.float32)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight: dequantised here
            q = inits[n.input[0]].astype(np.float32)
            shape = [1] * q.ndim
            shape[axis] = -1
            consts.append(
                numpy_helper.from_array((q - zero.reshape(shape)) * scale.reshape(shape), n.output[0])
            )
            continue
        assert scale.ndim == 0, "activations are quantised per tensor"
        s, z = const(f"{n.name}_s", scale), const(f"{n.name}_z", zero)
        if n.op_type == "QuantizeLinear":
            lo, hi = const(f"{n.name}_lo", np.float32(-128)), const(f"{n.name}_hi", np.float32(127))
            nodes += [
                helper.make_node("Div", [n.input[0], s], [f"{n.name}_d"]),
                helper.make_node("Round", [f"{n.name}_d"], [f"{n.name}_r"]),  # half to even, as the spec
                helper.make_node("Add", [f"{n.name}_r", z], [f"{n.name}_a"]),
                helper.make_node("Clip", [f"{n.name}_a", lo, hi], [n.output[0]]),
            ]
        else:
            nodes += [
                helper.make_node("Sub", [n.input[0], z], [f"{n.name}_m"]),
                helper.make_node("Mul", [f"{n.name}_m", s], [n.output[0]]),
            ]
    used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used and i.data_type != onnx.TensorProto.INT8]
    new_graph = helper.make_graph(nodes, "float_qdq", graph.input, graph.output, [*kept, *consts])
    return helper.make_model(new_graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, OnnxRuntimeModel, Path]:
    model = tiny_bert()
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    return model, quantize_int8(model, batches(3), path, WORKLOAD), path


def test_weights_are_int8_symmetric_per_output_channel_of_the_models_own(quantized: tuple) -> None:
    model, _, path = quantized
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    linears = [  # the pooler's output is not exported (last_hidden_state is)
        m.weight.detach().T.numpy()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.startswith("pooler")
    ]
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == len(linears)  # every projection, nothing else
    for n in weights:
        q, scale, zero = (inits[i] for i in n.input)
        assert q.dtype == np.int8 and not zero.any()  # symmetric
        assert scale.shape == (q.shape[1],)  # one scale per output channel
        # Each channel's largest weight is +-127, or +-64 in the 7-bit range of CPUs without VNNI.
        assert np.abs(q).max(axis=0).tolist() == [64 if int8_saturates() else 127] * q.shape[1]
        dequantised = q * scale
        (original,) = [
            w for w in linears if w.shape == q.shape and np.abs(w - dequantised).max() <= scale.max()
        ]
        assert np.all(np.abs(original - dequantised) <= scale / 2 * (1 + 1e-5))  # round to nearest


def test_only_projection_inputs_are_quantised(quantized: tuple) -> None:
    _, _, path = quantized
    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    dequantised = [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dequantised
    for name in dequantised:  # softmax, layer norm, GELU and residual inputs stay float
        assert set(consumers[name]) <= set(INT8_OPS), consumers[name]


def test_onnxruntime_computes_what_the_qdq_arithmetic_says(quantized: tuple) -> None:
    model, int8, path = quantized
    import onnxruntime

    reference = onnxruntime.InferenceSession(
        float_qdq(onnx.load(str(path))).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    inputs = batches(1, rows=3, length=7, seed=5)[0].inputs  # another shape than calibration's
    got = int8(**inputs).last_hidden_state.numpy()
    expected = reference.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        fp32 = model(**inputs).last_hidden_state.numpy()
    scale = np.abs(fp32).max()
    # int8 kernels requantise in integer arithmetic: rounding differs by a step at most here and there.
    assert np.abs(got - expected).max() <= 0.02 * scale
    assert np.abs(got - fp32).max() > 10 * np.abs(got - expected).max()  # the check can tell int8 from fp32
    assert np.abs(got - fp32).max() <= 0.2 * scale  # and it is the model, quantised


def test_calibration_is_what_sets_the_activation_ranges(tmp_path: Path) -> None:
    model = tiny_bert()
    small = quantize_int8(model, batches(2), tmp_path / "a.onnx", WORKLOAD)
    loud = batches(2, seed=1)
    for b in loud:  # other tokens: other activation ranges
        b.inputs["input_ids"] = (b.inputs["input_ids"] * 7) % 120
    other = quantize_int8(model, loud, tmp_path / "b.onnx", WORKLOAD)
    scales = [
        {i.name: float(numpy_helper.to_array(i)) for i in onnx.load(str(p)).graph.initializer if not i.dims}
        for p in (small.path, other.path)
    ]
    assert scales[0].keys() == scales[1].keys() and scales[0] != scales[1]


def test_an_empty_layer_is_left_float_and_the_rest_quantised(tmp_path: Path) -> None:
    model = tiny_bert()
    pruned = prunable.pruned_copy(model, random_plan(model, 1, empty_layer=1), check_weights=False)
    int8 = quantize_int8(pruned, batches(2), tmp_path / "model.onnx", WORKLOAD)
    ops = [n.op_type for n in onnx.load(str(int8.path)).graph.node]
    assert ops.count("DequantizeLinear") > 0
    inputs = batches(1, seed=3)[0].inputs
    with torch.no_grad():
        expected = pruned(**inputs).last_hidden_state
    assert torch.allclose(int8(**inputs).last_hidden_state, expected, atol=0.2 * float(expected.abs().max()))


def test_an_input_the_graph_lacks_is_refused_unless_it_holds_its_default(quantized: tuple) -> None:
    _, int8, _ = quantized
    inputs = batches(1)[0].inputs
    zeros = int8(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).last_hidden_state
    assert torch.equal(zeros, int8(**inputs).last_hidden_state)
    with pytest.raises(ValueError, match="takes no 'token_type_ids' input"):
        int8(**inputs, token_type_ids=torch.ones_like(inputs["input_ids"]))


def test_recipe_is_checked_and_recorded() -> None:
    with pytest.raises(ValueError, match="calibration_samples=0"):
        Int8Recipe(calibration_samples=0)
    described = Int8Recipe(calibration_samples=64, calibration_seed=3).describe()
    assert described["format"] == "QDQ" and described["calibration_samples"] == 64
    assert described["runtime"].startswith("onnxruntime ")
    assert described["reduce_range"] is int8_saturates()  # this CPU's choice, recorded
    assert (
        "7-bit" in Int8Recipe(reduce_range=True).summary()
        and "7-bit" not in Int8Recipe(reduce_range=False).summary()
    )


def test_weights_take_7_bits_where_int8_kernels_would_saturate() -> None:
    assert int8_saturates({"sse2", "avx2", "fma"})  # x86 without VNNI: u8 x s8 pairs summed in int16
    assert not int8_saturates({"sse2", "avx2", "avx512f", "avx512_vnni"})
    assert not int8_saturates({"sse2", "avx2", "avx_vnni"}) and not int8_saturates({"sse2", "amx_int8"})
    assert not int8_saturates({"fp", "asimd", "asimddp"})  # ARM: not these kernels


# A small search priced for an int8 NPU: its front is measured on the int8 QDQ model.
# The int8 recipe as a config sets it (`int8.*`): its calibration draw reaches the re-scoring.
NPU = [
    "hardware=npu_intel",
    "recovery=none",
    "search.rescore=1",
    "search.uniform_baselines=[]",
    "int8.calibration_samples=48",
]
RECIPE = Int8Recipe(calibration_samples=48)


@pytest.fixture(scope="module")
def npu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwprune.search import run_config, write_report
    from tests.conftest import app_config

    tmp = tmp_path_factory.mktemp("npu")
    write_report(run_config(app_config(tmp, *NPU), tmp / "run"))
    return tmp / "run"


def test_an_int8_front_is_measured_on_the_int8_model(npu_run: Path) -> None:
    import pandas as pd

    pareto = pd.read_csv(npu_run / "pareto.csv")
    assert (pareto.metric_precision == "int8").all()
    assert (pareto.quantization == RECIPE.summary()).all()
    assert "MinMax on 48 train samples" in RECIPE.summary()
    dense = pareto[pareto.kind == "dense"].iloc[0]
    # The fidelity metric compares with the dense fp32 model: 100 unquantised, less at int8.
    assert dense.metric_unquantized == pytest.approx(100.0, abs=1e-3)
    assert 80.0 < dense.metric < 99.99
    plan = prunable.PrunePlan.load(npu_run / dense.plan_path)
    assert plan.metadata["precision"] == "int8"
    assert plan.metadata["quantization"] == RECIPE.describe()
    assert (
        "Metric measured at **int8** (the precision the latency is priced at; onnxruntime QDQ"
        in (npu_run / "report.md").read_text()
    )


def test_apply_reruns_the_int8_recipe_and_delivers_the_qdq_model(
    npu_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import pandas as pd

    from hwprune.search import _apply, apply_config, compose, run_apply
    from tests.conftest import SMALL

    timed: list[list[str]] = []
    real = _apply.measure

    def spy(models, **kwargs):  # type: ignore[no-untyped-def]
        timed.append([type(m).__name__ for m, _ in models])
        return real(models, **kwargs)

    monkeypatch.setattr(_apply, "measure", spy)
    pareto = pd.read_csv(npu_run / "pareto.csv")
    row = pareto[pareto.kind == "search"].iloc[0]
    result = run_apply(
        apply_config(
            plan=npu_run / row.plan_path,
            out=tmp_path / "out",
            task=compose("config", SMALL[:3]).task,
            repeats=1,
        )
    )
    # The plan's precision and recipe, rerun: the metric the search reported, on the int8 model.
    assert result["precision"] == "int8" and result["quantization"] == RECIPE.describe()
    assert result["metric_pruned"] == pytest.approx(row.metric, abs=1e-4)
    assert result["metric_unquantized"] == pytest.approx(row.metric_unquantized, abs=1e-4)
    assert result["metric_dense_same_precision"] < result["metric_dense"]
    # Dense as the user has it (torch fp32), the pruned and the dense int8 models, in the same rounds.
    assert timed == [["BertModel", "OnnxRuntimeModel", "OnnxRuntimeModel"]]
    assert result["workload"]["dtype"] == "fp32" and result["measured_speedup_same_precision"] > 0
    # model.onnx is the int8 QDQ model, run in a fresh ONNX Runtime process like the in-process one.
    onnx_result = result["onnx"]
    assert onnx_result["precision"] == "int8" and onnx_result["max_abs_diff"] <= onnx_result["tolerance"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    saved = prunable.PrunePlan.load(tmp_path / "out" / "hwprune_plan.yaml")
    assert saved.metadata["precision"] == "int8" and saved.metadata["quantization"]["format"] == "QDQ"
    assert json.loads((tmp_path / "out" / "apply.json").read_text())["precision"] == "int8"


def test_int8_apply_needs_its_onnx_model_and_a_prefill_workload(npu_run: Path, tmp_path: Path) -> None:
    from hwprune.search import apply_and_measure
    from hwprune.search.tasks import TASKS

    plan = npu_run / "plans" / "dense.yaml"
    task = TASKS["fidelity"].__new__(TASKS["fidelity"])  # never reached: the settings fail first
    with pytest.raises(ValueError, match=r"precision='int8' deploys the int8 QDQ model\.onnx; onnx=False"):
        apply_and_measure(plan, tmp_path / "a", task=task, onnx=False)
    with pytest.raises(ValueError, match="precision='int8' deploys the prefill ONNX graph"):
        apply_and_measure(plan, tmp_path / "b", task=task, workload={"phase": "decode", "kv_len": 16})


def test_apply_keeps_a_plans_recorded_weight_range_and_warns_where_it_saturates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from hwprune.search import _apply

    def plan(quantization: dict[str, object]) -> Any:  # what the recipe reads of a plan
        return SimpleNamespace(metadata={"quantization": quantization})

    monkeypatch.setattr(_apply, "int8_saturates", lambda: True)  # a CPU without VNNI
    with caplog.at_level("WARNING"):
        kept = _apply.recorded_int8_recipe(plan({"calibration_samples": 32, "reduce_range": False}))
    assert kept == Int8Recipe(calibration_samples=32, reduce_range=False)  # the plan's recipe, as made
    assert "keeps 8-bit weights, but this CPU's int8 kernels saturate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _apply.recorded_int8_recipe(plan({"reduce_range": True})).reduce_range is True
    assert caplog.text == ""
    # `int8.reduce_range=true` on hwprune-apply re-quantises it in 7 bits; unset fields stay the plan's.
    with caplog.at_level("INFO"):
        chosen = _apply.recorded_int8_recipe(
            plan({"calibration_samples": 32, "reduce_range": False}),
            {"reduce_range": True, "calibration_samples": None, "calibration_seed": None},
        )
    assert chosen == Int8Recipe(calibration_samples=32, reduce_range=True)
    assert "int8 recipe: the plan's, with {'reduce_range': True}" in caplog.text
    with pytest.raises(ValueError, match=r"int8\.calibration_samples=0 is invalid; valid: >= 1"):
        _apply.recorded_int8_recipe(plan({}), {"calibration_samples": 0})
    with pytest.raises(ValueError, match=r"int8\.bits is not a setting of the int8 recipe; valid: \["):
        _apply.recorded_int8_recipe(plan({}), {"bits": 4})


def test_the_int8_recipe_is_a_config_checked_at_compose() -> None:
    from hydra.errors import ConfigCompositionException

    from hwprune.search import compose
    from hwprune.search.config import AppConfig, ApplyConfig, to_object

    app = to_object(compose("config", ["int8.calibration_samples=64", "int8.reduce_range=true"]))
    assert isinstance(app, AppConfig)
    assert app.int8.build() == Int8Recipe(calibration_samples=64, reduce_range=True)
    default = to_object(compose("config", []))
    assert isinstance(default, AppConfig) and default.int8.build() == Int8Recipe()  # defaults: the recipe's
    with pytest.raises(ValueError, match=r"int8\.calibration_samples=0 is invalid; valid: >= 1"):
        to_object(compose("config", ["int8.calibration_samples=0"]))
    with pytest.raises(ConfigCompositionException, match="calibration_sampels"):
        compose("config", ["int8.calibration_sampels=3"])
    applied = to_object(compose("apply", ["plan=p.yaml", "out=o", "int8.reduce_range=true"]))
    assert isinstance(applied, ApplyConfig)
    assert (applied.int8.reduce_range, applied.int8.calibration_samples) == (True, None)  # unset: the plan's


def test_a_search_refuses_quantised_distillation_on_another_grid_than_its_int8_recipe(tmp_path: Path) -> None:
    from hwprune.search import run_config
    from tests.conftest import app_config

    saturates = int8_saturates()
    overrides = [
        *NPU[:1],
        "recovery=distill",
        "recovery.method.quantize=int8",
        f"recovery.method.reduce_range={str(saturates).lower()}",
        f"int8.reduce_range={str(not saturates).lower()}",
    ]
    with pytest.raises(ValueError, match=r"recovery\.method\.reduce_range=.* but int8\.reduce_range="):
        run_config(app_config(tmp_path, *overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "pareto.csv").exists()
