"""Saliency at scale: time and peak memory of NViT scoring by model size, whole batches against parts.

Random-init models of growing size (a 24-layer BERT-large shape and LLaMA-GQA decoders of about
0.1B, 0.5B and 1B parameters with 4:1 query:KV heads; on a GPU an 8B LLaMA-3 shape) are scored with
`hessian.NViTSaliency` on random calibration tokens, once with each calibration batch whole (what
every release before `ScoringOptions` did) and once in parts of `--max-samples` samples. Each run is
a fresh process, so its peak resident memory (and peak CUDA memory) is its own. The parts' scores
are compared with the whole batches' (largest difference relative to the largest score).

Objectives: next-token NLL (the `lm` task's) for the decoders, the distance of the mean-pooled last
hidden state to the dense model's (the `fidelity` task's) for BERT.

Usage:
    python benchmarks/saliency_scale.py --samples 16 --seq 128 --max-samples 2
    python benchmarks/saliency_scale.py --shapes llama_8b --device cuda --dtype bf16 --samples 8 \\
        --seq 512 --max-samples 1 --out results/benchmarks/saliency_scale_gpu.md
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from _command import command_line

from hwprune import cost_models, hessian
from hwprune.cost_models.profilers import nvml_metadata
from hwprune.hessian import _hutchinson as hutchinson_module
from hwprune.search.tasks._lm import NextTokenLoss

log = logging.getLogger("saliency_scale")

LLAMA = {"model_type": "llama", "vocab_size": 32000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
SHAPES: dict[str, dict[str, Any]] = {
    "bert_24x1024": {
        "model_type": "bert",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "llama_0.1b": LLAMA
    | {
        "hidden_size": 512,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 1536,
    },
    "llama_0.5b": LLAMA
    | {
        "hidden_size": 1024,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "intermediate_size": 3584,
    },
    "llama_1b": LLAMA
    | {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
    "llama_8b": LLAMA  # the LLaMA-3-8B shape
    | {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
}
CPU_SHAPES = ["bert_24x1024", "llama_0.1b", "llama_0.5b", "llama_1b"]
# The methods with the settings the benchmark runs them with (Hutchinson: a fixed number of probes,
# so its time is comparable across shapes).
METHODS = {
    "nvit": hessian.NViTSaliency,
    "taylor": hessian.TaylorSaliency,
    "fisher": hessian.FisherSaliency,
    "hutchinson": lambda: hessian.HutchinsonSaliency(max_probes=4, min_probes=4),
    # The same probes through the Hessian-vector products of releases before 2026-11-26 (double
    # backward holding the gradients and H v whole), to compare in one run.
    "hutchinson-before": lambda: hessian.HutchinsonSaliency(max_probes=4, min_probes=4),
}


def forms_before(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    probes: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hessian._hutchinson.quadratic_forms` as it was: H v whole, from the grad of g . v."""
    for p in params:
        p.requires_grad_(True)
    try:
        value = loss()
        grads = torch.autograd.grad(value, params, create_graph=True)
        gv = torch.stack([(g * v).sum() for g, v in zip(grads, probes, strict=True)]).sum()
        hv = torch.autograd.grad(gv, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    forms = torch.stack([(v.double() * h.double()).sum() for v, h in zip(probes, hv, strict=True)])
    return value.detach(), forms


def build(shape: str, device: str, dtype: str | None) -> torch.nn.Module:
    """The random-init model of `shape`, made directly on `device` in `dtype` (no host copy on a GPU)."""
    config = transformers.AutoConfig.for_model(**SHAPES[shape])
    cls = transformers.BertModel if config.model_type == "bert" else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=hessian.SCORING_DTYPES[dtype or "fp32"])
    return model.eval()


def mean_pooled(model: torch.nn.Module, batch: hessian.Batch) -> torch.Tensor:
    return model(**batch.inputs).last_hidden_state.mean(1)  # (rows, hidden)


def calibration(model: torch.nn.Module, samples: int, seq: int, batch_size: int) -> hessian.Calibration:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    batches = [  # made on the model's device: these are the calibration batches themselves
        hessian.Batch(
            inputs={
                "input_ids": torch.randint(0, vocab, (min(batch_size, samples - s), seq), generator=gen).to(
                    device
                )
            }
        )
        for s in range(0, samples, batch_size)
    ]
    if model.config.model_type == "bert":
        distance = hessian.OutputDistance(output=mean_pooled, name="pooled-distance")
        distance.set_reference(model, batches)
        objective: hessian.Objective = distance
    else:
        objective = NextTokenLoss()
    return hessian.Calibration(batches=batches, objective=objective, description=f"random tokens x {seq}")


def child(args: argparse.Namespace) -> None:
    """One scoring run in this process: prints a JSON line of its measurements."""
    started = time.perf_counter()
    model = build(args.shape, args.device, args.dtype)
    built_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    calib = calibration(model, args.samples, args.seq, args.batch_size)
    options = hessian.ScoringOptions(max_samples=args.max_samples or None)
    if args.method == "hutchinson-before":
        hutchinson_module.quadratic_forms = forms_before
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    scores = METHODS[args.method]().score(model, calib, options=options)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    scores.save(args.scores)
    out = {
        "shape": args.shape,
        "method": args.method,
        "params": params,
        "fp32_weights_gib": params * 4 / 2**30,
        "max_samples": args.max_samples or None,
        "build_s": built_s,
        "score_s": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "rss_before_scoring_gib": rss_before / 2**30,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30
        if args.device.startswith("cuda")
        else None,
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_child(
    args: argparse.Namespace, shape: str, method: str, max_samples: int | None, scores: Path
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--shape", shape, "--method", method]
    command += ["--samples", str(args.samples)]
    command += ["--seq", str(args.seq), "--batch-size", str(args.batch_size), "--device", args.device]
    command += ["--scores", str(scores)] + (["--dtype", args.dtype] if args.dtype else [])
    command += ["--max-samples", str(max_samples or 0)]  # 0: whole batches
    log.info("running %s", " ".join(command[1:]))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # a run that dies (out of memory: killed by the kernel) is a result too
        why = "killed (out of memory)" if done.returncode in (-9, 137) else f"failed (exit {done.returncode})"
        log.warning("%s %s %s: %s", shape, method, max_samples, why)
        return {"shape": shape, "method": method, "max_samples": max_samples, "error": why}
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=CPU_SHAPES, choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["nvit"], choices=sorted(METHODS))
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per calibration batch")
    parser.add_argument("--max-samples", type=int, default=2, help="samples per pass of the parts run")
    parser.add_argument(
        "--parts-only", action="store_true", help="skip the whole-batch runs (which need far more memory)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(hessian.SCORING_DTYPES), help="model dtype (default fp32)")
    parser.add_argument("--out", default="results/benchmarks/saliency_scale.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="nvit", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.child:
        child(args)
        return
    started = datetime.now(timezone.utc)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for method in args.methods:
                whole_path, parts_path = (
                    Path(tmp) / f"{shape}-{method}-whole.npz",
                    Path(tmp) / f"{shape}-{method}-parts.npz",
                )
                whole = None if args.parts_only else run_child(args, shape, method, None, whole_path)
                parts = run_child(args, shape, method, args.max_samples, parts_path)
                diff = float("nan")
                if whole is not None and "error" not in whole and "error" not in parts:
                    flat_a, flat_b = (flat(s) for s in map(hessian.UnitScores.load, (whole_path, parts_path)))
                    diff = float((flat_a - flat_b).abs().max() / flat_a.abs().max().clamp_min(1e-30))
                for run in (whole, parts):
                    if run is not None:
                        run["max_rel_diff"] = diff
                        rows.append(run)
                        log.info("%s", run)
            if {"hutchinson", "hutchinson-before"} <= set(args.methods):
                how = "parts" if args.parts_only else "whole"
                new, old = (Path(tmp) / f"{shape}-{m}-{how}.npz" for m in ("hutchinson", "hutchinson-before"))
                if new.exists() and old.exists():
                    a, b = (flat(hessian.UnitScores.load(f)) for f in (new, old))
                    notes.append(
                        f"{shape}: hutchinson vs hutchinson-before scores ({how}), largest "
                        f"difference / largest score {float((a - b).abs().max() / a.abs().max()):.1e}."
                    )
    write(args, rows, started, notes)


def flat(scores: hessian.UnitScores) -> torch.Tensor:
    return torch.cat([*scores.attention, *scores.mlp])


def write(args: argparse.Namespace, rows: list[dict[str, Any]], started: datetime, notes: list[str]) -> None:
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()} (driver {nvml_metadata().get('driver', '?')})"
    else:
        machine = f"{cost_models.cpu_name()}, {torch.get_num_threads()} threads"
    lines = [
        "# Saliency at scale: scoring time and peak memory (measured)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine}; torch {torch.__version__}.  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Random-init models, random calibration tokens "
        f"({args.samples} samples x {args.seq} tokens in batches of {args.batch_size}), model dtype "
        f"{args.dtype or 'fp32'}. `whole` scores each calibration batch in one forward and backward "
        f"pass (as before `ScoringOptions`); `parts` in passes of {args.max_samples} samples "
        "(`saliency.max_samples`). Peak RSS is the process's whole peak (Python, torch, the model, "
        "the calibration data and the scoring); the goal is <= 4 x fp32 weights + 2 GiB of the memory the "
        "scoring runs in (peak RSS on the CPU, peak CUDA memory on a GPU). `max rel diff` "
        "is the largest difference between the two runs' scores over the largest score"
        + (
            f" (in {args.dtype} it is rounding: kernels for other batch sizes round differently)."
            if args.dtype in ("bf16", "fp16")
            else "."
        ),
        "",
        "| shape | params | fp32 weights GiB | method | pass | score s | peak RSS GiB | RSS / fp32 weights "
        "| goal met | peak CUDA GiB | max rel diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        how = "whole" if r["max_samples"] is None else f"parts of {r['max_samples']}"
        if "error" in r:
            lines.append(f"| {r['shape']} | | | {r['method']} | {how} | {r['error']} | | | no | | |")
            continue
        # The goal bounds the memory the scoring runs in: the host's on the CPU, the GPU's on CUDA.
        held = r["peak_cuda_gib"] if r["peak_cuda_gib"] is not None else r["peak_rss_gib"]
        goal = held <= 4 * r["fp32_weights_gib"] + 2
        cuda = f"{r['peak_cuda_gib']:.1f}" if r["peak_cuda_gib"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['fp32_weights_gib']:.2f} | {r.get('method', 'nvit')} | "
            f"{how} | {r['score_s']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / r['fp32_weights_gib']:.1f} | {'yes' if goal else 'no'} | "
            f"{cuda} | {r['max_rel_diff']:.1e} |"
        )
    lines += ["", *notes] if notes else []
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
