"""The model side shared by saliency and search: structure discovery, gates, surgery and plans.

structure = prunable.discover(model)            # per layer: heads, KV groups, MLP width, routed experts
with prunable.gated(model) as gates: ...        # multiplicative per-unit gates (experts too), layer skips
plan = prunable.PrunePlan.load("plan.yaml")     # kept units per layer; `drop: true` removes a layer
prunable.apply_plan(model, plan)                # physically slices the weights (and the router)
prunable.set_precisions(model, plan)            # per-layer block precisions (after any recovery)
prunable.save_pruned(model, plan, "out/")       # reload with prunable.load_pruned("out/")
with prunable.exportable(model): torch.onnx.export(...)   # routed experts as a traceable graph
"""

from typing import Any

from hwprune.errors import PlanError
from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap
from hwprune.prunable._discover import discover, is_decoder, weights_fingerprint
from hwprune.prunable._export import exportable
from hwprune.prunable._families import Skipped, supported_model_types
from hwprune.prunable._gates import GATE_KINDS, Gates, blocks, couplings, gated
from hwprune.prunable._io import BUNDLED, load_model, load_pruned, resolve_source, save_pruned
from hwprune.prunable._kv_cache import append_kv
from hwprune.prunable._plan import PLAN_PRECISIONS, PLAN_VERSION, LayerPlan, ModelRef, PrunePlan
from hwprune.prunable._plan_checks import EXPERT_WIDTH_STEP
from hwprune.prunable._precision import block_precisions, precision_summary, set_precisions
from hwprune.prunable._structure import UNIT_KINDS, LayerStructure, Structure, UnitKind
from hwprune.prunable._surgery import apply_plan, cast, converted_copy, pruned_block, pruned_copy

MINILM = "bundled:all-MiniLM-L6-v2"


def model_ref(model: Any, *, source: str | None = None, with_weights: bool = True) -> ModelRef:
    """A `ModelRef` for `model`, to put in the plans made for it."""
    return ModelRef(
        class_name=type(model).__name__,
        structure_fingerprint=discover(model).fingerprint(),
        source=source,
        weights_fingerprint=weights_fingerprint(model) if with_weights else None,
    )


__all__ = [
    "BUNDLED",
    "EXPERT_WIDTH_STEP",
    "GATE_KINDS",
    "MINILM",
    "PLAN_PRECISIONS",
    "PLAN_VERSION",
    "UNIT_KINDS",
    "Coupling",
    "Gates",
    "LayerCouplings",
    "LayerPlan",
    "LayerStructure",
    "ModelRef",
    "PlanError",
    "PrunePlan",
    "Skipped",
    "Structure",
    "Tap",
    "UnitKind",
    "append_kv",
    "apply_plan",
    "block_precisions",
    "blocks",
    "cast",
    "converted_copy",
    "couplings",
    "discover",
    "exportable",
    "gated",
    "is_decoder",
    "load_model",
    "load_pruned",
    "model_ref",
    "precision_summary",
    "pruned_block",
    "pruned_copy",
    "resolve_source",
    "save_pruned",
    "set_precisions",
    "supported_model_types",
    "weights_fingerprint",
]
