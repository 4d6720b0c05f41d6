"""Uniform precisions of the dense MiniLM on this CPU: what each one costs in accuracy and buys in speed.

The first measurement of the Prune -> Distill -> Quantize issue: before a precision becomes a search
choice per layer, what does each precision do to the whole model here? Each variant is a real
toolchain's, nothing written by hand:

- torch fp32 (the reference), torch bf16 (`model.to(torch.bfloat16)`), and bf16 in the attention
  or the MLP only;
- torch int8 with dynamic activation quantisation (`torch.ao.quantization.quantize_dynamic` of every
  Linear), per-tensor and per-channel weights;
- ONNX Runtime fp32, ONNX Runtime int8 dynamic (`onnxruntime.quantization.quantize_dynamic`,
  per-channel), and the int8 QDQ model that int8 NPU/TPU runtimes consume
  (`onnxruntime.quantization.quantize_static`, per-channel weights, activations calibrated on STS-B
  train sentences).

Per variant: STS-B dev Spearman x 100 (mean pooling, cosine), the mean cosine of its dev embeddings to
the fp32 model's, and latency at batch 32 x 128 in one interleaved run of every variant (median of
the rounds; speedup against torch fp32 in the same run).

Usage:
    python benchmarks/precision_cpu.py --stsb ../shared/data/stsb
Output: results/benchmarks/precision_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _command import command_line
from scipy.stats import spearmanr

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import interleaved
from hwprune.search import export_onnx
from hwprune.search.config import build_task, compose, to_object

log = logging.getLogger("precision_cpu")

Embed = Callable[[dict[str, np.ndarray]], np.ndarray]  # tokenised batch -> (B, D) pooled embeddings


def torch_embedder(model: torch.nn.Module) -> Embed:
    @torch.no_grad()
    def embed(batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
        hidden = model(**inputs).last_hidden_state.float()  # (B, T, D)
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    return embed


def ort_embedder(path: Path) -> Embed:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(batch: dict[str, np.ndarray]) -> np.ndarray:
        (hidden,) = session.run(None, batch)  # (B, T, D)
        mask = batch["attention_mask"][..., None].astype(np.float32)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1)

    return embed


def quantized(model: torch.nn.Module, *, per_channel: bool) -> torch.nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def bf16_parts(model: torch.nn.Module, parts: tuple[str, ...]) -> torch.nn.Module:
    """A copy whose attention and/or MLP sub-layers compute in bf16 (inputs cast in, outputs out)."""
    copy_ = copy.deepcopy(model)
    for layer in copy_.encoder.layer:
        modules = {
            "attention": layer.attention,
            "mlp": torch.nn.ModuleList([layer.intermediate, layer.output]),
        }
        for part in parts:
            for module in modules[part].modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
                    module.register_forward_pre_hook(
                        lambda m, args: tuple(a.to(torch.bfloat16) for a in args)
                    )
                    module.register_forward_hook(lambda m, args, out: out.float())
    return copy_


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--calibration", type=int, default=256, help="train sentences for int8 QDQ calibration"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/precision_cpu.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = datetime.now(timezone.utc)
    command = command_line()

    model = prunable.load_model(prunable.MINILM, "BertModel")
    cfg = to_object(
        compose(
            "config",
            [
                "task=sts",
                f"task.build.train_path={args.stsb / 'sts-train.csv'}",
                f"task.build.eval_path={args.stsb / 'sts-dev.csv'}",
            ],
        )
    )
    task = build_task(cfg.task, prunable.MINILM)  # type: ignore[attr-defined]
    tok = task.tokenizer
    dev_a, dev_b, gold = task.eval.first, task.eval.second, task.eval.scores.numpy()

    def batches(texts: list[str], size: int = 64) -> list[dict[str, np.ndarray]]:
        out = []
        for i in range(0, len(texts), size):
            enc = tok(
                texts[i : i + size], padding=True, truncation=True, max_length=args.seq, return_tensors="np"
            )
            out.append(
                {
                    "input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64),
                }
            )
        return out

    dev = batches(dev_a + dev_b)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        fp32_onnx = Path(tmp) / "fp32.onnx"
        export_onnx(
            model, cost_models.Workload(batch_size=2, seq_len=16), fp32_onnx
        )  # hwprune-apply's export
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference gives up on BERT's dynamic shapes; ONNX's own inference suffices.
        # The quantisation tools may leave external-data files in the working directory (a 90 MB
        # one was found in the checkout after a failed run): they work inside the temporary one.
        stack.enter_context(_working_directory(Path(tmp)))
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        dyn = Path(tmp) / "int8_dynamic.onnx"
        quantize_dynamic(str(pre), str(dyn), per_channel=True, weight_type=QuantType.QInt8)
        train_sentences = [s for pair in zip(task.train.first, task.train.second, strict=True) for s in pair]
        calibration = batches(train_sentences[: args.calibration], size=32)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.left = iter(calibration)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.left, None)

        qdq: dict[str, Path] = {}
        for ops in ("MatMul", "all"):  # the projections only, or every op (the tool's default)
            qdq[ops] = Path(tmp) / f"int8_qdq_{ops}.onnx"
            t0 = time.perf_counter()
            quantize_static(
                str(pre), str(qdq[ops]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"] if ops == "MatMul" else None,
            )  # fmt: skip
            log.info(
                "int8 QDQ (%s) calibrated on %d sentences in %.0f s",
                ops,
                args.calibration,
                time.perf_counter() - t0,
            )

        variants: dict[str, tuple[str, Embed, Callable[[], float]]] = {}
        ids = torch.randint(1000, 2000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        timed = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}

        def torch_variant(name: str, how: str, m: torch.nn.Module) -> None:
            embed = torch_embedder(m.eval())
            variants[name] = (how, embed, lambda: _ms(lambda: embed(timed)))

        def ort_variant(name: str, how: str, path: Path) -> None:
            embed = ort_embedder(path)
            variants[name] = (how, embed, lambda: _ms(lambda: embed(timed)))

        torch_variant("torch fp32", "reference", model)
        torch_variant("torch bf16", "model.to(torch.bfloat16)", copy.deepcopy(model).to(torch.bfloat16))
        torch_variant(
            "torch bf16 attention only", "attention Linears in bf16", bf16_parts(model, ("attention",))
        )
        torch_variant("torch bf16 MLP only", "MLP Linears in bf16", bf16_parts(model, ("mlp",)))
        torch_variant(
            "torch int8 dynamic, per-tensor", "quantize_dynamic, qint8", quantized(model, per_channel=False)
        )
        torch_variant(
            "torch int8 dynamic, per-channel",
            "quantize_dynamic, per-channel qint8",
            quantized(model, per_channel=True),
        )
        ort_variant("ORT fp32", "ONNX export, ONNX Runtime", fp32_onnx)
        ort_variant("ORT int8 dynamic", "onnxruntime quantize_dynamic, per-channel", dyn)
        ort_variant(
            "ORT int8 QDQ static, MatMul only",
            f"quantize_static QDQ of MatMul/Gemm, per-channel, {args.calibration} train sentences",
            qdq["MatMul"],
        )
        ort_variant(
            "ORT int8 QDQ static, every op", "the same, every op quantisable (the tool's default)", qdq["all"]
        )

        reference = np.concatenate([variants["torch fp32"][1](b) for b in dev])
        rows = []
        for name, (how, embed, _) in variants.items():
            emb = np.concatenate([embed(b) for b in dev])  # (2N, D)
            n = len(dev_a)
            cos = (emb[:n] * emb[n:]).sum(1) / (
                np.linalg.norm(emb[:n], axis=1) * np.linalg.norm(emb[n:], axis=1)
            )
            fidelity = (emb * reference).sum(1) / (
                np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1)
            )
            rows.append([name, how, 100 * spearmanr(cos, gold).statistic, float(fidelity.mean())])
            log.info("%s: Spearman %.2f, cosine to fp32 %.5f", name, rows[-1][2], rows[-1][3])
        times = interleaved([t for _, _, t in variants.values()], rounds=args.rounds, warmup=2)
    medians = [statistics.median(t) for t in times]
    lines = [
        "# Uniform precisions of MiniLM on this CPU (measured)",
        "",
        f"Command: `{command}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Machine: {cost_models.cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}. Model: bundled all-MiniLM-L6-v2 (dense). "
        f"Accuracy: STS-B dev ({len(dev_a)} pairs), Spearman x 100 of mean-pooled cosine; `cosine to fp32`: mean "
        f"cosine of each dev sentence's embedding to the torch fp32 one. Latency: batch {args.batch} x {args.seq} "
        f"tokens, {args.rounds} interleaved rounds of every variant (each round times all of them in a "
        "shuffled order), median; speedup = torch fp32 median / the variant's median, same run.",
        "",
        "| variant | how | dev Spearman | cosine to fp32 | median ms | speedup vs torch fp32 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, how, rho, fid), ms, t in zip(rows, medians, times, strict=True):
        q1, _, q3 = statistics.quantiles(t, n=4)
        lines.append(
            f"| {name} | {how} | {rho:.2f} | {fid:.5f} | {ms:.0f} ({q1:.0f}-{q3:.0f}) | {medians[0] / ms:.2f}x |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _ms(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()
