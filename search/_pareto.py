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
    option_latency: list[np.ndarray],
    option_loss: list[np.ndarray],
    base: float = 0.0,
    *,
    excluded: list[np.ndarray] | None = None,
) -> ExactFront:
    """Exact front of choosing one option per layer.

    Args:
        option_latency: Per layer, (options,) latency of each option.
        option_loss: Per layer, (options,) proxy loss of each option.
        base: Latency added to every point (the model outside its blocks).
        excluded: Per layer, (options,) mask of the options that, chosen in every layer at once,
            make no configuration (depth pruning's dropped layer: a model keeps one layer at
            least). None: every combination counts.

    The exclusion runs inside the dynamic programme, which keeps two fronts per layer: of the
    prefixes that chose an excluded option in every layer so far, and of the rest. Filtering the
    all-excluded point out afterwards would be wrong: it may have eliminated valid configurations
    that only it dominated.
    """
    n_layers = len(option_latency)
    masks = excluded or [np.zeros(len(lat), dtype=bool) for lat in option_latency]
    # fronts[f]: (latency, loss) of the prefixes with flag f: 0 = every layer excluded so far, 1 = not.
    fronts = [(np.array([base]), np.array([0.0])), (np.zeros(0), np.zeros(0))]
    back: list[list[np.ndarray]] = []  # per layer, per flag: (P_f, 3) previous flag, its index, option
    for lat_l, loss_l, ex_l in zip(option_latency, option_loss, masks, strict=True):
        ex_l = np.asarray(ex_l, dtype=bool)
        sources = [[(0, ex_l)], [(1, np.ones_like(ex_l)), (0, ~ex_l)]]  # what feeds flag 0 and flag 1
        new_fronts, pointers = [], []
        for feeds in sources:
            lats, losses, ptrs = [np.zeros(0)], [np.zeros(0)], [np.zeros((0, 3), dtype=np.int64)]
            for prev, allowed in feeds:
                opts = np.flatnonzero(allowed)
                prev_lat, prev_loss = fronts[prev]
                idx, opt = np.divmod(np.arange(len(prev_lat) * len(opts)), len(opts))  # (P * options,)
                lats.append(prev_lat[idx] + lat_l[opts[opt]])
                losses.append(prev_loss[idx] + loss_l[opts[opt]])
                ptrs.append(np.stack([np.full(len(idx), prev), idx, opts[opt]], axis=1))
            cand_lat, cand_loss, cand_ptr = np.concatenate(lats), np.concatenate(losses), np.concatenate(ptrs)
            keep = np.flatnonzero(pareto_mask(cand_lat, cand_loss))
            new_fronts.append((cand_lat[keep], cand_loss[keep]))
            pointers.append(cand_ptr[keep])
        fronts, back = new_fronts, [*back, pointers]
    # Without exclusions flag 0 empties after the first layer: flag 1 holds every configuration.
    latency, loss = fronts[1]
    # Walk the back-pointers from the last layer to the first.
    flag, index = np.ones(len(latency), dtype=np.int64), np.arange(len(latency))
    choices = np.empty((len(latency), n_layers), dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        step = np.empty((len(latency), 3), dtype=np.int64)
        for f in (0, 1):
            at = flag == f
            step[at] = back[layer][f][index[at]]
        choices[:, layer] = step[:, 2]
        flag, index = step[:, 0], step[:, 1]
    order = np.argsort(latency, kind="stable")
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
