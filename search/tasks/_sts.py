"""Sentence-pair similarity in the STS Benchmark's tab-separated format; metric Spearman x 100."""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from scipy.stats import spearmanr
from torch import nn

from hwprune import hessian
from hwprune.errors import ConfigError, DataError
from hwprune.search.recovery._base import RecoveryData
from hwprune.search.tasks._base import Task
from hwprune.search.tasks._text import embed_batch, embed_texts, length_batches

log = logging.getLogger("hwprune.search")

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
                raise DataError(f"{path}:{line_no}: {len(row)} columns, expected at least 7 ({STS_FORMAT})")
            try:
                score = float(row[4])
            except ValueError:
                raise DataError(
                    f"{path}:{line_no}: score {row[4]!r} is not a number ({STS_FORMAT})"
                ) from None
            if not 0.0 <= score <= 5.0:
                raise DataError(f"{path}:{line_no}: score {score} outside [0, 5]")
            first.append(row[5])
            second.append(row[6])
            scores.append(score)
    if not scores:
        raise DataError(f"{path}: no sentence pairs found; expected {STS_FORMAT}")
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
    """STS Benchmark: calibrate on the train file, choose plans on a validation split, report Spearman
    x 100 on the eval file.

    Args:
        train_path: STS-format file for calibration and recovery.
        eval_path: STS-format file for the reported metric.
        tokenizer: The model's tokenizer.
        calibration_samples: Sentence pairs drawn (seeded) from the train file.
        batch_size: Pairs per calibration batch; sentences per evaluation batch.
        max_length: Tokens per sentence (longer ones are truncated).
        seed: Seed of the calibration draw and of the validation split.
        validation_path: STS-format file plans are chosen on; None carves `validation_fraction` of
            the train file instead (those pairs then leave calibration and recovery).
        validation_fraction: Share of the train file held out for choosing plans when no
            `validation_path` is given; 0 chooses on the eval file (its figure is then a maximum over
            the plans, biased upwards).
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
        validation_path: str | Path | None = None,
        validation_fraction: float = 0.15,
    ) -> None:
        for name, value in (("calibration_samples", calibration_samples), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= validation_fraction <= 0.5:
            raise ConfigError(
                f"task.build.validation_fraction={validation_fraction}: valid: 0 (no validation split) to 0.5"
            )
        if _same_file(train_path, eval_path):
            raise ConfigError(
                f"task.build.eval_path={eval_path} is the training file too: recovery would train on what "
                "the metric is measured on; valid: another split (e.g. STS-B's sts-dev.csv)"
            )
        for other, role in ((train_path, "training"), (eval_path, "eval")):
            if validation_path is not None and _same_file(validation_path, other):
                raise ConfigError(
                    f"task.build.validation_path={validation_path} is the {role} file too: plans would be "
                    "chosen on what they are trained or reported on; valid: a split of its own, or "
                    "validation_path=null to hold out task.build.validation_fraction of the training file"
                )
        self.train_path, self.eval_path = Path(train_path), Path(eval_path)
        self.train = read_sts(train_path)
        self.eval = read_sts(eval_path)
        _check_rankable(self.eval, f"task.build.eval_path={eval_path}")
        self.validation_pairs: Pairs | None = None
        self._validation = ""
        if validation_path is not None:
            self.validation_pairs = read_sts(validation_path)
            _check_rankable(self.validation_pairs, f"task.build.validation_path={validation_path}")
            self._validation = f"{Path(validation_path).name} ({len(self.validation_pairs.scores)} pairs)"
        elif validation_fraction > 0:
            self._hold_out(validation_fraction, seed)
        self.tokenizer = tokenizer
        self.calibration_samples = calibration_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self._eval_batches: dict[str, tuple[list[hessian.Batch], torch.Tensor]] = {}

    def _hold_out(self, fraction: float, seed: int) -> None:
        """Move a seeded `fraction` of the train pairs to the validation split (too few: none, said)."""
        n_total = len(self.train.scores)
        count = round(fraction * n_total)
        # A draw of its own (not the calibration's), so calibration picks among the remaining pairs.
        picks = sorted(random.Random(f"validation-{seed}").sample(range(n_total), count))
        held = _subset(self.train, picks)
        if count < 2 or count >= n_total or len(set(held.scores.tolist())) < 2:
            log.warning(
                "task.build.validation_fraction=%g of %d training pairs leaves no usable validation split "
                "(%d pairs): plans are chosen on the eval file, whose figures are then biased upwards",
                fraction,
                n_total,
                count,
            )
            return
        keep = sorted(set(range(n_total)) - set(picks))
        self.train, self.validation_pairs = _subset(self.train, keep), held
        self._validation = f"{count} pairs held out of {self.train_path.name} (seed {seed})"

    @property
    def description(self) -> str:
        return f"STS-B ({self.train_path.name} -> {self.eval_path.name})"

    @property
    def validation(self) -> str | None:
        return self._validation or None

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
        return self._spearman(model, "eval", self.eval)

    def validate(self, model: nn.Module) -> float | None:
        return (
            None
            if self.validation_pairs is None
            else self._spearman(model, "validation", self.validation_pairs)
        )

    def _spearman(self, model: nn.Module, split: str, pairs: Pairs) -> float:
        """Spearman x 100 of the pairs' cosine similarities against their gold scores."""
        if split not in self._eval_batches:
            self._eval_batches[split] = length_batches(
                self.tokenizer,
                pairs.first + pairs.second,
                batch_size=4 * self.batch_size,
                max_length=self.max_length,
            )
        emb = embed_texts(model, *self._eval_batches[split])  # (2N, D): [first sentences; second sentences]
        n = len(pairs.first)
        cos = torch.nn.functional.cosine_similarity(emb[:n], emb[n:], dim=-1)  # (N,)
        return float(spearmanr(cos.numpy(), pairs.scores.numpy()).statistic) * 100.0


def _subset(pairs: Pairs, rows: list[int]) -> Pairs:
    return Pairs([pairs.first[i] for i in rows], [pairs.second[i] for i in rows], pairs.scores[rows])


def _check_rankable(pairs: Pairs, what: str) -> None:
    """Refuse a split whose Spearman's correlation is undefined (fewer than 2 distinct scores)."""
    distinct = len(set(pairs.scores.tolist()))
    if distinct < 2:
        raise DataError(
            f"{what}: {len(pairs.scores)} pair(s) with {distinct} distinct score(s); Spearman's correlation "
            "needs pairs with at least 2 different scores (else every metric is NaN); valid: an evaluation "
            "split such as STS-B's sts-dev.csv"
        )
