"""Retraining-free recovery: per-unit output scales and bias compensation by least squares.

For every pruned sub-layer, in forward order, the output projection of the kept units (attention
heads' context through the output projection, MLP neurons through the down projection) is refitted
so that the residual stream after it matches the dense model's on the same tokens:

    min_s,b  sum_t || z_dense(t) - r(t) - sum_u s_u W_u x_u(t) - b ||^2 + ridge * tr(G)/k * ||s - 1||^2

where z_dense = r_dense + y_dense is the dense model's residual stream right after the sub-layer
(before any norm) and r the pruned model's own residual that the sub-layer's output is added to: the
sub-layer is asked to make up for what the layers before it changed in the residual stream too, not
only for its own removed units. Fitting the sub-layer's output alone (y_dense, without the residual)
ignores that and made heavily pruned models worse.

with one scale s_u per kept unit (Kwon et al. 2022's mask tuning) and the bias refitted where the
layer has one (FLAP's bias compensation: the removed units' mean contribution moves into the bias).
`x` and `r` come from the pruned model as reconstructed so far. Only real tokens count (padding is
masked).
A handful of parameters per layer is what makes this safe on a few hundred samples: refitting
whole weight matrices the same way overfits and made pruned MiniLM worse on held-out data.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from hwprune import hessian, prunable
from hwprune.errors import ConfigError, UnsupportedModelError
from hwprune.search.recovery._base import (
    Recovery,
    RecoveryData,
    RecoveryReport,
    held_out_output_loss,
    valid_rows,
)

log = logging.getLogger(__name__)


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an nn.Linear or a GPT-2 Conv1D (which stores it transposed)."""
    if not isinstance(module, nn.Linear | Conv1D):
        raise TypeError(f"an output projection must be nn.Linear or Conv1D, got {type(module).__name__}")
    weight = module.weight.T if isinstance(module, Conv1D) else module.weight
    return weight, module.bias


class _Stats:
    """Sufficient statistics of sum_t ||y(t) - W x(t) - b||^2 over valid tokens, in float64."""

    def __init__(self, inputs: int, outputs: int) -> None:
        f64 = torch.float64
        self.n = 0
        self.xx = torch.zeros(inputs, inputs, dtype=f64)  # sum x x^T
        self.xy = torch.zeros(inputs, outputs, dtype=f64)  # sum x y^T
        self.x = torch.zeros(inputs, dtype=f64)
        self.y = torch.zeros(outputs, dtype=f64)
        self.yy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (n, inputs), y: (n, outputs) rows of valid tokens."""
        x, y = x.float(), y.float()
        self.n += x.shape[0]
        self.xx += (x.T @ x).double()  # float32 products, float64 sums across batches
        self.xy += (x.T @ y).double()
        self.x += x.sum(0).double()
        self.y += y.sum(0).double()
        self.yy += float((y * y).sum())

    def error(self, w: torch.Tensor, b: torch.Tensor | None) -> float:
        """sum_t ||y - W x - b||^2 / sum_t ||y||^2 for W (outputs, inputs)."""
        w = w.double()
        err = self.yy - 2 * float(torch.trace(w @ self.xy)) + float(torch.trace(w @ self.xx @ w.T))
        if b is not None:
            b = b.double()
            err += -2 * float(self.y @ b) + 2 * float((w @ self.x) @ b) + self.n * float(b @ b)
        return err / max(self.yy, 1e-30)


@dataclass(frozen=True)
class _Site:
    """One pruned sub-layer: output projections (pruned and dense), unit inputs, residual taps."""

    layer: int
    kind: str
    projection: nn.Module
    index: torch.Tensor  # (units, per_unit) input features of the projection owned by each unit
    residual: prunable.Tap
    dense_projection: nn.Module
    dense_residual: prunable.Tap


def _sites(student: nn.Module, teacher: nn.Module, layers: list[int]) -> list[_Site]:
    """Every sub-layer that kept at least one unit, in forward order; student block j is matched to
    teacher layer `layers[j]`."""
    sites = []
    dense = prunable.couplings(teacher)
    pairs = zip(prunable.couplings(student), [dense[i] for i in layers], strict=True)
    for layer, (s_lc, t_lc) in enumerate(pairs):
        for kind, projection, residual, dense_projection, dense_residual, coupled in (
            (
                "attention",
                s_lc.attn_gate_site,
                s_lc.attn_residual,
                t_lc.attn_gate_site,
                t_lc.attn_residual,
                s_lc.attention,
            ),
            ("mlp", s_lc.mlp_gate_site, s_lc.mlp_residual, t_lc.mlp_gate_site, t_lc.mlp_residual, s_lc.mlp),
        ):
            if projection is None:
                continue  # the whole sub-layer was pruned: nothing left to scale
            if residual is None or dense_residual is None or dense_projection is None:
                model_type = getattr(getattr(student, "config", None), "model_type", "?")
                raise UnsupportedModelError(
                    f"recovery=reconstruct cannot fit {type(student).__name__} (model_type={model_type!r}): it "
                    "needs each sub-layer's output added to the residual stream as is, and this family "
                    "normalises or scales it first, or adds its sub-layers in parallel; use recovery=distill "
                    "or recovery=none"
                )
            index = next(c.index for c in coupled if c.module is projection and c.side == "in")
            sites.append(_Site(layer, kind, projection, index, residual, dense_projection, dense_residual))
    return sites


def _hook(tap: prunable.Tap, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Call `edit` on the tensor at `tap`; a tensor it returns replaces that tensor in the forward."""
    if tap.output:

        def post(module: nn.Module, args: tuple, out: Any) -> Any:
            first = out[0] if isinstance(out, tuple) else out  # blocks may return (hidden, ...)
            new = edit(first)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return tap.module.register_forward_hook(post)

    def pre(module: nn.Module, args: tuple) -> tuple | None:
        new = edit(args[0])
        return None if new is None else (new, *args[1:])

    return tap.module.register_forward_pre_hook(pre)


class Reconstruct(Recovery):
    """Per-unit scales and bias compensation, fitted layer by layer (seconds, no gradients).

    All sub-layers are fitted during one forward pass of the pruned model over the fitting samples
    (merged into one padded batch): when an output projection has run, it is solved, its weights
    updated, and its refitted output passed on in place of the old one, so every later layer sees
    the reconstructed model, as if the forward were rerun after each fit.

    Args:
        samples: Samples of the recovery data to fit on; up to 4 batches after them are held out
            to report the error of the final hidden states before and after.
        ridge: Pull of each scale towards 1, relative to the mean diagonal of the normal equations.
        bias: Refit the output bias where the layer has one.
    """

    name = "reconstruct"

    def __init__(self, *, samples: int = 128, ridge: float = 1.0, bias: bool = True) -> None:
        if samples < 1:
            raise ConfigError(f"reconstruct.samples must be >= 1, got {samples}")
        if ridge < 0:
            raise ConfigError(f"reconstruct.ridge must be >= 0, got {ridge}")
        self.samples, self.ridge, self.bias = samples, ridge, bias

    def params(self) -> dict[str, Any]:
        return {"samples": self.samples, "ridge": self.ridge, "bias": self.bias}

    def _recover(
        self, student: nn.Module, teacher: nn.Module, data: RecoveryData, layers: list[int]
    ) -> RecoveryReport:
        fit, held = split_samples(data.batches, self.samples)
        batch = merge_batches(fit)
        before = held_out_output_loss(student, teacher, held) if held else None
        sites = _sites(student, teacher, layers)
        refitted = {id(p) for site in sites for p in site.projection.parameters()}
        kept = {n: p.detach().clone() for n, p in student.named_parameters() if id(p) in refitted}
        errors: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="hwprune-reconstruct-") as tmp:
            dense_sums = _SpilledRows(Path(tmp))
            _dense_sums(teacher, sites, batch, dense_sums)

            def refit(
                i: int, site: _Site, seen: dict[str, torch.Tensor]
            ) -> Callable[[torch.Tensor], torch.Tensor]:
                def edit(out: torch.Tensor) -> torch.Tensor:
                    x, residual = seen.pop("x"), seen.pop("residual")  # held only until this site is fitted
                    target = dense_sums.read(i).to(residual.dtype) - valid_rows(
                        batch, residual
                    )  # (n, hidden)
                    before, after = self._fit(site.projection, site.index, valid_rows(batch, x), target)
                    errors.append(
                        {"layer": site.layer, "kind": site.kind, "error_before": before, "error_after": after}
                    )
                    weight, bias = linear_parts(site.projection)
                    return nn.functional.linear(x, weight, bias)  # what the refitted projection outputs

                return edit

            handles = []
            for i, site in enumerate(sites):
                seen: dict[str, torch.Tensor] = {}
                handles.append(_hook(site.residual, _store(seen, "residual")))
                handles.append(_hook(prunable.Tap(site.projection), _store(seen, "x")))
                handles.append(_hook(prunable.Tap(site.projection, output=True), refit(i, site, seen)))
            try:
                with torch.no_grad():
                    student(**batch.inputs)
            finally:
                for handle in handles:
                    handle.remove()
        after = held_out_output_loss(student, teacher, held) if held else None
        reverted = before is not None and after is not None and after > before
        if reverted:
            # Least squares on the residual stream lowered its fitted error but moved the output
            # the user sees further from the teacher's: keep the pruned weights as they were.
            params = dict(student.named_parameters())
            with torch.no_grad():
                for name, original in kept.items():
                    params[name].copy_(original)
            log.info(
                "reconstruct: held-out output loss %.4f -> %.4f; reverted to the pruned weights",
                before,
                after,
            )
        return RecoveryReport(
            method=self.name,
            params=self.params(),
            held_out_before=before,
            held_out_after=before if reverted else after,
            details={"sites": errors, "fit_samples": batch.n_samples, "reverted": reverted},
        )

    def _fit(
        self, projection: nn.Module, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, float]:
        """Refit one output projection's unit scales (and bias) to y; its fit error before and after."""
        weight, layer_bias = linear_parts(projection)
        w = weight.detach()  # (hidden, in)
        bias = layer_bias if self.bias else None
        if bias is None and layer_bias is not None:
            y = y - layer_bias.detach()  # the bias stays: fit the rest
        stats = _Stats(w.shape[1], w.shape[0])
        stats.add(x, y)
        error_before = stats.error(w, bias.detach() if bias is not None else None)
        scales, mean_y = self._solve(stats, w.double(), index, with_bias=bias is not None)
        new_w = (w.double() * _expand(scales, index)[None, :]).to(w.dtype)  # (hidden, in)
        with torch.no_grad():
            weight.copy_(new_w)  # a transposed view for Conv1D: writes through
            if bias is not None and mean_y is not None:
                bias.copy_((mean_y - new_w.double() @ (stats.x / stats.n)).to(bias.dtype))
        return error_before, stats.error(new_w, bias.detach() if bias is not None else None)

    def _solve(
        self, stats: _Stats, w: torch.Tensor, index: torch.Tensor, *, with_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales per unit (k,) and, with a bias to refit, the targets' mean (hidden,) it is fitted from."""
        xx, xy = stats.xx, stats.xy
        mean_y = None
        if with_bias and stats.n:
            # Centring solves for the bias in closed form: b = mean(y) - W_new mean(x).
            mean_x, mean_y = stats.x / stats.n, stats.y / stats.n
            xx = xx - stats.n * torch.outer(mean_x, mean_x)
            xy = xy - stats.n * torch.outer(mean_x, mean_y)
        units, per_unit = index.shape
        order = index.reshape(-1)  # input features grouped by unit
        # G_uv = sum_t (W_u x_u)^T (W_v x_v) = block sums of (W^T W) * sum x x^T over u's and v's inputs.
        blocks = ((w.T @ w) * xx)[order][:, order]  # (k*p, k*p)
        gram = blocks.reshape(units, per_unit, units, per_unit).sum((1, 3))  # (k, k)
        rhs = (w.T * xy).sum(1)[order].reshape(units, per_unit).sum(1)  # (k,): sum_t (W_u x_u)^T y
        damp = self.ridge * float(torch.diagonal(gram).mean().clamp_min(1e-30))
        ones = torch.ones(units, dtype=torch.float64)
        scales = torch.linalg.solve(gram + damp * torch.eye(units, dtype=torch.float64), rhs + damp * ones)
        return scales, mean_y


def _store(seen: dict[str, torch.Tensor], key: str) -> Callable[[torch.Tensor], None]:
    def edit(t: torch.Tensor) -> None:
        seen[key] = t

    return edit


class _SpilledRows:
    """(n, hidden) float32 tensors kept on disk, one file each, read back one at a time: the dense
    model's residual sums of every site would otherwise stay resident together (48 sites x 16k tokens
    x 1024 of a BERT-large shape: 3.2 GB)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.shapes: dict[int, tuple[int, int]] = {}

    def write(self, key: int, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float32).contiguous()
        rows.numpy().tofile(self.directory / f"{key}.f32")
        self.shapes[key] = (rows.shape[0], rows.shape[1])

    def read(self, key: int) -> torch.Tensor:
        flat = np.fromfile(self.directory / f"{key}.f32", dtype=np.float32)
        return torch.from_numpy(flat).reshape(self.shapes[key])


@torch.no_grad()
def _dense_sums(teacher: nn.Module, sites: list[_Site], batch: hessian.Batch, store: _SpilledRows) -> None:
    """The dense residual stream right after each site's sub-layer (residual + output), (n, hidden)
    rows per site, written to `store` as the teacher's forward reaches it."""
    seen: dict[int, torch.Tensor] = {}
    handles = []

    def residual(i: int) -> Callable[[torch.Tensor], None]:
        def edit(t: torch.Tensor) -> None:
            seen[i] = t

        return edit

    def output(i: int) -> Callable[[torch.Tensor], None]:
        def edit(t: torch.Tensor) -> None:
            store.write(i, valid_rows(batch, seen.pop(i) + t))

        return edit

    for i, site in enumerate(sites):
        handles.append(_hook(site.dense_residual, residual(i)))
        handles.append(_hook(prunable.Tap(site.dense_projection, output=True), output(i)))
    try:
        teacher(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()


def merge_batches(batches: list[hessian.Batch]) -> hessian.Batch:
    """One batch of all rows; token inputs padded to the longest (mask 0, id 0) where they differ."""
    if len(batches) == 1:
        return batches[0]
    longest = max(b.inputs["input_ids"].shape[1] if "input_ids" in b.inputs else 0 for b in batches)
    ragged = any("input_ids" in b.inputs and b.inputs["input_ids"].shape[1] != longest for b in batches)
    if ragged and any("attention_mask" not in b.inputs for b in batches):
        raise ValueError("batches of different lengths without an attention mask cannot be merged")
    inputs = {}
    for key in batches[0].inputs:
        parts = []
        for b in batches:
            t = b.inputs[key]
            if ragged and t.dim() == 2 and t.shape[1] != longest:
                t = nn.functional.pad(t, (0, longest - t.shape[1]), value=0)  # (rows, longest)
            parts.append(t)
        inputs[key] = torch.cat(parts)
    offsets, rows, targets = 0, [], []
    for b in batches:
        rows.append(b.row_samples() + offsets)
        offsets += b.n_samples
        if b.targets is not None:
            targets.append(b.targets)
    return hessian.Batch(
        inputs=inputs,
        sample_of_row=torch.cat(rows),
        targets=torch.cat(targets) if len(targets) == len(batches) else None,
    )


def _expand(scales: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-unit scales (k,) -> per-input-feature scales (in,), by the unit owning each feature."""
    columns = torch.empty(index.numel(), dtype=scales.dtype)
    columns[index.reshape(-1)] = scales.repeat_interleave(index.shape[1])
    return columns


def split_samples(
    batches: list[hessian.Batch], samples: int
) -> tuple[list[hessian.Batch], list[hessian.Batch]]:
    """The first batches holding `samples` samples, and (up to 4) batches after them held out."""
    fit, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        fit.append(batch)
        count += batch.n_samples
    return fit, batches[len(fit) : len(fit) + 4]


@torch.no_grad()
def output_error(student: nn.Module, teacher: nn.Module, batches: list[hessian.Batch]) -> float:
    """Relative squared error of the student's final hidden states against the teacher's (valid tokens)."""
    num = den = 0.0
    for batch in batches:
        s = student(**batch.inputs, output_hidden_states=True).hidden_states[-1]
        t = teacher(**batch.inputs, output_hidden_states=True).hidden_states[-1]
        s_rows, t_rows = valid_rows(batch, s), valid_rows(batch, t)
        num += float((s_rows - t_rows).pow(2).sum())
        den += float(t_rows.pow(2).sum())
    return num / max(den, 1e-30)
