"""Knowledge distillation of the pruned model to its dense teacher (the "Distill" of Prune -> Distill).

Per batch the student matches the teacher layer by layer (hidden-state MSE, each layer scaled by the
teacher's mean square so all layers count alike, as in CoFi's layer distillation) and at the output:
the KL divergence of temperature-softened logits for models with a head (LMs, classifiers), or the
cosine of mean-pooled embeddings for encoders used as sentence embedders. Optionally the task's own
labelled loss is mixed in. Training is a bounded number of AdamW steps with warm-up and linear decay,
deterministic under the seed; progress is logged every few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from hwprune import hessian
from hwprune.errors import ConfigError
from hwprune.search._int8 import int8_saturates
from hwprune.search.recovery._base import Recovery, RecoveryData, RecoveryReport, output_loss, valid_rows

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
# Training batches whose projection inputs set the int8 input ranges of quantised training.
CALIBRATION_BATCHES = 8


class _RoundedWeight(nn.Module):
    """A weight parametrisation: rounded as deployed in the forward pass, the gradient straight through."""

    def __init__(self, precision: str, out_dim: int, reduce_range: bool) -> None:
        super().__init__()
        self.precision, self.out_dim, self.reduce_range = precision, out_dim, reduce_range

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        rounded = hessian.quantize_weight(
            w.detach(), self.precision, self.out_dim, reduce_range=self.reduce_range
        )
        return w + (rounded - w).detach()


@contextlib.contextmanager
def quantised_training(
    model: nn.Module, calibration: list[hessian.Batch], precision: str, *, reduce_range: bool = False
) -> Iterator[None]:
    """`model`'s projections compute with weights and inputs rounded to `precision` (straight-through
    gradients; int8 weights in 7 bits with `reduce_range`); on exit they are plain float projections
    again, holding the trained float weights."""
    projections = [m for blocks in hessian.block_projections(model) for ms in blocks.values() for m in ms]
    ranges = hessian.input_ranges(model, calibration)
    hooks = []
    for module in projections:
        parametrize.register_parametrization(
            module, "weight", _RoundedWeight(precision, hessian.weight_out_dim(module), reduce_range)
        )
        quant = hessian.input_quantizer(precision, *ranges[id(module)])

        def round_input(_m: nn.Module, args: tuple[Any, ...], q: Any = quant) -> tuple[Any, ...]:
            x = args[0]
            return (x + (q(x) - x).detach(), *args[1:])

        hooks.append(module.register_forward_pre_hook(round_input))
    log.info(
        "distill: %d projections trained as %s%s (weights and inputs rounded, straight-through)",
        len(projections),
        precision,
        " with 7-bit weights" if reduce_range and precision == "int8" else "",
    )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for module in projections:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _pair_layers(layers: list[int]) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices to match: the output of each student block and that
    of the teacher layer it was pruned from (index 0 holds the embeddings)."""
    return [(s + 1, t + 1) for s, t in enumerate(layers)]


class Distill(Recovery):
    """Distillation to the dense model on the task's unlabelled (or labelled) training inputs.

    Args:
        steps: Optimiser steps (batches).
        lr: Peak AdamW learning rate (linear warm-up over 5 % of the steps, then linear decay).
        hidden_weight: Weight of the layer-wise hidden-state loss.
        output_weight: Weight of the output loss (logit KL, or pooled-embedding cosine).
        label_weight: Weight of the task's labelled loss on batches with targets (0: label-free).
        temperature: Softening of logits in the KL term.
        weight_decay: AdamW weight decay.
        held_out: Batches kept out of training to report the distillation loss before and after.
        seed: Seed of the batch order.
        quantize: Train with the projections quantised as they will be deployed ("int8", "bf16",
            "fp16"; None: in the model's dtype): weights and inputs rounded in the forward pass,
            gradients passed straight through to the float weights, so the weights the recovery
            leaves are the ones that survive quantisation. int8 is the int8 QDQ recipe (weights
            symmetric per output channel; inputs per tensor over their range on the first training
            batches, the calibration the deployed model gets). The held-out loss is measured
            quantised too.
        reduce_range: With quantize="int8", weights on the 7-bit grid the int8 recipe deploys on
            CPUs whose int8 kernels saturate (`Int8Recipe.reduce_range`; None: this CPU's choice,
            as the recipe's default makes it), so training rounds as the deployed model does.
    """

    name = "distill"

    def __init__(
        self,
        *,
        steps: int = 400,
        lr: float = 3e-4,
        hidden_weight: float = 1.0,
        output_weight: float = 1.0,
        label_weight: float = 0.0,
        temperature: float = 2.0,
        weight_decay: float = 0.0,
        held_out: int = 4,
        seed: int = 0,
        quantize: str | None = None,
        reduce_range: bool | None = None,
    ) -> None:
        if steps < 1:
            raise ConfigError(f"distill.steps must be >= 1, got {steps}")
        if held_out < 0:
            raise ConfigError(f"distill.held_out must be >= 0, got {held_out}")
        if not lr > 0:
            raise ConfigError(f"distill.lr must be positive, got {lr}")
        for key, value in (
            ("hidden_weight", hidden_weight),
            ("output_weight", output_weight),
            ("label_weight", label_weight),
            ("weight_decay", weight_decay),
        ):
            if value < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {value}")
        if hidden_weight + output_weight + label_weight == 0:
            raise ConfigError(
                "distill needs a positive hidden_weight, output_weight or label_weight; all are 0"
            )
        if not temperature > 0:
            raise ConfigError(f"distill.temperature must be positive, got {temperature}")
        if quantize is not None and quantize not in hessian.QUANT_PRECISIONS:
            raise ConfigError(
                f"distill.quantize={quantize!r} is not supported; valid choices: {list(hessian.QUANT_PRECISIONS)} or null"
            )
        self.quantize = quantize
        # Resolved now, so the parameters a plan records re-run the same grid on another CPU.
        self.reduce_range = int8_saturates() if reduce_range is None else bool(reduce_range)
        self.steps, self.lr, self.temperature = steps, lr, temperature
        self.hidden_weight, self.output_weight, self.label_weight = hidden_weight, output_weight, label_weight
        self.weight_decay, self.held_out, self.seed = weight_decay, held_out, seed

    def params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lr": self.lr,
            "hidden_weight": self.hidden_weight,
            "output_weight": self.output_weight,
            "label_weight": self.label_weight,
            "temperature": self.temperature,
            "weight_decay": self.weight_decay,
            "held_out": self.held_out,
            "seed": self.seed,
            "quantize": self.quantize,
            # Only int8 has a weight grid to choose (and recipes without it stay as they were).
            **({"reduce_range": self.reduce_range} if self.quantize == "int8" else {}),
        }

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batch: hessian.Batch,
        objective: hessian.Objective | None = None,
        *,
        layers: list[int] | None = None,
    ) -> torch.Tensor:
        """The distillation loss of `student` on one batch (the teacher runs without gradients).

        Args:
            layers: The teacher layer of each student block (None: the same indices).
        """
        with torch.no_grad():
            t_out = teacher(**batch.inputs, output_hidden_states=True)
        s_out = student(**batch.inputs, output_hidden_states=True)
        total = torch.zeros((), dtype=s_out.hidden_states[-1].dtype)
        if self.hidden_weight:
            pairs = _pair_layers(layers if layers is not None else list(range(len(s_out.hidden_states) - 1)))
            terms = []
            for s_i, t_i in pairs:
                s_rows = valid_rows(batch, s_out.hidden_states[s_i])  # (n, D)
                t_rows = valid_rows(batch, t_out.hidden_states[t_i])
                terms.append((s_rows - t_rows).pow(2).mean() / t_rows.pow(2).mean().clamp_min(1e-12))
            total = total + self.hidden_weight * torch.stack(terms).mean()
        if self.output_weight:
            total = total + self.output_weight * output_loss(
                batch, s_out, t_out, temperature=self.temperature
            )
        if self.label_weight and objective is not None and batch.targets is not None:
            total = total + self.label_weight * objective.losses(student, batch).mean()
        return total

    @torch.no_grad()
    def held_out_loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batches: list[hessian.Batch],
        *,
        layers: list[int] | None = None,
    ) -> float | None:
        """Mean distillation loss (without the label term) over `batches`; None without batches."""
        if not batches:
            return None
        return float(torch.stack([self.loss(student, teacher, b, layers=layers) for b in batches]).mean())

    def _recover(
        self, student: nn.Module, teacher: nn.Module, data: RecoveryData, layers: list[int]
    ) -> RecoveryReport:
        held = data.batches[-self.held_out :] if 0 < self.held_out < len(data.batches) else []
        train = data.batches[: len(data.batches) - len(held)]
        if self.quantize is None:
            return self._train(student, teacher, data, layers, train, held)
        with quantised_training(
            student, train[:CALIBRATION_BATCHES], self.quantize, reduce_range=self.reduce_range
        ):
            return self._train(student, teacher, data, layers, train, held)

    def _train(
        self,
        student: nn.Module,
        teacher: nn.Module,
        data: RecoveryData,
        layers: list[int],
        train: list[hessian.Batch],
        held: list[hessian.Batch],
    ) -> RecoveryReport:
        before = self.held_out_loss(student, teacher, held, layers=layers)
        params = list(student.parameters())
        trainable = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        # The teacher runs under no_grad only (see `loss`): no gradient can reach it.
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warmup = max(1, self.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (self.steps - s) / max(1, self.steps - warmup)))
        )
        order = torch.Generator().manual_seed(self.seed)
        queue: list[int] = []
        last_log, running = time.perf_counter(), []
        for step in range(self.steps):
            if not queue:
                queue = torch.randperm(len(train), generator=order).tolist()
            batch = train[queue.pop()]
            loss = self.loss(student, teacher, batch, data.objective, layers=layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running.append(float(loss.detach()))
            if time.perf_counter() - last_log > LOG_EVERY_S or step + 1 == self.steps:
                log.info("distill step %d/%d: loss %.4f", step + 1, self.steps, sum(running) / len(running))
                last_log, running = time.perf_counter(), []
        opt.zero_grad(set_to_none=True)
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
        after = self.held_out_loss(student, teacher, held, layers=layers)
        return RecoveryReport(
            method=self.name,
            params=self.params(),
            held_out_before=before,
            held_out_after=after,
            details={"train_batches": len(train), "held_out_batches": len(held), "data": data.description},
        )


def check_int8_grid(recovery: Recovery, reduce_range: bool) -> None:
    """Refuse distillation with int8 in the loop on another weight grid than the int8 recipe deploys
    (`reduce_range` is the recipe's): it would train for weights the deployed model does not have.

    Raises:
        ConfigError: The two disagree, naming both.
    """
    if (
        isinstance(recovery, Distill)
        and recovery.quantize == "int8"
        and recovery.reduce_range != reduce_range
    ):
        raise ConfigError(
            f"recovery.method.reduce_range={recovery.reduce_range} but int8.reduce_range={reduce_range}: "
            "distillation with int8 in the loop would train for a weight grid the deployed int8 model does "
            "not use; valid: the same value for both"
        )
