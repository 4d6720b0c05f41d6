"""Exact Pareto fronts of the additive proxy, and 2-D hypervolume.

With latency additive over layers (a sum of per-block costs) and the proxy loss additive over units,
choosing one (units, mlp) option per layer is a multiple-choice knapsack. Its whole Pareto front is
computed exactly by dynamic programming over layers: the front of the first l+1 layers is the Pareto
filter of (front of the first l) x (options of layer l+1). HALP solves one point of this front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pareto_mask(latency: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (both objectives minimised)."""
    latency, loss = np.asarray(latency, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    order = np.lexsort((loss, latency))  # by latency, ties by loss
    best_loss = np.minimum.accumulate(loss[order])
    # A point survives when its loss is strictly below every faster point's.
    keep_sorted = np.empty(len(order), dtype=bool)
    if len(order):
        keep_sorted[0] = True
        keep_sorted[1:] = loss[order][1:] < best_loss[:-1]
    mask = np.zeros(len(order), dtype=bool)
    mask[order[keep_sorted]] = True
    return mask


def hypervolume(latency: np.ndarray, loss: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by `reference` (both objectives minimised)."""
    latency, loss = np.asarray(latency, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    inside = (latency <= reference[0]) & (loss <= reference[1])
    if not inside.any():
        return 0.0
    keep = pareto_mask(latency[inside], loss[inside])
    x, y = latency[inside][keep], loss[inside][keep]
    order = np.argsort(x)
    x, y = x[order], y[order]
    widths = np.diff(np.append(x, reference[0]))
    return float(np.sum(widths * (reference[1] - y)))


@dataclass(frozen=True)
class ExactFront:
    """The exact Pareto front: per point, total latency, total proxy loss and each layer's option."""

    latency: np.ndarray  # (P,)
    loss: np.ndarray  # (P,)
    choices: np.ndarray  # (P, layers) index into each layer's options

    def within(self, latency_limit: float) -> ExactFront:
        """The points no slower than `latency_limit`: a latency budget's constrained optimum."""
        return self.subset(self.latency <= latency_limit)

    def subset(self, keep: np.ndarray) -> ExactFront:
        """The points where the (P,) mask `keep` is true."""
        return ExactFront(latency=self.latency[keep], loss=self.loss[keep], choices=self.choices[keep])


def exact_front(
    option_latency: list[np.ndarray], option_loss: list[np.ndarray], base: float = 0.0
) -> ExactFront:
    """Exact front of choosing one option per layer.

    Args:
        option_latency: Per layer, (options,) latency of each option.
        option_loss: Per layer, (options,) proxy loss of each option.
        base: Latency added to every point (the model outside its blocks).
    """
    latency = np.array([base])
    loss = np.array([0.0])
    parents: list[np.ndarray] = []  # per layer, (P_l, 2): index into the previous front, option
    for lat_l, loss_l in zip(option_latency, option_loss, strict=True):
        cand_lat = (latency[:, None] + lat_l[None, :]).ravel()  # (P * options,)
        cand_loss = (loss[:, None] + loss_l[None, :]).ravel()
        keep = np.flatnonzero(pareto_mask(cand_lat, cand_loss))
        parents.append(np.stack(np.divmod(keep, len(lat_l)), axis=1))
        latency, loss = cand_lat[keep], cand_loss[keep]
    # Walk the back-pointers from the last layer to the first.
    choices = np.empty((len(latency), len(parents)), dtype=np.int64)
    index = np.arange(len(latency))
    for layer in range(len(parents) - 1, -1, -1):
        choices[:, layer] = parents[layer][index, 1]
        index = parents[layer][index, 0]
    order = np.argsort(latency)
    return ExactFront(latency=latency[order], loss=loss[order], choices=choices[order])


def hypervolume_subset(
    latency: np.ndarray, loss: np.ndarray, reference: tuple[float, float], k: int
) -> list[int]:
    """Greedily pick `k` points of a 2-D front that together dominate the most hypervolume.

    On a front (mutually non-dominated points) a new point between its chosen neighbours `a`
    (faster, worse) and `b` (slower, better) adds the rectangle (x_b - x_i) * (y_a - y_i), so each
    greedy step is one vectorised pass. Seeds picked this way cover the costly end of the front,
    where evenly spaced seeds leave gaps a local search is slow to close.

    Returns:
        Indices into the inputs, in the order picked.
    """
    latency, loss = np.asarray(latency, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    inside = np.flatnonzero((latency <= reference[0]) & (loss <= reference[1]))
    chosen: list[int] = []
    for _ in range(min(k, len(inside))):
        order = np.argsort(latency[chosen])
        cx, cy = latency[chosen][order], loss[chosen][order]
        pos = np.searchsorted(cx, latency[inside])  # chosen points faster than each candidate
        next_x = np.append(cx, reference[0])[pos]
        prev_y = np.insert(cy, 0, reference[1])[pos]
        gain = np.clip(next_x - latency[inside], 0, None) * np.clip(prev_y - loss[inside], 0, None)
        gain[np.isin(inside, chosen)] = -1.0
        chosen.append(int(inside[int(np.argmax(gain))]))
    return chosen
