"""Causal language modelling: perplexity on a text file (or Python's bundled documentation)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hwprune import hessian
from hwprune.errors import ConfigError, DataError
from hwprune.search.recovery._base import RecoveryData
from hwprune.search.tasks._base import Task
from hwprune.search.tasks._fidelity import PYDOC_SOURCE, pydoc_passages

log = logging.getLogger("hwprune.search")


def _token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of `text`; UTF-8 bytes when the model ships no tokenizer (vocab >= 256 needed)."""
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


class NextTokenLoss(hessian.Objective):
    """Per-sequence mean next-token negative log-likelihood."""

    name = "next-token-nll"

    def losses(self, model: nn.Module, batch: hessian.Batch) -> torch.Tensor:
        ids = batch.inputs["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
        # fp32 log-softmax whatever the model computes in (bf16 loses the small probabilities)
        nll = nn.functional.cross_entropy(
            logits.float().transpose(1, 2), ids[:, 1:], reduction="none"
        )  # (B, T-1)
        return nll.mean(1)


class LMTask(Task):
    """Perplexity of a causal LM on held-out blocks of a text.

    Args:
        tokenizer: The model's tokenizer, or None for byte-level ids.
        text_path: UTF-8 text; None uses Python's bundled documentation.
        block_size: Tokens per sequence.
        calibration_blocks: Blocks for calibration (from the start of the text).
        eval_blocks: Held-out blocks for the reported perplexity (from the end).
        validation_blocks: Blocks just before the evaluated ones that plans are chosen on (0: chosen
            on the evaluation blocks); none where the text has too few blocks left, with a warning.
        batch_size: Blocks per batch.
    """

    name: ClassVar[str] = "lm"
    metric_name: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    def __init__(
        self,
        *,
        tokenizer: Any = None,
        text_path: str | Path | None = None,
        block_size: int = 128,
        calibration_blocks: int = 64,
        eval_blocks: int = 64,
        batch_size: int = 8,
        validation_blocks: int = 16,
    ) -> None:
        if validation_blocks < 0:
            raise ConfigError(f"task.build.validation_blocks={validation_blocks}: valid: 0 (none) or more")
        if text_path is None:
            text, self.source = "\n\n".join(pydoc_passages()), PYDOC_SOURCE
        else:
            path = Path(text_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"text file {path} does not exist; expected UTF-8 text")
            text, self.source = path.read_text(encoding="utf-8"), str(path)
        ids = _token_ids(tokenizer, text)
        n_blocks = len(ids) // block_size
        if n_blocks < calibration_blocks + eval_blocks:
            raise DataError(
                f"{self.source}: {len(ids)} tokens make {n_blocks} blocks of {block_size}; "
                f"need {calibration_blocks} + {eval_blocks}"
            )
        if validation_blocks and n_blocks - eval_blocks - validation_blocks < calibration_blocks:
            log.warning(
                "%s: %d blocks leave none for %d validation blocks after %d + %d; plans are chosen on the "
                "evaluation blocks",
                self.source,
                n_blocks,
                validation_blocks,
                calibration_blocks,
                eval_blocks,
            )
            validation_blocks = 0
        blocks = ids[: n_blocks * block_size].view(n_blocks, block_size)  # (N, T)
        first_held = n_blocks - eval_blocks - validation_blocks  # [train | validation | eval]
        self.calib, self.eval_set = blocks[:calibration_blocks], blocks[n_blocks - eval_blocks :]
        self.validation_set = blocks[first_held : n_blocks - eval_blocks]
        self.train_blocks = blocks[:first_held]  # everything before the held-out blocks
        self.batch_size = batch_size

    @property
    def description(self) -> str:
        return f"perplexity on {self.source}"

    def _batches(self, blocks: torch.Tensor) -> list[hessian.Batch]:
        return [
            hessian.Batch(inputs={"input_ids": blocks[i : i + self.batch_size]})
            for i in range(0, len(blocks), self.batch_size)
        ]

    def calibration(self, model: nn.Module) -> hessian.Calibration:
        return hessian.Calibration(
            self._batches(self.calib), NextTokenLoss(), f"{len(self.calib)} blocks of {self.source}"
        )

    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        order = torch.randperm(len(self.train_blocks), generator=torch.Generator().manual_seed(seed))
        blocks = self.train_blocks[order[:samples]]
        return RecoveryData(
            self._batches(blocks),
            NextTokenLoss(),
            f"{len(blocks)} blocks of {self.source} before the evaluated ones",
        )

    @property
    def validation(self) -> str | None:
        n = len(self.validation_set)
        return f"{n} blocks of {self.source} before the evaluated ones" if n else None

    def evaluate(self, model: nn.Module) -> float:
        return self._perplexity(model, self.eval_set)

    def validate(self, model: nn.Module) -> float | None:
        return self._perplexity(model, self.validation_set) if len(self.validation_set) else None

    @torch.no_grad()
    def _perplexity(self, model: nn.Module, blocks: torch.Tensor) -> float:
        objective = NextTokenLoss()
        nll = torch.cat([objective.losses(model, b) for b in self._batches(blocks)])
        return math.exp(float(nll.mean()))
