"""Saliency of every prunable unit from a small calibration set.

    calibration = hessian.Calibration(batches, objective)
    scores = hessian.NViTSaliency().score(model, calibration)       # one score per unit
    scores = hessian.cached_score(hessian.FisherSaliency(), model, calibration, cache_dir="~/.cache/hwprune")
    options = hessian.ScoringOptions(device="cuda", dtype="bf16", max_samples=4)   # where, in what pieces
    scores = hessian.NViTSaliency().score(model, calibration, options=options)
    drop = hessian.layer_scores(model, calibration)                  # measured loss of dropping each layer
    sens = hessian.precision_sensitivity(model, calibration, ("bf16", "int8"))  # each block at a precision

Methods: `nvit` (default; NViT's Hessian-aware group saliency with per-sample Fisher/Gauss-Newton),
`heapr` (HEAPr's output-space second-order scores of routed experts' neurons; MoE models),
`fisher` (OBD diagonal Fisher), `hutchinson` (HAWQ-V2 layer traces), `taylor`, `magnitude`, `random`.
"""

from hwprune.hessian._base import SALIENCY, SCORING_DTYPES, Saliency, ScoringOptions, UnitScores
from hwprune.hessian._cache import cached_layer_scores, cached_precision_sensitivity, cached_score
from hwprune.hessian._calibration import Batch, Calibration, Objective, OutputDistance
from hwprune.hessian._depth import layer_scores
from hwprune.hessian._fisher import FisherSaliency
from hwprune.hessian._heapr import HEAPrSaliency
from hwprune.hessian._hutchinson import HutchinsonSaliency
from hwprune.hessian._magnitude import MagnitudeSaliency, RandomSaliency
from hwprune.hessian._nvit import NViTSaliency
from hwprune.hessian._quantization import (
    BLOCKS,
    ESTIMATES,
    QUANT_PRECISIONS,
    PrecisionSensitivity,
    block_projections,
    fake_quantized,
    input_quantizer,
    input_ranges,
    precision_sensitivity,
    quantize_weight,
    weight_out_dim,
)
from hwprune.hessian._taylor import TaylorSaliency

__all__ = [
    "BLOCKS",
    "ESTIMATES",
    "QUANT_PRECISIONS",
    "SALIENCY",
    "SCORING_DTYPES",
    "Batch",
    "Calibration",
    "FisherSaliency",
    "HEAPrSaliency",
    "HutchinsonSaliency",
    "MagnitudeSaliency",
    "NViTSaliency",
    "Objective",
    "OutputDistance",
    "PrecisionSensitivity",
    "RandomSaliency",
    "Saliency",
    "ScoringOptions",
    "TaylorSaliency",
    "UnitScores",
    "block_projections",
    "cached_layer_scores",
    "cached_precision_sensitivity",
    "cached_score",
    "fake_quantized",
    "input_quantizer",
    "input_ranges",
    "layer_scores",
    "precision_sensitivity",
    "quantize_weight",
    "weight_out_dim",
]
