"""Image classification accuracy, with a recipe that trains a small ViT on scikit-learn's digits.

The digits (1,797 real 8x8 handwritten digits, shipped inside scikit-learn) give a labelled vision
example that runs offline: `train_vit_digits` fits a small ViTForImageClassification in about a
minute on a laptop CPU and saves it as a model directory the search can load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hwprune import hessian
from hwprune.search.recovery._base import RecoveryData
from hwprune.search.tasks._base import Task

log = logging.getLogger(__name__)

DIGITS_SOURCE = "scikit-learn digits (8x8 images, 10 classes)"


def digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels); images (N, 1, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = round(test_fraction * len(images))
    test, train = order[:n_test], order[n_test:]
    return images[train], digits.target[train], images[test], digits.target[test]


class CrossEntropy(hessian.Objective):
    """Per-sample cross-entropy of a classifier's logits."""

    name = "cross-entropy"

    def losses(self, model: nn.Module, batch: hessian.Batch) -> torch.Tensor:
        assert batch.targets is not None
        logits = model(**batch.inputs).logits  # (B, classes)
        return nn.functional.cross_entropy(logits.float(), batch.targets.to(logits.device), reduction="none")


class ClassificationTask(Task):
    """Top-1 accuracy x 100 of an image classifier on scikit-learn's digits.

    Args:
        calibration_samples: Training images for calibration.
        batch_size: Images per batch.
        seed: Seed of the train/test split (use the one the model was trained with).
    """

    name: ClassVar[str] = "classification"
    metric_name: ClassVar[str] = "accuracy_x100"

    def __init__(self, *, calibration_samples: int = 256, batch_size: int = 64, seed: int = 0) -> None:
        x_train, y_train, x_test, y_test = digits_split(seed)
        n = min(calibration_samples, len(x_train))
        self.train = (torch.from_numpy(x_train), torch.from_numpy(y_train).long())
        self.calib = (self.train[0][:n], self.train[1][:n])
        self.test = (torch.from_numpy(x_test), torch.from_numpy(y_test).long())
        self.batch_size = batch_size

    @property
    def description(self) -> str:
        return f"{DIGITS_SOURCE}, held-out split"

    def _batches(self, x: torch.Tensor, y: torch.Tensor) -> list[hessian.Batch]:
        return [
            hessian.Batch(
                inputs={"pixel_values": x[i : i + self.batch_size]}, targets=y[i : i + self.batch_size]
            )
            for i in range(0, len(x), self.batch_size)
        ]

    def calibration(self, model: nn.Module) -> hessian.Calibration:
        return hessian.Calibration(self._batches(*self.calib), CrossEntropy(), f"{len(self.calib[0])} digits")

    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        order = torch.randperm(len(self.train[0]), generator=torch.Generator().manual_seed(seed))[:samples]
        x, y = self.train[0][order], self.train[1][order]
        return RecoveryData(self._batches(x, y), CrossEntropy(), f"{len(x)} training digits")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        correct = 0
        for b in self._batches(*self.test):
            correct += int((model(**b.inputs).logits.argmax(-1) == b.targets).sum())
        return 100.0 * correct / len(self.test[0])


def train_vit_digits(out: str | Path, *, epochs: int = 30, seed: int = 0) -> Path:
    """Train a small ViT on the digits' training split and save it to `out` (a model directory).

    Returns:
        `out`, loadable with `prunable.load_model(str(out), "ViTForImageClassification")`.
    """
    with torch.random.fork_rng(devices=[]):  # seeded training, the caller's generator untouched
        torch.manual_seed(seed)
        return _train_vit_digits(Path(out), epochs=epochs, seed=seed)


def _train_vit_digits(out: Path, *, epochs: int, seed: int) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(  # type: ignore[call-arg]
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config)
    x, y, x_test, y_test = digits_split(seed)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_t))
        for i in range(0, len(x_t), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(pixel_values=x_t[idx]).logits, y_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("digits ViT epoch %d: loss %.4f", epoch, loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=torch.from_numpy(x_test)).logits.argmax(-1).numpy() == y_test).mean()
    log.info("digits ViT test accuracy %.3f", acc)
    out = Path(out)
    model.save_pretrained(str(out))
    return out
