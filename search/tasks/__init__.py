"""Tasks: calibration data and objectives for saliency, and the real metric of the Pareto front."""

from hwprune.search.tasks._base import TASKS, Task, higher_is_better
from hwprune.search.tasks._classification import (
    ClassificationTask,
    CrossEntropy,
    digits_split,
    train_vit_digits,
)
from hwprune.search.tasks._fidelity import PYDOC_SOURCE, FidelityTask, file_passages, pydoc_passages
from hwprune.search.tasks._lm import LMTask, NextTokenLoss
from hwprune.search.tasks._sts import CosineSimilarityLoss, STSTask, read_sts
from hwprune.search.tasks._text import embed_batch, embed_texts, length_batches, mean_pool

__all__ = [
    "PYDOC_SOURCE",
    "TASKS",
    "ClassificationTask",
    "CosineSimilarityLoss",
    "CrossEntropy",
    "FidelityTask",
    "LMTask",
    "NextTokenLoss",
    "STSTask",
    "Task",
    "digits_split",
    "embed_batch",
    "embed_texts",
    "file_passages",
    "higher_is_better",
    "length_batches",
    "mean_pool",
    "pydoc_passages",
    "read_sts",
    "train_vit_digits",
]
