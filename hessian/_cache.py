"""On-disk cache of saliency scores keyed by model, data and method, so re-runs skip the work."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, UnitScores
from hwprune.hessian._calibration import Calibration

log = logging.getLogger(__name__)


def cache_key(method: Saliency, model: nn.Module, calibration: Calibration) -> str:
    """Hash of the weights, the structure, the calibration data and objective, and the method."""
    parts = {
        "weights": prunable.weights_fingerprint(model),
        "structure": prunable.discover(model).fingerprint(),
        "data": calibration.fingerprint(),
        "method": method.name,
        "params": method.params(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_score(
    method: Saliency, model: nn.Module, calibration: Calibration, *, cache_dir: str | Path | None
) -> UnitScores:
    """`method.score(model, calibration)`, read from `cache_dir` when computed before.

    Args:
        cache_dir: Directory of cached scores; None disables caching.
    """
    if cache_dir is None:
        return method.score(model, calibration)
    path = Path(cache_dir).expanduser() / f"{method.name}-{cache_key(method, model, calibration)}.npz"
    if path.is_file():
        log.info("saliency %s: cached %s", method.name, path)
        scores = UnitScores.load(path)
        scores.meta["cache"] = str(path)
        return scores
    scores = method.score(model, calibration)
    scores.save(path)
    log.info("saliency %s: computed and cached at %s", method.name, path)
    return scores
