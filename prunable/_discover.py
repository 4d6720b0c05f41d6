"""Turn a loaded `transformers` model into its `Structure`."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from hwprune.prunable._families import family_of
from hwprune.prunable._structure import Structure


def discover(model: nn.Module) -> Structure:
    """The prunable structure of `model`, read from its modules.

    Widths come from the weights actually present, so a pruned (even non-uniform) model is described
    as it is, not as its config claims.

    Raises:
        ValueError: `model` is not of a supported architecture family; the message names its class
            and lists the supported model types.
    """
    return family_of(model).structure(model)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the backbone's weights (names, shapes, dtypes and values).

    Hashing the base model, not the task head, lets a plan made on `BertModel` apply to the same
    checkpoint loaded as `BertForSequenceClassification`.
    """
    base = getattr(model, "base_model", model)
    digest = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
