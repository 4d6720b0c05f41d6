"""Saliency of every prunable unit from a small calibration set (NViT Hessian-aware and baselines)."""
