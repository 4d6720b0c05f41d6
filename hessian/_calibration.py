"""Calibration data and the objective whose curvature the saliency methods estimate.

A `Batch` is what the model eats (`model(**inputs)`), plus how its rows map to samples: a sentence
pair is one sample spread over two rows. An `Objective` turns a model and a batch into one loss per
sample. Saliency methods only ever see these two, so any task (supervised or label-free, text or
images) plugs in by providing them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hwprune.errors import ConfigError


@dataclass
class Batch:
    """Model inputs for some samples.

    Attributes:
        inputs: Keyword arguments of the model's forward; every tensor is (rows, ...).
        sample_of_row: (rows,) sample id in [0, n_samples) of each row; None when each row is its
            own sample.
        targets: Per-sample labels (n_samples, ...) for supervised objectives, or None.
    """

    inputs: dict[str, torch.Tensor]
    sample_of_row: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    # The calibration batch this one is a part (`chunks`) or a device copy (`to`) of, and which of
    # its rows it holds (None: all): objectives key per-batch state on the origin.
    origin: Batch | None = field(default=None, repr=False, compare=False)
    origin_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def root(self) -> Batch:
        """The calibration batch this one came from (itself if it is one)."""
        return self.origin if self.origin is not None else self

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def n_samples(self) -> int:
        if self.sample_of_row is None:
            return self.rows
        return int(self.sample_of_row.max()) + 1 if self.sample_of_row.numel() else 0

    def row_samples(self) -> torch.Tensor:
        """(rows,) sample id of each row."""
        return self.sample_of_row if self.sample_of_row is not None else torch.arange(self.rows)

    def select(self, samples: Sequence[int]) -> Batch:
        """The sub-batch of the given samples, rows kept in their original order."""
        wanted = torch.as_tensor(list(samples), dtype=torch.long)
        row_ids = self.row_samples()
        keep = torch.isin(row_ids, wanted)
        # Renumber the kept samples 0..k-1 in the order given.
        remap = torch.full((self.n_samples,), -1, dtype=torch.long)
        remap[wanted] = torch.arange(len(wanted))
        return Batch(
            inputs={k: v[keep] for k, v in self.inputs.items()},
            sample_of_row=remap[row_ids[keep]],
            targets=self.targets[wanted] if self.targets is not None else None,
        )

    def chunks(self, max_samples: int | None) -> list[Batch]:
        """This batch in parts of at most `max_samples` consecutive samples (itself if it fits).

        Samples do not interact in a forward pass, so per-sample results over the parts equal those
        over the whole batch, in a fraction of the activation memory. Each part keeps `origin`.
        """
        n = self.n_samples
        if max_samples is None or max_samples >= n:
            return [self]
        if max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1 or None, got {max_samples}")
        parts = []
        row_ids = self.row_samples()
        for start in range(0, n, max_samples):
            samples = range(start, min(start + max_samples, n))
            part = self.select(samples)
            part.origin = self.root
            rows = torch.nonzero((row_ids >= start) & (row_ids < samples.stop)).flatten()
            part.origin_rows = rows if self.origin_rows is None else self.origin_rows[rows]
            parts.append(part)
        return parts

    def to(self, device: torch.device | str | None) -> Batch:
        """This batch on `device` (itself when None or already there), keeping its origin."""
        if device is None or all(v.device == torch.device(device) for v in self.inputs.values()):
            return self
        return Batch(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            sample_of_row=self.sample_of_row.to(device) if self.sample_of_row is not None else None,
            targets=self.targets.to(device) if self.targets is not None else None,
            origin=self.root,
            origin_rows=self.origin_rows,
        )

    def per_sample(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum (rows, ...) values into (n_samples, ...) by sample."""
        if self.sample_of_row is None:
            return per_row
        out = per_row.new_zeros((self.n_samples, *per_row.shape[1:]))
        return out.index_add_(0, self.sample_of_row.to(per_row.device), per_row)


class Objective(ABC):
    """A per-sample loss, and per-sample probes of its curvature."""

    name: str = "objective"
    # Whether the loss is at its minimum at the dense model (a distance to its own outputs): its
    # gradient is zero there, so scores made of the gradient alone are zero too.
    minimal_at_dense: ClassVar[bool] = False

    @abstractmethod
    def losses(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(n_samples,) loss of each sample of `batch`."""

    def curvature_losses(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        """(n_samples,) scalars whose squared per-sample gradients estimate the loss curvature.

        By default these are the losses themselves (empirical Fisher). Objectives override it where
        a Gauss-Newton probe exists: a squared error l(f) = (f - y)^2 returns sqrt(2) f, whose
        squared gradient is l'' (df)^2 without the per-sample residual weighting of the empirical
        Fisher; a distance to the dense model's own outputs (zero gradient there) returns random
        projections of the output.
        """
        return self.losses(model, batch)

    def loss_slope(self, probes: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """(n_samples,) dL_i/dprobe_i at the given probe values, or None where L is not a function of them.

        With it, each sample's loss gradient follows from its probe gradient by the chain rule, so a
        Taylor estimate's first-order term costs no second backward pass.
        """
        if type(self).curvature_losses is Objective.curvature_losses:
            return torch.ones_like(probes)  # the default probes are the losses themselves
        return None


class OutputDistance(Objective):
    """Label-free objective: half the squared distance of the model's outputs to the dense model's.

    Its Hessian at the dense model is the output-space Gauss-Newton matrix J^T J. `curvature_losses`
    returns v . f(x) with v ~ N(0, I) drawn per sample, whose squared gradient has expectation
    diag(J^T J): the Gauss-Newton without labels and without a second backward pass.

    Args:
        output: Maps `(model, batch)` to per-row outputs (rows, D) (e.g. pooled embeddings, logits).
        name: Objective name, part of the saliency cache key.
    """

    minimal_at_dense = True

    def __init__(
        self, *, output: Callable[[torch.nn.Module, Batch], torch.Tensor], name: str = "output-distance"
    ):
        self.output = output
        self.name = name
        self._reference: dict[int, torch.Tensor] = {}
        # (calibration batch, generator, its probe): the probe of the batch being scored
        self._projection: tuple[Batch, torch.Generator, torch.Tensor] | None = None

    def set_reference(self, model: torch.nn.Module, batches: Sequence[Batch]) -> None:
        """Record the dense model's outputs on `batches` (call before pruning or gating)."""
        with torch.no_grad():
            self._reference = {id(b): self.output(model, b).detach() for b in batches}

    def losses(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if id(batch.root) not in self._reference:
            raise KeyError("OutputDistance has no dense reference for this batch; call set_reference first")
        reference = self._reference[id(batch.root)]  # (root rows, D)
        if batch.origin_rows is not None:
            reference = reference[batch.origin_rows.to(reference.device)]
        out = self.output(model, batch)  # (rows, D), in fp32 whatever the model computes in
        diff = out.float() - reference.to(out.device).float()
        return batch.per_sample(0.5 * diff.pow(2).sum(-1))

    def curvature_losses(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        out = self.output(model, batch)  # (rows, D)
        # One projection per calibration batch and generator (scoring pass), drawn when the batch's
        # first part comes, so that scoring it whole or in parts draws the same numbers.
        root, cached = batch.root, self._projection
        if cached is not None and cached[0] is root and cached[1] is generator:
            v = cached[2]
        else:
            v = torch.randn((root.rows, out.shape[-1]), generator=generator)
            self._projection = (root, generator, v)
        if batch.origin_rows is not None:
            v = v[batch.origin_rows.cpu()]
        return batch.per_sample((v.to(out) * out).sum(-1))


@dataclass
class Calibration:
    """Calibration batches and the objective to score units against.

    Attributes:
        batches: The calibration data.
        objective: Per-sample loss on a batch.
        description: Human-readable source of the data (goes into reports and cache metadata).
    """

    batches: list[Batch]
    objective: Objective
    description: str = ""
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def n_samples(self) -> int:
        return sum(b.n_samples for b in self.batches)

    def fingerprint(self) -> str:
        """Hash of the data and the objective's name: half of the saliency cache key."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.objective.name.encode())
            for batch in self.batches:
                for key, value in sorted(batch.inputs.items()):
                    digest.update(key.encode())
                    digest.update(_tensor_bytes(value))
                for extra in (batch.sample_of_row, batch.targets):
                    if extra is not None:
                        digest.update(_tensor_bytes(extra))
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return f"{tuple(t.shape)}{t.dtype}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def check_finite(value: torch.Tensor, *, what: str, batch_index: int, method: str) -> None:
    """Stop with an error naming the batch when a loss or gradient is NaN or infinite."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise FloatingPointError(
            f"{method}: {bad} non-finite value(s) in the {what} of calibration batch {batch_index}; "
            "check the inputs of that batch and the model's dtype"
        )
