"""What every recovery method takes and returns: a pruned student, its dense teacher, training data."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hwprune import hessian, prunable
from hwprune._registry import Registry
from hwprune.errors import ConfigError, DataError


@dataclass(frozen=True)
class RecoveryData:
    """Inputs to recover on, disjoint from the data the task's metric is measured on.

    Attributes:
        batches: Model inputs; `targets` set where the task has labels.
        objective: The task's supervised per-sample loss over batches with targets, or None.
        description: What the data is, for reports.
    """

    batches: list[hessian.Batch]
    objective: hessian.Objective | None
    description: str

    def __post_init__(self) -> None:
        if not self.batches:
            raise DataError(f"recovery data {self.description!r} has no batches")


@dataclass
class RecoveryReport:
    """What a recovery did: the recipe, its cost, and its own held-out measure of success.

    Attributes:
        method: Recovery method name ("none", "reconstruct", "distill").
        params: The recipe's settings (enough to run it again).
        seconds: Wall time of the recovery.
        held_out_before: The method's own loss on held-out inputs before recovering.
        held_out_after: The same after recovering (lower is better).
        details: Anything else worth a line in a report (steps, per-layer errors, ...).
    """

    method: str
    params: dict[str, Any]
    seconds: float = 0.0
    held_out_before: float | None = None
    held_out_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        """The method and settings, as a plan records them for `hwprune-apply` to repeat."""
        return {"method": self.method, **self.params}


# Every recovery method, by name: filled as each class is defined.
RECOVERY: Registry[Recovery] = Registry("recovery method")


class Recovery(ABC):
    """Restores a pruned model's accuracy against its dense teacher, in place.

    The teacher is never modified: implementations run it under `torch.no_grad` only. A recovery is
    deterministic under its seed. A subclass with a `name` registers itself in `RECOVERY`.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            RECOVERY.add(cls)

    def recover(
        self,
        student: nn.Module,
        teacher: nn.Module,
        data: RecoveryData,
        *,
        layers: Sequence[int] | None = None,
    ) -> RecoveryReport:
        """Recover `student` (a pruned copy of `teacher`) in place; return what was done.

        Args:
            layers: The teacher layer each block of the student was pruned from, ascending, for a
                student with layers dropped (`plan.kept_layers()`); None when it has them all.
        """
        n_student, n_teacher = prunable.discover(student).num_layers, prunable.discover(teacher).num_layers
        if layers is None and n_student != n_teacher:
            raise ConfigError(
                f"the student has {n_student} layers, the teacher {n_teacher}: pass layers= (the teacher "
                "layer of each student block, plan.kept_layers())"
            )
        kept = list(range(n_teacher)) if layers is None else [int(i) for i in layers]
        if len(kept) != n_student or kept != sorted(set(kept)) or not all(0 <= i < n_teacher for i in kept):
            raise ConfigError(
                f"layers={kept} must name, ascending, one of the teacher's {n_teacher} layers for each of "
                f"the student's {n_student}"
            )
        started = time.perf_counter()
        was_training = student.training
        teacher.eval()
        student.eval()  # no dropout: recovery is deterministic, and dropout fights distillation
        try:
            report = self._recover(student, teacher, data, kept)
        finally:
            student.train(was_training)
        report.seconds = time.perf_counter() - started
        return report

    @abstractmethod
    def _recover(
        self, student: nn.Module, teacher: nn.Module, data: RecoveryData, layers: list[int]
    ) -> RecoveryReport:
        """The method itself, with `layers[j]` the teacher layer of student block j; `recover`
        checks that, times it and sets the models' modes."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The settings that define this recipe."""


class NoRecovery(Recovery):
    """Leaves the pruned model as it is."""

    name = "none"

    def _recover(
        self, student: nn.Module, teacher: nn.Module, data: RecoveryData, layers: list[int]
    ) -> RecoveryReport:
        return RecoveryReport(method=self.name, params={})

    def params(self) -> dict[str, Any]:
        return {}


def pooled(batch: hessian.Batch, hidden: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens the mask keeps: (B, T, D) -> (B, D)."""
    mask = batch.inputs.get("attention_mask")
    if mask is None or mask.shape != hidden.shape[:-1]:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def output_loss(
    batch: hessian.Batch, student_out: Any, teacher_out: Any, *, temperature: float = 2.0
) -> torch.Tensor:
    """How far the student's output is from the teacher's, as the model's user sees it.

    The KL divergence of temperature-softened logits for models with a head (LMs, classifiers),
    or 1 - cosine of the mean-pooled last hidden states for encoders used as sentence embedders.
    Both outputs need `hidden_states` (run with `output_hidden_states=True`).
    """
    logits = getattr(student_out, "logits", None)
    if logits is not None:
        t_logp = torch.log_softmax(teacher_out.logits / temperature, dim=-1)  # (B, [T,] V)
        s_logp = torch.log_softmax(logits / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, [T])
        if kl.dim() == 2:
            kl = valid_rows(batch, kl.unsqueeze(-1)).squeeze(-1)  # (n,) real tokens only
        return kl.mean() * temperature**2
    s_emb = pooled(batch, student_out.hidden_states[-1])  # (B, D)
    t_emb = pooled(batch, teacher_out.hidden_states[-1])
    return (1 - torch.nn.functional.cosine_similarity(s_emb, t_emb, dim=-1)).mean()


@torch.no_grad()
def held_out_output_loss(student: nn.Module, teacher: nn.Module, batches: list[hessian.Batch]) -> float:
    """Mean `output_loss` of the student over `batches`."""
    losses = []
    for batch in batches:
        s = student(**batch.inputs, output_hidden_states=True)
        t = teacher(**batch.inputs, output_hidden_states=True)
        losses.append(float(output_loss(batch, s, t)))
    return sum(losses) / max(len(losses), 1)


def valid_rows(batch: hessian.Batch, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (n_valid, D): the token rows the attention mask keeps (all rows without a mask)."""
    mask = batch.inputs.get("attention_mask")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D)
    if mask is None or mask.shape != hidden.shape[:-1]:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]
