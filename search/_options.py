"""Schemas of the options inside the groups: task builds, saliency methods, samplers, recovery.

One dataclass per option (`task/build: sts`, `saliency: nvit`, `search: pls`, `recovery: distill`),
so a misspelt setting of one option fails at compose time; `search.config` registers them and holds
the apps' top-level schemas. The options' schemas are derived from their classes' constructors
(`schema_of`), one per class in the plug-in registries, so a setting and its default are written
once: in the constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import MISSING

from hwprune import hessian
from hwprune.errors import ConfigError
from hwprune.search import tasks
from hwprune.search._sampler import ParetoLocalSearchSampler
from hwprune.search.recovery import RECOVERY

_PLAIN = (int, float, bool, str)


def _config_type(annotation: Any) -> Any:
    """The type a config file can hold for a constructor argument, or None (then it is left out).

    Paths are strings in a config; `X | None` stays optional; anything else (objects, callables)
    has no place in a YAML file.
    """
    if annotation in _PLAIN:
        return annotation
    if annotation is Path:
        return str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        plain = {_config_type(a) for a in args}
        if len(plain) == 1 and None not in plain:
            (one,) = plain
            return one | None if type(None) in typing.get_args(annotation) else one
    return None


def _annotations(cls: type) -> dict[str, Any]:
    """The constructor's argument types, each evaluated alone (a library's hints may name types it
    imports for type checking only: those arguments are left out)."""
    module = vars(sys.modules[cls.__module__])
    hints: dict[str, Any] = {}
    for name, param in inspect.signature(cls).parameters.items():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, module)
            except Exception:
                continue
        hints[name] = annotation
    return hints


def _public_path(cls: type) -> str:
    """`cls`'s shortest import path (`optuna.samplers.TPESampler`, not its private module's)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def schema_of(cls: type, *, injected: tuple[str, ...] = ()) -> type:
    """A structured-config schema of `cls`: `_target_` and its keyword arguments with their defaults.

    Arguments of plain types (int, float, bool, str, paths, their optionals) become fields with the
    constructor's default, MISSING where it has none; others keep the constructor's default.

    Args:
        injected: Arguments the app passes when it instantiates (a task's tokenizer).

    Raises:
        TypeError: A required argument no config can hold and nobody injects (a plug-in bug).
    """
    hints = _annotations(cls)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=_public_path(cls)))]
    for name, param in inspect.signature(cls).parameters.items():
        if name in injected or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind = _config_type(hints.get(name))
        if kind is None:
            if param.default is param.empty:
                raise TypeError(f"{cls.__qualname__}: required argument {name!r} cannot be set from a config")
            continue
        default = MISSING if param.default is param.empty else param.default
        fields.append((name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


# Samplers are Optuna's classes (and ours): named here, their settings read from their constructors.
SAMPLERS: dict[str, type] = {
    "pls": ParetoLocalSearchSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
}


def option_schemas() -> dict[str, dict[str, type]]:
    """Per config group, one schema per option: read from the registries when called, so a plug-in
    defined after hwprune was imported is offered too."""
    return {
        "saliency": {name: schema_of(cls) for name, cls in hessian.SALIENCY.items()},
        "recovery": {name: schema_of(cls) for name, cls in RECOVERY.items()},
        "task/build": {name: schema_of(cls, injected=("tokenizer",)) for name, cls in tasks.TASKS.items()},
        "search": {name: schema_of(cls) for name, cls in SAMPLERS.items()},
    }


TOKENIZER_MODES = ("required", "optional", "none")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass
class TaskConfig:
    """A task: its name, whether it takes the model's tokenizer, and how to build it.

    `tokenizer` is "required" (text tasks), "optional" (used when the model ships one; the LM task
    falls back to bytes) or "none" (images).
    """

    name: str = MISSING
    tokenizer: str = "required"
    build: Any = MISSING

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZER_MODES:
            raise ConfigError(
                f"task.tokenizer {self.tokenizer!r} invalid; valid choices: {list(TOKENIZER_MODES)}"
            )


@dataclass
class SaliencyConfig:
    """A saliency method (`_target_` a `hessian.Saliency`, typed per option) and its score cache."""

    name: str = MISSING
    method: Any = MISSING
    cache_dir: str | None = "~/.cache/hwprune/saliency"
    # Where and in what pieces to score (hessian.ScoringOptions): a GPU, bf16 (None: where the model
    # is, in its dtype), and calibration samples per forward-backward pass (None: whole batches).
    # 8 bounds the activations held whatever the batch size, at no cost in speed (results/benchmarks/
    # saliency_scale.md) and the same scores.
    device: str | None = None
    dtype: str | None = None
    max_samples: int | None = 8

    def __post_init__(self) -> None:
        try:
            self.options()  # the one home of the checks
        except ValueError as err:
            raise ConfigError(f"saliency: {err}") from None

    def options(self) -> hessian.ScoringOptions:
        return hessian.ScoringOptions(device=self.device, dtype=self.dtype, max_samples=self.max_samples)


@dataclass
class RecoveryConfig:
    """Recovery after pruning: every re-scored candidate gets it before its metric is measured.

    Attributes:
        name: The option's name ("none", "reconstruct", "distill").
        method: The recovery (`_target_` a `hwprune.search.recovery.Recovery`) and its settings.
        samples: Training samples the task lends to recovery (never its evaluation data).
        seed: Seed of that draw.
    """

    name: str = MISSING
    method: Any = MISSING
    samples: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"recovery.samples={self.samples} is invalid; valid: >= 1")
