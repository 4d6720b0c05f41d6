"""On-disk cache of saliency scores keyed by model, data and method, so re-runs skip the work."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, ScoringOptions, UnitScores
from hwprune.hessian._calibration import Calibration
from hwprune.hessian._depth import layer_scores
from hwprune.hessian._quantization import PrecisionSensitivity, precision_sensitivity

log = logging.getLogger(__name__)


def cache_key(
    method: Saliency | None,
    model: nn.Module,
    calibration: Calibration,
    options: ScoringOptions | None = None,
) -> str:
    """Hash of the weights, the structure, the calibration data and objective, the method (None:
    the layer scores) and the scoring dtype (where and in what pieces it ran changes the scores only
    by rounding)."""
    parts = {
        "weights": prunable.weights_fingerprint(model),
        "structure": prunable.discover(model).fingerprint(),
        "data": calibration.fingerprint(),
        "method": method.name if method is not None else "layers",
        "params": method.params() if method is not None else {},
    }
    if options is not None and options.dtype is not None:
        parts["dtype"] = options.dtype
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_score(
    method: Saliency,
    model: nn.Module,
    calibration: Calibration,
    *,
    cache_dir: str | Path | None,
    options: ScoringOptions | None = None,
) -> UnitScores:
    """`method.score(model, calibration, options=options)`, read from `cache_dir` when computed before.

    Args:
        cache_dir: Directory of cached scores; None disables caching.
        options: Device, dtype and samples per pass; see `ScoringOptions`.
    """
    if cache_dir is None:
        return method.score(model, calibration, options=options)
    key = cache_key(method, model, calibration, options)
    path = Path(cache_dir).expanduser() / f"{method.name}-{key}.npz"
    if path.is_file():
        log.info("saliency %s: cached %s", method.name, path)
        scores = UnitScores.load(path)
        scores.meta["cache"] = str(path)
        return scores
    scores = method.score(model, calibration, options=options)
    scores.save(path)
    log.info("saliency %s: computed and cached at %s", method.name, path)
    return scores


def cached_layer_scores(
    model: nn.Module,
    calibration: Calibration,
    *,
    cache_dir: str | Path | None,
    options: ScoringOptions | None = None,
) -> torch.Tensor:
    """`layer_scores(model, calibration, options=options)`, read from `cache_dir` when computed before."""
    if cache_dir is None:
        return layer_scores(model, calibration, options=options)
    path = Path(cache_dir).expanduser() / f"layers-{cache_key(None, model, calibration, options)}.npy"
    if path.is_file():
        log.info("layer scores: cached %s", path)
        return torch.from_numpy(np.load(path))
    scores = layer_scores(model, calibration, options=options)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, scores.numpy())
    log.info("layer scores: computed and cached at %s", path)
    return scores


def cached_precision_sensitivity(
    model: nn.Module,
    calibration: Calibration,
    precisions: tuple[str, ...],
    *,
    cache_dir: str | Path | None,
    seed: int = 0,
) -> PrecisionSensitivity:
    """`precision_sensitivity(model, calibration, precisions, seed=seed)`, read from `cache_dir` when
    computed before (a resumed search does not pay its backward passes again)."""
    if cache_dir is None:
        return precision_sensitivity(model, calibration, precisions, seed=seed)
    base = cache_key(None, model, calibration)
    key = hashlib.sha256(json.dumps([base, list(precisions), seed]).encode()).hexdigest()[:20]
    path = Path(cache_dir).expanduser() / f"precision-{key}.npz"
    if path.is_file():
        log.info("precision sensitivity: cached %s", path)
        with np.load(path) as data:
            estimates: dict[str, dict[str, np.ndarray]] = {}
            for name in data.files:
                if "/" in name:
                    estimate, block = name.split("/")
                    estimates.setdefault(estimate, {})[block] = data[name]
            ranges = json.loads(str(data["input_ranges"]))
            stored = tuple(str(p) for p in data["precisions"])
        return PrecisionSensitivity(
            stored, estimates, [{b: [tuple(r) for r in v] for b, v in layer.items()} for layer in ranges]
        )
    result = precision_sensitivity(model, calibration, precisions, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        f"{e}/{b}": v for e, blocks in result.estimates.items() for b, v in blocks.items()
    }
    arrays |= {
        "precisions": np.array(result.precisions),
        "input_ranges": np.array(json.dumps(result.input_ranges)),
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]
    log.info("precision sensitivity: computed and cached at %s", path)
    return result
