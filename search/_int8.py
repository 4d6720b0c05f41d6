"""int8 as the int8 NPU, TPU and GPU runtimes consume it: an ONNX QDQ model made by ONNX Runtime's
quantisation tooling, and run by ONNX Runtime to measure its metric and its latency.

The recipe (`Int8Recipe`) is the one results/benchmarks/precision_cpu.md found to keep MiniLM's
accuracy: the projections only (MatMul and Gemm: 86.57 dev Spearman against 86.72 fp32), weights
int8 symmetric per output channel, activations int8 per tensor with MinMax ranges calibrated on the
task's training inputs (never on what the metric is measured on). Quantising every op the tool can
(its default) lost 14 Spearman points there: softmax and layer-norm inputs do not survive int8.

An int8 model is an `OnnxRuntimeModel`: called like the transformers model it was exported from
(`model(**inputs).last_hidden_state` or `.logits`), so the tasks, `check_onnx` and the timing take
it as they take a torch model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from hwprune import cost_models, hessian
from hwprune.errors import ConfigError, DataError
from hwprune.search._blocks import model_inputs
from hwprune.search._onnx import export_onnx

log = logging.getLogger("hwprune.quantize")

INT8_OPS = ("MatMul", "Gemm")


# x86 int8 GEMMs without VNNI multiply u8 x s8 pairs into int16 sums that saturate (vpmaddubsw);
# ONNX Runtime's remedy is weights in 7 bits ("reduce_range"). VNNI and AMX accumulate in int32.
VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_saturates(flags: set[str] | None = None) -> bool:
    """Whether int8 kernels on this CPU (or one with `flags`) can saturate: x86 without VNNI or AMX.

    Measured on an AMD EPYC without AVX-512 (family 25, model 1): ONNX Runtime's int8 BERT output was
    4.7e-3 from the QDQ arithmetic it stands for (at outputs up to 3.1); with 7-bit weights, 0.
    """
    flags = cost_models.cpu_flags() if flags is None else flags
    return "sse2" in flags and not flags & VNNI


@dataclass(frozen=True)
class Int8Recipe:
    """How a model is quantised to int8 (recorded in plans, pareto.csv and apply.json).

    Attributes:
        calibration_samples: Training samples whose activation ranges set the int8 scales.
        calibration_seed: Seed of their draw from the task's training data.
        reduce_range: Weights in 7 bits, so that int8 kernels that sum pairs of products in int16
            cannot saturate (None, the default: on where this CPU's kernels would,
            `int8_saturates()`; resolved when the recipe is made, so it is always a bool after).
    """

    calibration_samples: int = 256
    calibration_seed: int = 0
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.calibration_samples < 1:
            raise ConfigError(f"int8.calibration_samples={self.calibration_samples} is invalid; valid: >= 1")
        if self.reduce_range is None:  # frozen: set once, here
            object.__setattr__(self, "reduce_range", int8_saturates())

    def summary(self) -> str:
        """One line for tables (pareto.csv)."""
        return (
            f"onnxruntime QDQ int8 {'/'.join(INT8_OPS)}, per-channel {'7-bit ' if self.reduce_range else ''}weights, "
            f"MinMax on {self.calibration_samples} train samples (seed {self.calibration_seed})"
        )

    def describe(self) -> dict[str, Any]:
        """The recipe as data: enough to run it again."""
        import onnxruntime

        return {
            "runtime": f"onnxruntime {onnxruntime.__version__}",
            "format": "QDQ",
            "ops": list(INT8_OPS),
            "weights": f"int8{' in a 7-bit range' if self.reduce_range else ''}, symmetric, per output channel",
            "activations": "int8, per tensor, MinMax calibration",
            **asdict(self),
        }


class OnnxRuntimeModel(torch.nn.Module):
    """An ONNX file run by ONNX Runtime, called like the transformers model it was exported from.

    Args:
        path: The ONNX file (its directory must outlive the model: ONNX Runtime may read external
            data lazily).
        like: The torch model it was exported from: its config, main input and output field.
        threads: ONNX Runtime's intra-op threads (default: torch's, so both are timed alike).
    """

    def __init__(self, path: Path, like: torch.nn.Module, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = like.config
        self.main_input_name = getattr(like, "main_input_name", "input_ids")
        self.output_field = output_field(like)

    def feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs from a forward's keyword arguments (`graph_feeds`)."""
        return graph_feeds(inputs, self.input_names, main_input=self.main_input_name, file=self.path.name)

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        (out,) = self.session.run(["output"], self.feeds(inputs))
        return SimpleNamespace(**{self.output_field: torch.from_numpy(out)})

    def timer(self, workload: cost_models.Workload) -> Any:
        """One timed forward (ms) at `workload` (prefill: the graph is the prefill forward)."""
        if workload.phase == "decode":
            raise ConfigError(
                "an ONNX model exported by hwprune-apply is the prefill forward; it cannot time decode "
                f"({workload.describe()})"
            )
        feeds = self.feeds(model_inputs(self, workload))

        def run() -> float:
            start = time.perf_counter()
            self.session.run(["output"], feeds)
            return (time.perf_counter() - start) * 1e3

        return run


def graph_feeds(
    inputs: dict[str, torch.Tensor], names: Sequence[str], *, main_input: str, file: str
) -> dict[str, np.ndarray]:
    """The inputs `names` of an exported graph from a forward's keyword arguments.

    An input the graph does not take is dropped only where it holds its default (all zeros, as
    BERT's token_type_ids of single sentences): otherwise the graph would silently compute something
    else than the model was asked to.
    """
    for name, value in inputs.items():
        if name not in names and value is not None and bool(value.ne(0).any()):
            raise DataError(
                f"{file} takes no {name!r} input (it takes {list(names)}), and this batch's {name} is not all zeros"
            )
    feeds = {}
    for name in names:
        if name in inputs:
            feeds[name] = inputs[name].detach().cpu().numpy()
        elif name == "attention_mask":  # a forward without a mask attends to every token
            feeds[name] = np.ones(tuple(inputs[main_input].shape[:2]), dtype=np.int64)
        else:
            raise DataError(f"{file} needs the input {name!r}; got {sorted(inputs)}")
    return feeds


def output_field(model: torch.nn.Module) -> str:
    """The output `export_onnx` exports: `logits` for models with a head, else `last_hidden_state`."""
    probe = cost_models.Workload(batch_size=1, seq_len=2, dtype="fp32")
    inputs = {k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v
              for k, v in model_inputs(model, probe).items()}  # fmt: skip
    with torch.no_grad():
        out = model(**inputs)
    return "logits" if hasattr(out, "logits") else "last_hidden_state"


def empty_products(path: Path) -> list[str]:
    """The MatMul and Gemm nodes of the graph at `path` with an empty weight: a pruned layer that
    keeps no unit computes a (.., 0) product, which has nothing to quantise (and the tooling fails
    on its empty per-channel scales)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    empty = {init.name for init in graph.initializer if 0 in init.dims}
    return [n.name for n in graph.node if n.op_type in INT8_OPS and empty.intersection(n.input)]


def projections_only(path: Path) -> None:
    """Rewrite the QDQ file at `path` so that only the projections read quantised activations.

    ONNX Runtime's quantiser feeds a quantised tensor's dequantised copy to *every* consumer when one
    of them is quantised, so the residual additions, layer norms and shape ops of a transformer would
    read int8-rounded values too. The recipe quantises the projections' inputs only: every other
    consumer reads the float tensor again.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    float_of = {
        n.output[0]: q_input[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in q_input
    }
    rewired = 0
    for node in graph.node:
        if node.op_type in INT8_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
                rewired += 1
    # A quantise/dequantise pair only those consumers read is dead now: removed (QuantizeLinear's
    # output dies with its DequantizeLinear).
    for op in ("DequantizeLinear", "QuantizeLinear"):
        read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == op and n.output[0] not in read]
        for node in dead:
            graph.node.remove(node)
    read = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:  # their scales and zero points
        graph.initializer.remove(init)
    onnx.save(model, str(path))
    log.debug("%s: %d non-projection inputs read the float tensor again", path.name, rewired)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    # ONNX Runtime's quantisation tools may write external-data files into the working directory
    # (a 90 MB one was once found in the checkout after a failed run): they work in a scratch one.
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class _Reader:
    """The calibration inputs as ONNX Runtime's `CalibrationDataReader` asks for them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.left = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.left, None)


def quantize_int8(
    model: torch.nn.Module,
    calibration: Sequence[hessian.Batch],
    path: Path,
    workload: cost_models.Workload,
    *,
    reduce_range: bool | None = None,
) -> OnnxRuntimeModel:
    """`model` (fp32) as an int8 QDQ ONNX file at `path`, loaded in ONNX Runtime.

    Args:
        model: The fp32 model (pruned or not); not changed.
        calibration: Training batches whose activations set the int8 ranges.
        path: Where the int8 file is written (its directory must exist).
        workload: The export's example shape (batch and length stay dynamic in the file).
        reduce_range: Weights in 7 bits (None: where this CPU's int8 kernels would saturate).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise DataError("int8 calibration needs at least one batch of training inputs")
    start, target = time.perf_counter(), Path(path).resolve()  # resolved before the scratch directory
    fp32 = replace(workload, dtype="fp32", phase="prefill", kv_len=0)
    names = list(model_inputs(model, fp32))  # the export's inputs
    main_input = getattr(model, "main_input_name", "input_ids")
    feeds = [graph_feeds(b.inputs, names, main_input=main_input, file="the int8 export") for b in calibration]
    with tempfile.TemporaryDirectory(prefix="hwprune-int8-") as tmp, _working_directory(Path(tmp)):
        exported, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        export_onnx(model, fp32, exported)
        # Symbolic shape inference gives up on BERT's dynamic shapes; ONNX's own inference suffices.
        quant_pre_process(str(exported), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=int8_saturates() if reduce_range is None else reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(INT8_OPS),
            nodes_to_exclude=empty_products(prepared),
        )
        projections_only(target)
    rows = sum(len(next(iter(f.values()))) for f in feeds)
    log.info("int8 QDQ model calibrated on %d rows in %.1f s", rows, time.perf_counter() - start)
    return OnnxRuntimeModel(target, model)
