"""The ONNX artifact of `hwprune-apply`: exported from the pruned model, then loaded and run by ONNX
Runtime in a fresh process (no hwprune, no torch there) and checked against the torch model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwprune import cost_models, prunable
from hwprune.search._blocks import model_inputs

log = logging.getLogger("hwprune.apply")

# Largest |ONNX - torch| accepted, relative to the largest |torch output| (at least 1): fp32 graphs
# differ from eager PyTorch by summation order only (measured 1e-7 to 3e-7 on every family).
ONNX_TOLERANCE = 1e-4


class _Outputs(torch.nn.Module):
    """The model with one positional signature and one output tensor, as ONNX export needs."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(self.names, args, strict=True))
        out = self.model(**inputs)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if "attention_mask" in inputs:
            # A plan that keeps no attention unit leaves the mask unread, and the exporter would drop
            # the input: a server feeding the model's usual inputs would then be refused. Adding
            # zero times the mask keeps the signature (exactly the same output).
            out = out + inputs["attention_mask"].sum().mul(0).to(out.dtype)
        return out


def export_onnx(model: torch.nn.Module, workload: cost_models.Workload, path: Path) -> None:
    """Export the prefill forward of `model` (dynamic batch, and length for text) to `path`."""
    prefill = replace(workload, phase="prefill", seq_len=max(workload.seq_len, 2), kv_len=0)
    inputs = model_inputs(model, prefill)
    names = list(inputs)
    axes = {n: {0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"} for n in names}
    with prunable.exportable(model), warnings.catch_warnings():
        # The experts' scatter-add warns of duplicate indices; one expert's tokens are distinct.
        warnings.filterwarnings("ignore", message=".*duplicated values in 'index'")
        torch.onnx.export(
            _Outputs(model, names).eval(),
            tuple(inputs[n] for n in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=17,
        )


# Run in a fresh interpreter: what a serving process that has only onnxruntime and numpy would do.
_RUNNER = """
import sys, numpy as np, onnxruntime as ort
model, inputs, outputs = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
feeds = dict(np.load(inputs))
np.savez(outputs, output=session.run(None, feeds)[0], version=np.array(ort.__version__))
"""


def check_onnx(model: torch.nn.Module, path: Path, workload: cost_models.Workload) -> dict[str, Any]:
    """Run `path` in ONNX Runtime in a fresh process on inputs of another shape than the export's,
    and compare with `model`'s outputs.

    Returns:
        What apply.json records: runtime and version, the shape checked, the largest difference.

    Raises:
        RuntimeError: The runtime could not load or run the file, or its outputs differ.
    """
    batch, length = workload.batch_size + 1, max(workload.seq_len, 2) + 3  # not the export's shape
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int):
        length = min(length, limit)
    shape = replace(workload, phase="prefill", batch_size=batch, seq_len=length, kv_len=0)
    inputs = model_inputs(model, shape, seed=1)
    with torch.no_grad():
        expected = _Outputs(model, list(inputs))(*inputs.values()).float().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        feeds, result = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(feeds, **{k: v.numpy() for k, v in inputs.items()})  # type: ignore[arg-type]
        done = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(path), str(feeds), str(result)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"ONNX Runtime could not run {path.name} in a fresh process: {tail}")
        with np.load(result) as ran:
            got, version = ran["output"], str(ran["version"])
    # The model compared with: the pruned torch model, or for int8 its QDQ model run in this process.
    what = (
        "pruned torch model"
        if isinstance(model, torch.nn.Module) and any(True for _ in model.parameters())
        else "model in this process"
    )
    if got.shape != expected.shape:
        raise RuntimeError(f"{path.name}: ONNX Runtime gave shape {got.shape}, torch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    bound = ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    check = {
        "runtime": f"onnxruntime {version}",
        "process": "fresh (onnxruntime and numpy only)",
        "inputs": f"batch {batch}" + ("" if "pixel_values" in inputs else f" x {length} tokens"),
        "max_abs_diff": diff,
        "tolerance": bound,
    }
    if not diff <= bound:
        raise RuntimeError(
            f"{path.name} differs from the {what} by {diff:.3g} (tolerance {bound:.3g}): {json.dumps(check)}"
        )
    log.info("%s runs in %s and matches the %s (max |diff| %.1e)", path.name, check["runtime"], what, diff)
    return check
