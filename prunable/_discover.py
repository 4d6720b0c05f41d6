"""Turn a loaded `transformers` model into its `Structure`."""

from __future__ import annotations

import hashlib
import weakref

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


def is_decoder(model: nn.Module) -> bool:
    """Whether `model` generates token by token with a KV cache (its family declares it)."""
    return family_of(model).decoder


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the backbone's weights (names, shapes, dtypes and values).

    Hashing the base model, not the task head, lets a plan made on `BertModel` apply to the same
    checkpoint loaded as `BertForSequenceClassification`.
    """
    base = getattr(model, "base_model", model)
    state = sorted(base.state_dict().items())
    # A run asks several times (plan references, score caches): the hash is kept until a tensor is
    # replaced (another storage) or changed in place (its version counter moves).
    version = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in state)
    cached = _FINGERPRINTS.get(base)
    if cached is not None and cached[0] == version:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _FINGERPRINTS[base] = (version, digest.hexdigest()[:16])
    return _FINGERPRINTS[base][1]


_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()
