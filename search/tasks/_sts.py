"""Sentence-pair similarity in the STS Benchmark's tab-separated format; metric Spearman x 100."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from scipy.stats import spearmanr
from torch import nn

from hwprune import hessian
from hwprune.search.recovery._base import RecoveryData
from hwprune.search.tasks._base import Task
from hwprune.search.tasks._text import embed_batch, embed_texts, length_batches

STS_FORMAT = (
    "tab-separated, no header, no quoting: genre, file, year, id, score (0-5), sentence 1, sentence 2 "
    "(extra trailing columns are ignored)"
)


@dataclass(frozen=True)
class Pairs:
    first: list[str]
    second: list[str]
    scores: torch.Tensor  # (N,) gold similarity in [0, 5]


def read_sts(path: str | Path) -> Pairs:
    """Read an STS Benchmark file; errors name the file, the line and the expected format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"STS file {path} does not exist; expected {STS_FORMAT}")
    first, second, scores = [], [], []
    with path.open(encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) < 7:
                raise ValueError(f"{path}:{line_no}: {len(row)} columns, expected at least 7 ({STS_FORMAT})")
            try:
                score = float(row[4])
            except ValueError:
                raise ValueError(
                    f"{path}:{line_no}: score {row[4]!r} is not a number ({STS_FORMAT})"
                ) from None
            if not 0.0 <= score <= 5.0:
                raise ValueError(f"{path}:{line_no}: score {score} outside [0, 5]")
            first.append(row[5])
            second.append(row[6])
            scores.append(score)
    if not scores:
        raise ValueError(f"{path}: no sentence pairs found; expected {STS_FORMAT}")
    return Pairs(first, second, torch.tensor(scores, dtype=torch.float32))


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file, or two files with the same bytes."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_file() and pb.is_file()):
        return False
    return pa.samefile(pb) or (pa.stat().st_size == pb.stat().st_size and pa.read_bytes() == pb.read_bytes())


class CosineSimilarityLoss(hessian.Objective):
    """Per pair, (cos(u, v) - score/5)^2: the loss all-MiniLM-style models are tuned with on STS.

    Its curvature probe is sqrt(2) cos(u, v), whose squared gradient is the Gauss-Newton term
    l''(cos) (dcos/dθ)^2 of the squared error. The squared gradient of the loss itself (empirical
    Fisher) would weight every pair by its squared residual, which is not the loss's curvature.
    """

    name = "sts-cosine-mse-gn"  # the curvature probe is part of what the cache key must cover

    def cosines(self, model: nn.Module, batch: hessian.Batch) -> torch.Tensor:
        """(n_samples,) cosine similarity of each pair's two sentence embeddings."""
        assert batch.sample_of_row is not None
        emb = embed_batch(model, batch)  # (2n, D): rows of sample s are its two sentences
        rows = batch.sample_of_row.to(emb.device)
        # Rows are [first sentences; second sentences], each in sample order.
        u = emb[: rows.numel() // 2][rows[: rows.numel() // 2].argsort()]  # (n, D)
        v = emb[rows.numel() // 2 :][rows[rows.numel() // 2 :].argsort()]  # (n, D)
        cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)  # (n,)
        assert cos.shape == (batch.n_samples,)
        return cos

    def losses(self, model: nn.Module, batch: hessian.Batch) -> torch.Tensor:
        assert batch.targets is not None
        cos = self.cosines(model, batch)
        return (cos - batch.targets.to(cos)).pow(2)

    def curvature_losses(
        self, model: nn.Module, batch: hessian.Batch, generator: torch.Generator
    ) -> torch.Tensor:
        return 2**0.5 * self.cosines(model, batch)

    def loss_slope(self, probes: torch.Tensor, batch: hessian.Batch) -> torch.Tensor:
        assert batch.targets is not None
        # L = (p / sqrt(2) - y)^2, so dL/dp = sqrt(2) (cos - y).
        return 2**0.5 * (probes / 2**0.5 - batch.targets.to(probes))


class STSTask(Task):
    """STS Benchmark: calibrate on the train file, report Spearman x 100 on the eval file.

    Args:
        train_path: STS-format file for calibration.
        eval_path: STS-format file for the metric.
        tokenizer: The model's tokenizer.
        calibration_samples: Sentence pairs drawn (seeded) from the train file.
        batch_size: Pairs per calibration batch; sentences per evaluation batch.
        max_length: Tokens per sentence (longer ones are truncated).
        seed: Seed of the calibration draw.
    """

    name: ClassVar[str] = "sts"
    metric_name: ClassVar[str] = "spearman_x100"

    def __init__(
        self,
        *,
        train_path: str | Path,
        eval_path: str | Path,
        tokenizer: Any,
        calibration_samples: int = 512,
        batch_size: int = 32,
        max_length: int = 128,
        seed: int = 0,
    ) -> None:
        for name, value in (("calibration_samples", calibration_samples), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if _same_file(train_path, eval_path):
            raise ValueError(
                f"task.build.eval_path={eval_path} is the training file too: recovery would train on what "
                "the metric is measured on; valid: another split (e.g. STS-B's sts-dev.csv)"
            )
        self.train = read_sts(train_path)
        self.eval = read_sts(eval_path)
        distinct = len(set(self.eval.scores.tolist()))
        if distinct < 2:
            raise ValueError(
                f"task.build.eval_path={eval_path}: {len(self.eval.scores)} pair(s) with {distinct} distinct "
                "score(s); Spearman's correlation needs pairs with at least 2 different scores (else every "
                "metric is NaN); valid: an evaluation split such as STS-B's sts-dev.csv"
            )
        self.tokenizer = tokenizer
        self.calibration_samples = calibration_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self._eval_batches: tuple[list[hessian.Batch], torch.Tensor] | None = None
        self.train_path, self.eval_path = Path(train_path), Path(eval_path)

    @property
    def description(self) -> str:
        return f"STS-B ({self.train_path.name} -> {self.eval_path.name})"

    def _pair_batches(self, picks: list[int]) -> list[hessian.Batch]:
        """Batches of train pairs: rows [first sentences; second sentences], targets score / 5."""
        batches = []
        for start in range(0, len(picks), self.batch_size):
            idx = picks[start : start + self.batch_size]
            texts = [self.train.first[i] for i in idx] + [self.train.second[i] for i in idx]
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            n = len(idx)
            batches.append(
                hessian.Batch(
                    inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                    sample_of_row=torch.arange(n).repeat(2),  # (2n,): [first; second]
                    targets=self.train.scores[idx] / 5.0,
                )
            )
        return batches

    def calibration(self, model: nn.Module) -> hessian.Calibration:
        n_total = len(self.train.scores)
        picks = random.Random(self.seed).sample(range(n_total), min(self.calibration_samples, n_total))
        return hessian.Calibration(
            batches=self._pair_batches(picks),
            objective=CosineSimilarityLoss(),
            description=f"{len(picks)} pairs of {self.train_path.name} (seed {self.seed})",
        )

    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        n_total = len(self.train.scores)
        draw = random.Random(seed)
        picks = draw.sample(range(n_total), min(samples, n_total))
        # Pairs of similar length share a batch (far less padding), batches come in seeded order.
        picks.sort(key=lambda i: max(len(self.train.first[i]), len(self.train.second[i])))
        batches = self._pair_batches(picks)
        draw.shuffle(batches)
        return RecoveryData(
            batches=batches,
            objective=CosineSimilarityLoss(),
            description=f"{len(picks)} pairs of {self.train_path.name} (seed {seed})",
        )

    def evaluate(self, model: nn.Module) -> float:
        if self._eval_batches is None:
            texts = self.eval.first + self.eval.second
            self._eval_batches = length_batches(
                self.tokenizer, texts, batch_size=4 * self.batch_size, max_length=self.max_length
            )
        emb = embed_texts(model, *self._eval_batches)  # (2N, D)
        n = len(self.eval.first)
        cos = torch.nn.functional.cosine_similarity(emb[:n], emb[n:], dim=-1)
        return float(spearmanr(cos.numpy(), self.eval.scores.numpy()).statistic) * 100.0
