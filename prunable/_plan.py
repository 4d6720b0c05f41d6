"""Pruning plans: which units each layer keeps, in a versioned, human-readable file.

A plan names the model it was made for (a structure fingerprint and, optionally, a weights
fingerprint), and is checked against a model in full before any weight is touched.

File layout (YAML; JSON is read too)::

    format: hwprune.plan
    version: 1
    model: {source: bundled:all-MiniLM-L6-v2, class_name: BertModel,
            structure_fingerprint: ..., weights_fingerprint: ...}
    hardware: cpu_local        # or null
    metadata: {...}            # free-form: predicted latency, saliency method, ...
    layers:
    - heads: [0, 2, 3]         # kept query heads (whole KV groups under GQA)
      mlp: [0, 1, 5, ...]      # kept MLP neurons
    - drop: true               # the whole layer goes (depth pruning): the model has one layer fewer
    - heads: [0, 1]            # a mixture-of-experts layer also says which routed experts it keeps
      mlp: []                  #   (the shared expert's neurons, if it has one)
      experts: [0, 2, 3]       #   at least top_k of them
      expert_mlp: [[0, 5], [1, 2], [0, 7]]   # each kept expert's neurons, as many for each
    - heads: [0, 1, 2]         # a layer may say the precision its projections run at
      mlp: [0, 3, 4]           #   (`prunable.set_precisions`; absent: the model's own dtype)
      precision: {attention: bf16, mlp: fp32}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from hwprune.errors import PlanError
from hwprune.prunable._plan_checks import layer_problems
from hwprune.prunable._structure import LayerStructure, Structure

PLAN_FORMAT = "hwprune.plan"
# The precisions a plan may set per block, and the torch dtypes `set_precisions` runs them in.
PLAN_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLAN_VERSION = 1
SUPPORTED_VERSIONS = (1,)


@dataclass(frozen=True)
class ModelRef:
    """The model a plan was made for.

    Attributes:
        class_name: `transformers` class to load it with (e.g. "BertModel").
        structure_fingerprint: `Structure.fingerprint()` of the model the plan indexes into.
        source: Where to load it from: a local path, or "bundled:all-MiniLM-L6-v2". None when the
            model was built in memory.
        weights_fingerprint: Hash of the backbone weights, or None to skip that check.
    """

    class_name: str
    structure_fingerprint: str
    source: str | None = None
    weights_fingerprint: str | None = None


@dataclass(frozen=True)
class LayerPlan:
    """Kept units of one layer: query-head indices and MLP-neuron indices, ascending.

    A layer with `drop` set is removed from the model altogether (it keeps no units): the pruned
    model has one block fewer, where a layer keeping no units stays as a block that only adds its
    sub-layers' output biases (and, in a post-norm block, applies its norms).

    `precision`, where set, is the (attention, MLP) precision the layer's projections run at, among
    `PLAN_PRECISIONS`; None leaves them in the model's own dtype.
    """

    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    drop: bool = False
    experts: tuple[int, ...] | None = None
    expert_mlp: tuple[tuple[int, ...], ...] | None = None
    precision: tuple[str, str] | None = None

    def kept_units(self, layer: LayerStructure) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept attention units, kept MLP neurons) of `layer`, as ascending index tensors."""
        groups = sorted({h // layer.heads_per_unit for h in self.heads})
        return torch.tensor(groups, dtype=torch.long), torch.tensor(self.mlp, dtype=torch.long)

    def kept_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept experts (k,), each one's kept neurons (k, width)) of a mixture-of-experts layer."""
        experts = torch.tensor(self.experts or (), dtype=torch.long)
        neurons = torch.tensor(self.expert_mlp or (), dtype=torch.long).reshape(len(experts), -1)
        return experts, neurons


@dataclass(frozen=True)
class PrunePlan:
    """Which units of every layer to keep.

    Build one with `PrunePlan.from_units` (unit indices per layer) or `PrunePlan.load`; check it
    against a model's structure with `check`; apply it with `prunable.apply_plan`.
    """

    model: ModelRef
    layers: tuple[LayerPlan, ...]
    hardware: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_units(
        cls,
        structure: Structure,
        model: ModelRef,
        *,
        attention: Sequence[Sequence[int]],
        mlp: Sequence[Sequence[int]],
        drop: Sequence[bool] | None = None,
        experts: Sequence[Sequence[int] | None] | None = None,
        expert_mlp: Sequence[Sequence[Sequence[int]] | None] | None = None,
        hardware: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PrunePlan:
        """A plan keeping, per layer, the given attention units (KV groups) and MLP neurons.

        Args:
            drop: Per layer, whether to remove the whole layer (it must then keep no units).
            experts: Per layer, the routed experts to keep (None: all of a mixture-of-experts
                layer's; ignored for dense layers).
            expert_mlp: Per layer, each kept expert's neurons (None: all of them).
        """
        drop = [False] * structure.num_layers if drop is None else [bool(d) for d in drop]
        if not len(attention) == len(mlp) == len(drop) == structure.num_layers:
            raise PlanError(
                f"need one entry per layer ({structure.num_layers}), got {len(attention)} attention, {len(mlp)} mlp "
                f"and {len(drop)} drop entries"
            )
        layers = []
        for i, (layer, units, neurons, dropped) in enumerate(
            zip(structure.layers, attention, mlp, drop, strict=True)
        ):
            rep = layer.heads_per_unit
            query_heads = sorted(int(u) * rep + r for u in units for r in range(rep))
            kept_experts: tuple[int, ...] | None = None
            kept_expert_mlp: tuple[tuple[int, ...], ...] | None = None
            if layer.is_moe and not dropped:
                given = experts[i] if experts is not None else None
                chosen: Sequence[int] = given if given is not None else range(layer.num_experts)
                kept_experts = tuple(sorted(int(e) for e in chosen))
                widths = expert_mlp[i] if expert_mlp is not None and expert_mlp[i] is not None else None
                kept_expert_mlp = tuple(
                    tuple(
                        sorted(
                            int(n) for n in (widths[j] if widths is not None else range(layer.expert_width))
                        )
                    )
                    for j in range(len(kept_experts))
                )
            layers.append(
                LayerPlan(
                    heads=tuple(query_heads),
                    mlp=tuple(sorted(int(n) for n in neurons)),
                    drop=dropped,
                    experts=kept_experts,
                    expert_mlp=kept_expert_mlp,
                )
            )
        return cls(model=model, layers=tuple(layers), hardware=hardware, metadata=dict(metadata or {}))

    @classmethod
    def dense(cls, structure: Structure, model: ModelRef, **kwargs: Any) -> PrunePlan:
        """The plan that keeps everything."""
        return cls.from_units(
            structure,
            model,
            attention=[range(la.attention_units) for la in structure.layers],
            mlp=[range(la.mlp_width) for la in structure.layers],
            **kwargs,
        )

    # ------------------------------------------------------------------ checks

    def check(self, structure: Structure, *, weights_fingerprint: str | None = None) -> None:
        """Raise `PlanError` listing every way this plan does not fit `structure`.

        Args:
            structure: The structure of the model the plan is about to be applied to.
            weights_fingerprint: That model's weights fingerprint; compared when both it and the
                plan's are given.
        """
        if self.model.structure_fingerprint != structure.fingerprint():
            raise PlanError(
                f"plan was made for a different model: its structure fingerprint is "
                f"{self.model.structure_fingerprint} ({self.model.class_name}, source {self.model.source}), "
                f"this model's is {structure.fingerprint()} ({structure.describe()})"
            )
        wanted = self.model.weights_fingerprint
        if wanted is not None and weights_fingerprint is not None and wanted != weights_fingerprint:
            raise PlanError(
                f"plan was made for other weights: weights fingerprint {wanted}, this model's is "
                f"{weights_fingerprint} (same architecture, different checkpoint)"
            )
        if len(self.layers) != structure.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers, the model has {structure.num_layers}")
        if all(lp.drop for lp in self.layers):
            raise PlanError(f"plan drops all {structure.num_layers} layers; a model needs at least one")
        problems = [
            f"layer {i}: {p}"
            for i, (lp, layer) in enumerate(zip(self.layers, structure.layers, strict=True))
            for p in layer_problems(lp, layer)
        ]
        if problems:
            raise PlanError("invalid plan:\n  " + "\n  ".join(problems))

    def kept_units(self, structure: Structure) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (kept attention units, kept MLP neurons) as ascending index tensors."""
        return [lp.kept_units(layer) for lp, layer in zip(self.layers, structure.layers, strict=True)]

    def kept_counts(self) -> list[tuple[int, int]]:
        """Per layer, (query heads kept, MLP neurons kept); (0, 0) for a dropped layer."""
        return [(len(lp.heads), len(lp.mlp)) for lp in self.layers]

    def dropped(self) -> list[int]:
        """Indices of the layers the plan removes."""
        return [i for i, lp in enumerate(self.layers) if lp.drop]

    def kept_layers(self) -> list[int]:
        """Indices of the layers the plan keeps: block j of the pruned model is dense layer `kept_layers()[j]`."""
        return [i for i, lp in enumerate(self.layers) if not lp.drop]

    # ------------------------------------------------------------------ files

    def with_precisions(self, attention: Sequence[str], mlp: Sequence[str]) -> PrunePlan:
        """This plan with each layer's attention and MLP projections at the given precisions (one
        per layer of the plan; a dropped layer's are ignored)."""
        if not len(attention) == len(mlp) == len(self.layers):
            raise PlanError(
                f"need one precision per layer ({len(self.layers)}), got {len(attention)} attention and {len(mlp)} mlp"
            )
        for name in (*attention, *mlp):
            check_precision(name)
        layers = tuple(
            lp if lp.drop else replace(lp, precision=(str(a), str(m)))
            for lp, a, m in zip(self.layers, attention, mlp, strict=True)
        )
        return replace(self, layers=layers)

    def without_precisions(self) -> PrunePlan:
        """This plan with no layer setting a precision (the model's own dtype everywhere)."""
        return replace(self, layers=tuple(replace(lp, precision=None) for lp in self.layers))

    def layer_precisions(self, default: str) -> tuple[list[str], list[str]]:
        """Per layer, the attention's and the MLP's precision names; `default` where a layer sets
        none (a dropped one too)."""
        pairs = [lp.precision or (default, default) for lp in self.layers]
        return [a for a, _ in pairs], [m for _, m in pairs]

    @property
    def mixed_precision(self) -> bool:
        """Whether any layer sets the precision of its projections."""
        return any(lp.precision is not None for lp in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {
                "source": self.model.source,
                "class_name": self.model.class_name,
                "structure_fingerprint": self.model.structure_fingerprint,
                "weights_fingerprint": self.model.weights_fingerprint,
            },
            "hardware": self.hardware,
            "metadata": dict(self.metadata),
            "layers": [_layer_dict(lp) for lp in self.layers],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.dump(self.to_dict(), Dumper=_PlanDumper, sort_keys=False, width=120)
        path.write_text("# hwprune pruning plan: kept unit indices per layer\n" + text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        if path.is_dir():
            found = (
                sorted(p.name for p in (path / "plans").glob("*.yaml"))[:3]
                or sorted(p.name for p in path.glob("*.yaml"))[:3]
            )
            raise PlanError(
                f"plan={path} is a directory; valid: a plan file (a search run's plans/*.yaml"
                + (f", e.g. {', '.join(found)}" if found else "")
                + ")"
            )
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PlanError(f"plan file {path} is not valid YAML/JSON: {err}") from err
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "<dict>") -> PrunePlan:
        """Parse and schema-check a plan mapping; errors name `origin` and the bad field."""

        def fail(msg: str) -> PlanError:
            return PlanError(f"{origin}: {msg}")

        if not isinstance(data, dict):
            raise fail(f"expected a mapping at the top level, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise fail(f"format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        version = data.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise fail(
                f"unknown plan format version {version!r}; supported versions: {list(SUPPORTED_VERSIONS)}"
            )
        model = data.get("model")
        if not isinstance(model, dict):
            raise fail("missing 'model' mapping")
        for key in ("class_name", "structure_fingerprint"):
            if not isinstance(model.get(key), str):
                raise fail(f"model.{key} must be a string, got {model.get(key)!r}")
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            raise fail("'layers' must be a non-empty list")
        parsed = []
        for i, entry in enumerate(layers):
            if entry == {"drop": True}:
                parsed.append(LayerPlan(heads=(), mlp=(), drop=True))
                continue
            keys = set(entry) - {"precision"} if isinstance(entry, dict) else None
            if keys not in ({"heads", "mlp"}, {"heads", "mlp", *MOE_KEYS}):
                raise fail(
                    f"layers[{i}] must have exactly the keys 'heads' and 'mlp' (and 'experts' and 'expert_mlp' "
                    f"for a mixture-of-experts layer; 'precision' optional), or be {{drop: true}}, got {entry!r:.80}"
                )
            precision = entry.get("precision")
            if precision is not None:
                if not isinstance(precision, dict) or set(precision) != {"attention", "mlp"}:
                    raise fail(
                        f"layers[{i}].precision must be {{attention: ..., mlp: ...}}, got {precision!r:.80}"
                    )
                try:
                    for block in ("attention", "mlp"):
                        check_precision(precision[block])
                except PlanError as err:
                    raise fail(f"layers[{i}].{err}") from None
            for key in ("heads", "mlp", "experts"):
                values = entry.get(key, [])
                if not isinstance(values, list) or not all(type(v) is int for v in values):
                    raise fail(f"layers[{i}].{key} must be a list of integers, got {values!r:.80}")
            nested = entry.get("expert_mlp", [])
            if not isinstance(nested, list) or not all(
                isinstance(v, list) and all(type(n) is int for n in v) for v in nested
            ):
                raise fail(f"layers[{i}].expert_mlp must be a list of lists of integers, got {nested!r:.80}")
            moe = "experts" in entry
            parsed.append(
                LayerPlan(
                    heads=tuple(entry["heads"]),
                    mlp=tuple(entry["mlp"]),
                    experts=tuple(entry["experts"]) if moe else None,
                    expert_mlp=tuple(tuple(v) for v in nested) if moe else None,
                    precision=None if precision is None else (precision["attention"], precision["mlp"]),
                )
            )
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise fail(f"metadata must be a mapping, got {type(metadata).__name__}")
        return cls(
            model=ModelRef(
                class_name=model["class_name"],
                structure_fingerprint=model["structure_fingerprint"],
                source=model.get("source"),
                weights_fingerprint=model.get("weights_fingerprint"),
            ),
            layers=tuple(parsed),
            hardware=data.get("hardware"),
            metadata=metadata,
        )


MOE_KEYS = ("experts", "expert_mlp")


def _layer_dict(lp: LayerPlan) -> dict[str, Any]:
    if lp.drop:
        return {"drop": True}
    out: dict[str, Any] = {"heads": list(lp.heads), "mlp": list(lp.mlp)}
    if lp.experts is not None:
        out["experts"] = list(lp.experts)
        out["expert_mlp"] = [list(n) for n in lp.expert_mlp or ()]
    if lp.precision is not None:
        out["precision"] = {"attention": lp.precision[0], "mlp": lp.precision[1]}
    return out


def check_precision(name: object) -> None:
    """Raise PlanError for a block precision a plan cannot set, naming the valid ones."""
    if name not in PLAN_PRECISIONS:
        raise PlanError(f"precision {name!r} is not supported; valid choices: {list(PLAN_PRECISIONS)}")


class _PlanDumper(yaml.SafeDumper):
    """Writes index lists on one line each, so a plan reads as one row per layer."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, int) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PlanDumper.add_representer(list, _represent_list)
