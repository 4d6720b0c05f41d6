"""What a task gives the rest of hwprune: calibration data with an objective, and a real metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from hwprune import hessian
from hwprune.search.recovery._base import RecoveryData


class Task(ABC):
    """A dataset and metric that a pruned model is judged on.

    `calibration` feeds saliency; `evaluate` is the task metric of the Pareto front. Both take the
    model as it is now (dense, gated or pruned).
    """

    name: ClassVar[str]  # the option's name under conf/task/
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def prepare(self, dense: nn.Module) -> None:  # noqa: B027 - optional hook, most tasks need none
        """Called once with the dense model before anything is pruned (reference outputs)."""

    @abstractmethod
    def calibration(self, model: nn.Module) -> hessian.Calibration:
        """Calibration batches and the objective saliency is computed against."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The task metric of `model` on the evaluation data."""

    @abstractmethod
    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        """Up to `samples` training inputs for recovery, never drawn from the evaluation data.

        Batches carry the task's labels where it has them (for recovery that mixes them in).
        """

    @property
    def description(self) -> str:
        return type(self).__name__
