"""The saliency interface and its result: one finite score per prunable unit."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from hwprune import prunable
from hwprune._registry import Registry
from hwprune.errors import ConfigError, DataError, PlanError, UnsupportedModelError
from hwprune.hessian._calibration import Calibration


@dataclass
class UnitScores:
    """Saliency of every unit: `attention[i]` is (attention units,), `mlp[i]` is (neurons,) of layer i.

    Models with mixture-of-experts layers also have `experts[i]` (routed experts,) and
    `expert_mlp[i]` (experts, width), one score per expert and per expert neuron ((0,)-shaped for
    dense layers); for dense models both lists are empty.

    Scores estimate the loss increase when a unit alone is removed (larger = more important), on one
    scale for all layers, so sorting all units of a kind ranks them globally.
    """

    method: str
    structure_fingerprint: str
    attention: list[torch.Tensor]
    mlp: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    experts: list[torch.Tensor] = field(default_factory=list)
    expert_mlp: list[torch.Tensor] = field(default_factory=list)

    def of(self, kind: str) -> list[torch.Tensor]:
        """Per layer, the scores of one kind of unit ("attention", "mlp", "experts", "expert_mlp")."""
        if kind in prunable.GATE_KINDS:
            return getattr(self, kind)
        raise ConfigError(f"unknown unit kind {kind!r}; valid kinds: {list(prunable.GATE_KINDS)}")

    def check(self, structure: prunable.Structure) -> None:
        """Raise ValueError unless there is one finite score per unit of `structure`."""
        if self.structure_fingerprint != structure.fingerprint():
            raise PlanError(
                f"scores are for structure {self.structure_fingerprint}, the model is {structure.fingerprint()}"
            )
        shapes = {
            "attention": lambda la: (la.attention_units,),
            "mlp": lambda la: (la.mlp_width,),
            "experts": lambda la: (la.num_experts,),
            "expert_mlp": lambda la: (la.num_experts, la.expert_width),
        }
        moe = any(la.is_moe for la in structure.layers)
        for kind, shape in shapes.items():
            if kind in ("experts", "expert_mlp") and not moe and not self.of(kind):
                continue  # dense models carry no expert scores
            if len(self.of(kind)) != structure.num_layers:
                raise PlanError(
                    f"{kind}: scores for {len(self.of(kind))} layers, the model has {structure.num_layers}"
                )
            for i, (scores, layer) in enumerate(zip(self.of(kind), structure.layers, strict=True)):
                if tuple(scores.shape) != shape(layer):
                    raise PlanError(
                        f"layer {i} {kind}: {tuple(scores.shape)} scores for {shape(layer)} units"
                    )
                if not bool(torch.isfinite(scores).all()):
                    raise ValueError(f"layer {i} {kind}: non-finite scores")

    def to_frame(self) -> pd.DataFrame:
        """One row per unit: layer, kind, unit, score (an expert neuron's unit is "expert/neuron")."""
        rows: list[tuple[int, str, int | str, float]] = [
            (i, kind, u, float(s))
            for kind in prunable.UNIT_KINDS
            for i, layer_scores in enumerate(self.of(kind))
            for u, s in enumerate(layer_scores.tolist())
        ]
        rows += [
            (i, "experts", e, float(s)) for i, t in enumerate(self.experts) for e, s in enumerate(t.tolist())
        ]
        rows += [
            (i, "expert_mlp", f"{e}/{n}", float(s))
            for i, t in enumerate(self.expert_mlp)
            for e, row in enumerate(t.tolist())
            for n, s in enumerate(row)
        ]
        return pd.DataFrame(rows, columns=["layer", "kind", "unit", "score"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            f"{kind}_{i}": t.numpy() for kind in prunable.GATE_KINDS for i, t in enumerate(self.of(kind))
        }
        header = {
            "method": self.method,
            "structure_fingerprint": self.structure_fingerprint,
            "meta": self.meta,
        }
        with path.open("wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> UnitScores:
        with np.load(Path(path)) as data:
            header = json.loads(str(data["header"]))
            # Files written before 2026-11-26 call the attention units "heads".
            stored = {
                kind: "heads" if kind == "attention" and "heads_0" in data.files else kind
                for kind in prunable.GATE_KINDS
            }
            kinds = {
                kind: [
                    torch.from_numpy(data[f"{stored[kind]}_{i}"].copy())
                    for i in range(sum(1 for k in data.files if k.rsplit("_", 1)[0] == stored[kind]))
                ]
                for kind in prunable.GATE_KINDS
            }
        return cls(header["method"], header["structure_fingerprint"], meta=header["meta"], **kinds)


# A method's scores: per kind of unit, per layer; or (attention, mlp) for methods without expert scores.
Scored = dict[str, list[torch.Tensor]] | tuple[list[torch.Tensor], list[torch.Tensor]]


SCORING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ScoringOptions:
    """Where and in what pieces a saliency method runs: memory and speed, not the scores.

    Attributes:
        device: Where to score ("cpu", "cuda", "cuda:1"); None scores where the model is. A model
            elsewhere moves there for the scoring and back after it, unchanged.
        dtype: "bf16", "fp16" or "fp32" to score a copy in that dtype (made parameter by parameter,
            on `device`); None scores in the model's own. Part of the score cache key.
        max_samples: Calibration samples per forward and backward pass; None takes each calibration
            batch whole. Activation memory is in proportion to it; scores are the same up to
            floating-point summation order (samples do not interact in a forward pass).
    """

    device: str | None = None
    dtype: str | None = None
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in SCORING_DTYPES:
            raise ConfigError(
                f"unknown scoring dtype {self.dtype!r}; valid choices: {[*SCORING_DTYPES, None]}"
            )
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or self.max_samples < 1):
            raise ConfigError(f"max_samples must be >= 1 or None, got {self.max_samples!r}")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError):
                kind = None
            if kind not in ("cpu", "cuda", "mps"):
                raise ConfigError(
                    f"unknown scoring device {self.device!r}; valid choices: 'cpu', 'cuda[:i]', 'mps', None"
                )


# Every saliency method, by name: filled as each class is defined.
SALIENCY: Registry[Saliency] = Registry("saliency method")


@contextmanager
def placed(model: nn.Module, options: ScoringOptions) -> Iterator[nn.Module]:
    """`model` on the options' device and in their dtype, for the duration of the block.

    Same dtype: the model itself, moved (exactly) to the device and back. Another dtype: a copy,
    each parameter converted on its own so the host never holds a second full-precision model.
    """
    param = next(model.parameters())
    home = param.device  # read now: moving the model changes what its parameters report
    device = torch.device(options.device) if options.device is not None else home
    dtype = SCORING_DTYPES[options.dtype] if options.dtype is not None else param.dtype
    if dtype == param.dtype:
        if device == home:
            yield model
            return
        model.to(device)
        try:
            yield model
        finally:
            model.to(home)
        return

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device, dtype if t.is_floating_point() else t.dtype)

    scored = prunable.converted_copy(model, params=convert, buffers=convert)
    try:
        yield scored
    finally:
        del scored


class Saliency(ABC):
    """Scores every prunable unit of a model on calibration data.

    Subclasses implement `_score`; `score` wraps it with evaluation mode, placement (device, dtype),
    the structure check and the result check, so every method returns finite scores of the right
    shapes or raises. A subclass with a `name` registers itself in `SALIENCY` (pass
    `register=False` for one that should not be offered).
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            SALIENCY.add(cls)

    name: ClassVar[str]
    # Whether scores estimate the loss increase of removing a unit (so that they add up with other
    # loss estimates, such as measured layer scores); False for weight norms and random draws.
    estimates_loss: ClassVar[bool] = True
    # Whether the method scores routed experts and their neurons (else it refuses MoE models).
    scores_experts: ClassVar[bool] = False
    # Whether scores are made of the loss gradient alone (zero where the loss is at its minimum).
    gradient_only: ClassVar[bool] = False

    def score(
        self, model: nn.Module, calibration: Calibration, *, options: ScoringOptions | None = None
    ) -> UnitScores:
        """One score per unit of `prunable.discover(model)`.

        Args:
            options: Device, dtype and samples per pass (default: where the model is, in its
                dtype, whole batches).
        """
        options = options or ScoringOptions()
        structure = prunable.discover(model)
        if not calibration.batches:
            raise DataError(f"{self.name}: calibration has no batches")
        self.check_structure(structure)
        self.check_objective(calibration)
        moe = any(la.is_moe for la in structure.layers)
        was_training = model.training
        model.eval()  # dropout off: saliency of the deterministic network
        try:
            with placed(model, options) as scored:
                result = self._score(scored, structure, calibration, options)
        finally:
            model.train(was_training)
        kinds: dict[str, list[torch.Tensor]] = (
            result if isinstance(result, dict) else dict(zip(prunable.UNIT_KINDS, result, strict=True))
        )
        final = {
            k: [t.detach().double().cpu() for t in kinds[k]] for k in kinds if moe or k in prunable.UNIT_KINDS
        }
        scores = UnitScores(
            method=self.name,
            structure_fingerprint=structure.fingerprint(),
            **final,
            meta={
                "params": self.params(),
                "scoring": {k: v for k, v in asdict(options).items() if v is not None},
                "calibration": calibration.description,
                "samples": calibration.n_samples,
            },
        )
        scores.check(structure)
        if all(not bool(t.any()) for kind in prunable.GATE_KINDS for t in scores.of(kind)):
            raise ConfigError(
                f"saliency={self.name} scored every unit 0 on {calibration.description}: the loss does not "
                "change with any unit there, so every plan would look free; use a task with labels, or "
                f"another saliency method: {[m.name for m in SALIENCY if m is not type(self)]}"
            )
        return scores

    def params(self) -> dict[str, Any]:
        """Settings that change the scores (part of the cache key)."""
        return {}

    def check_structure(self, structure: prunable.Structure) -> None:
        """Raise ValueError, naming the methods that can, if this method cannot score `structure`.

        Cheap (no model needed): apps call it before loading data or running anything.
        """
        if any(la.is_moe for la in structure.layers) and not self.scores_experts:
            raise UnsupportedModelError(
                f"saliency {self.name} does not score routed experts, and {structure.model_class} has them; "
                f"valid for mixture-of-experts models: {[m.name for m in SALIENCY if m.scores_experts]}"
            )

    def check_objective(self, calibration: Calibration) -> None:
        """Raise ValueError, naming the methods that can, if this method would score every unit 0.

        Cheap (no pass over the data): apps call it before the scoring passes.
        """
        objective = calibration.objective
        if self.gradient_only and objective.minimal_at_dense:
            valid = [m.name for m in SALIENCY if not m.gradient_only]
            raise ConfigError(
                f"saliency={self.name} uses the loss gradient alone, and the {objective.name} objective is at "
                f"its minimum at the dense model (a distance to its own outputs): every score would be 0; "
                f"valid with this objective: {valid}, or a task with labels"
            )

    @abstractmethod
    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        """Per kind of unit, per layer, the scores, with `model` already placed; (attention-unit
        scores, neuron scores) from methods that do not score experts."""


class SeededSaliency(Saliency):
    """A saliency method whose scores depend on a random seed (projections, probes, draws).

    Args:
        seed: The seed; part of the cache key.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Stop weight gradients (methods that only need gate gradients save the memory and time)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def unit_sums(
    coupled: list[prunable.Coupling], values: dict[int, torch.Tensor], n_units: int
) -> torch.Tensor:
    """Sum, per unit, `values[id(param)]` over the unit's slices of every coupled parameter."""
    total = torch.zeros(n_units, dtype=torch.float64)
    for coupling in coupled:
        for param, dim in coupling.parameters_and_dims():
            total += coupling.per_unit(values[id(param)], dim).double().sum(1).cpu()
    return total
