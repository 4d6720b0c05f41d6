"""Label-free fidelity to the dense model, on text every Python installation ships.

The default text is the English prose of Python's own bundled documentation (`pydoc_data.topics`,
the help() topics), so the embedded default run needs no download. Any plain-text file works too.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hwprune import hessian
from hwprune.errors import ConfigError, DataError
from hwprune.search.recovery._base import RecoveryData
from hwprune.search.tasks._base import Task
from hwprune.search.tasks._text import embed_batch, embed_texts, length_batches

log = logging.getLogger("hwprune.search")

PYDOC_SOURCE = "Python's bundled documentation (pydoc_data.topics)"


def pydoc_passages() -> list[str]:
    """Prose paragraphs of Python's help() topics: whitespace-normalised, code examples left out."""
    from pydoc_data import topics

    passages = []
    for text in topics.topics.values():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) > 80 and not para.startswith((">>>", "...")) and _letters(para) > 0.7:
                passages.append(para)
    return passages


def file_passages(path: str | Path) -> list[str]:
    """Non-empty paragraphs (blank-line separated) of a UTF-8 text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text file {path} does not exist; expected UTF-8 text, paragraphs split by blank lines"
        )
    passages = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    passages = [p for p in passages if p]
    if len(passages) < 2:
        raise DataError(f"{path}: found {len(passages)} paragraph(s); need at least 2 (blank-line separated)")
    return passages


def _letters(text: str) -> float:
    return sum(c.isalpha() or c.isspace() for c in text) / len(text)


class FidelityTask(Task):
    """How closely the pruned model's sentence embeddings match the dense model's.

    Calibration and evaluation passages are disjoint draws from the same source. The saliency objective
    is the label-free distance to the dense embeddings (Gauss-Newton by random projections); the metric
    is the mean cosine similarity x 100 between pruned and dense embeddings of the held-out passages.

    Args:
        tokenizer: The model's tokenizer.
        text_path: A text file; None uses Python's bundled documentation.
        calibration_samples: Passages for calibration.
        eval_samples: Held-out passages for the reported metric.
        validation_samples: Further held-out passages that plans are chosen on (0: chosen on the
            evaluation passages); none where the source has too few passages left, with a warning.
        batch_size: Passages per batch.
        max_length: Tokens per passage.
        seed: Seed of the split.
    """

    name: ClassVar[str] = "fidelity"
    metric_name: ClassVar[str] = "cosine_to_dense_x100"

    def __init__(
        self,
        *,
        tokenizer: Any,
        text_path: str | Path | None = None,
        calibration_samples: int = 256,
        eval_samples: int = 256,
        batch_size: int = 32,
        max_length: int = 128,
        seed: int = 0,
        validation_samples: int = 128,
    ) -> None:
        passages = pydoc_passages() if text_path is None else file_passages(text_path)
        # A passage repeated in the source (a fifth of pydoc's are) would sit in two splits at once.
        passages = list(dict.fromkeys(passages))
        if calibration_samples + eval_samples > len(passages):
            raise ConfigError(
                f"asked for {calibration_samples} + {eval_samples} passages, the source has {len(passages)}"
            )
        if validation_samples < 0:
            raise ConfigError(f"task.build.validation_samples={validation_samples}: valid: 0 (none) or more")
        random.Random(seed).shuffle(passages)
        self.source = PYDOC_SOURCE if text_path is None else str(text_path)
        held = calibration_samples + eval_samples
        if validation_samples and held + validation_samples >= len(passages):
            log.warning(
                "%s has %d passages: none left for %d validation passages after %d + %d; plans are chosen "
                "on the evaluation passages",
                self.source,
                len(passages),
                validation_samples,
                calibration_samples,
                eval_samples,
            )
            validation_samples = 0
        self.calib_texts = passages[:calibration_samples]
        self.eval_texts = passages[calibration_samples:held]
        self.validation_texts = passages[held : held + validation_samples]
        # Recovery may use every passage no metric does: calibration ones first, then the rest.
        self.train_texts = self.calib_texts + passages[held + validation_samples :]
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        self._reference: dict[str, torch.Tensor] = {}
        self._eval_batches: dict[str, tuple[list[hessian.Batch], torch.Tensor]] = {}

    @property
    def description(self) -> str:
        return f"fidelity to the dense model on {self.source}"

    @property
    def validation(self) -> str | None:
        return (
            f"{len(self.validation_texts)} other passages of {self.source}" if self.validation_texts else None
        )

    def prepare(self, dense: nn.Module) -> None:
        """Record the dense model's evaluation (and validation) embeddings (call once, before pruning)."""
        for split, texts in (("eval", self.eval_texts), ("validation", self.validation_texts)):
            if texts:
                self._reference[split] = embed_texts(dense, *self._batches(split, texts))

    def calibration(self, model: nn.Module) -> hessian.Calibration:
        batches, _ = length_batches(
            self.tokenizer, self.calib_texts, batch_size=self.batch_size, max_length=self.max_length
        )
        objective = hessian.OutputDistance(output=embed_batch, name="embedding-distance")
        objective.set_reference(model, batches)
        return hessian.Calibration(batches, objective, f"{len(self.calib_texts)} passages of {self.source}")

    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        texts = list(self.train_texts)
        random.Random(seed).shuffle(texts)
        texts = texts[:samples]
        batches = [
            hessian.Batch(inputs=dict(b.inputs))
            for b in length_batches(
                self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length
            )[0]
        ]
        random.Random(seed).shuffle(batches)  # length-sorted batches, in no particular order
        return RecoveryData(batches, None, f"{len(texts)} passages of {self.source} (none evaluated on)")

    def evaluate(self, model: nn.Module) -> float:
        return self._agreement(model, "eval", self.eval_texts)

    def validate(self, model: nn.Module) -> float | None:
        return self._agreement(model, "validation", self.validation_texts) if self.validation_texts else None

    def _agreement(self, model: nn.Module, split: str, texts: list[str]) -> float:
        """Mean cosine x 100 between the model's embeddings of `texts` and the dense model's."""
        if split not in self._reference:
            raise RuntimeError("FidelityTask.evaluate needs prepare(dense_model) first")
        emb = embed_texts(model, *self._batches(split, texts))  # (N, D)
        return (
            float(torch.nn.functional.cosine_similarity(emb, self._reference[split], dim=-1).mean()) * 100.0
        )

    def _batches(self, split: str, texts: list[str]) -> tuple[list[hessian.Batch], torch.Tensor]:
        if split not in self._eval_batches:
            self._eval_batches[split] = length_batches(
                self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length
            )
        return self._eval_batches[split]
