"""NViT scoring time of the default run (bundled MiniLM, STS-B, 512 pairs) in whole batches and in parts.

What `saliency.max_samples` costs where memory is no problem: the two settings alternate twice in one
process (this machine's speed drifts), and the scores are compared.

Usage:
    python benchmarks/saliency_passes_minilm.py --stsb ../shared/data/stsb --max-samples 8
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hwprune import hessian, prunable
from hwprune.prunable import resolve_source
from hwprune.search.tasks import STSTask

log = logging.getLogger("saliency_passes_minilm")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stsb", type=Path, required=True, help="folder with sts-train.csv and sts-dev.csv")
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = prunable.load_model(prunable.MINILM, "BertModel")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(prunable.MINILM)))
    task = STSTask(
        train_path=args.stsb / "sts-train.csv", eval_path=args.stsb / "sts-dev.csv", tokenizer=tokenizer
    )
    task.prepare(model)
    calibration = task.calibration(model)
    reference = None
    for repeat in range(args.repeats):
        for max_samples in (None, args.max_samples):
            started = time.perf_counter()
            options = hessian.ScoringOptions(max_samples=max_samples)
            scores = hessian.NViTSaliency().score(model, calibration, options=options)
            seconds = time.perf_counter() - started
            flat = torch.cat([*scores.attention, *scores.mlp])
            reference = flat if reference is None else reference
            diff = float((flat - reference).abs().max() / reference.abs().max())
            print(
                f"repeat {repeat}: {'whole batches' if max_samples is None else f'parts of {max_samples}'}: "
                f"{seconds:.1f} s, max rel diff to the first run {diff:.1e}"
            )


if __name__ == "__main__":
    main()
