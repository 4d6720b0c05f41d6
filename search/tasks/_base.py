"""What a task gives the rest of hwprune: calibration data with an objective, and a real metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from hwprune import hessian
from hwprune._registry import Registry
from hwprune.errors import ConfigError
from hwprune.search.recovery._base import RecoveryData

# Every task class, by its name: filled when a class is defined (`Task.__init_subclass__`), so that
# whatever needs the list (a metric's direction, the config schemas) reads it here.
TASKS: Registry[Task] = Registry("task")


class Task(ABC):
    """A dataset and metric that a pruned model is judged on.

    `calibration` feeds saliency; `evaluate` is the task metric of the Pareto front. Both take the
    model as it is now (dense, gated or pruned). A subclass with a `name` registers itself in
    `TASKS`.
    """

    name: ClassVar[str]  # the option's name under conf/task/
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            TASKS.add(cls)

    def prepare(self, dense: nn.Module) -> None:  # noqa: B027 - optional hook, most tasks need none
        """Called once with the dense model before anything is pruned (reference outputs)."""

    @abstractmethod
    def calibration(self, model: nn.Module) -> hessian.Calibration:
        """Calibration batches and the objective saliency is computed against."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The task metric of `model` on the evaluation data."""

    def validate(self, model: nn.Module) -> float | None:
        """The task metric of `model` on the validation data, or None where the task has none.

        Plans are chosen on this split and reported on the evaluation data, so the reported figure
        is not the best of many draws of the same noise. It never overlaps the evaluation data nor
        (where the task can keep it apart) what calibration and recovery see.
        """
        return None

    @property
    def validation(self) -> str | None:
        """What the validation data is (None: the task has none, plans are chosen on `evaluate`)."""
        return None

    @abstractmethod
    def recovery_data(self, *, samples: int, seed: int = 0) -> RecoveryData:
        """Up to `samples` training inputs for recovery, never drawn from the evaluation data.

        Batches carry the task's labels where it has them (for recovery that mixes them in).
        """

    @property
    def description(self) -> str:
        return type(self).__name__


def higher_is_better(metric_name: str) -> bool:
    """The direction of a task metric, from the registered task that defines it.

    Raises:
        ValueError: No registered task has this metric (guessing a direction would silently turn
            a lower-is-better metric into a higher-is-better one).
    """
    for task in TASKS:
        if task.metric_name == metric_name:
            return task.higher_is_better
    known = sorted({t.metric_name for t in TASKS})
    raise ConfigError(f"no task defines the metric {metric_name!r}; known metrics: {known}")
