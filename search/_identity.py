"""What a study is about: its identity, recorded in the study, compared whenever it is resumed or joined.

A run's identity names the model (source, structure and weights fingerprints), task, hardware,
workload, latency source, saliency and search space. Resuming or joining a study recorded for
anything else is refused with the differences; the part of it that needs no model is checked
before the model loads (`check_resumable`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import optuna

from hwprune.errors import ConfigError
from hwprune.search._storage import StudyStorage

IDENTITY_ATTR = "hwprune_identity"


def study_name_for(identity: Mapping[str, Any]) -> str:
    """A study name derived from what the study is about: one study per identity in a shared storage."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"hwprune-{digest[:12]}"


def identity_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """`key: recorded -> wanted` for every part of two identities that differs."""
    keys = sorted(set(recorded) | set(wanted))
    return [
        f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)
    ]


def other_settings(differences: list[str], study_name: str | None = None) -> ConfigError:
    """The error for a study recorded for other settings: of the run directory (`study_name` None),
    or the shared study `study_name`; names the differences and what to do."""
    if study_name is None:
        where = "this run directory holds a study made for other settings"
        fix = "resume it with the settings it was made with, or start a new run directory"
    else:
        where = f"study {study_name!r} was made for other settings"
        fix = "join it with the same settings or give this search another search.study_name"
    return ConfigError(f"{where} ({'; '.join(differences)}); {fix}")


def check_resumable(storage: StudyStorage, known: Mapping[str, Any], study_name: str | None = None) -> None:
    """Refuse, before the model loads, to resume a study recorded for other settings.

    `known` is the part of the run's identity that needs no model (hardware, workload, saliency
    method and settings, constraints, model source); each of its keys, and each sub-key of a
    mapping, is compared with the recorded identity. The rest is checked when the study opens.

    Raises:
        ValueError: The differences, as `run_study` names them.
    """
    if storage.kind == "run_dir":
        names, shared_name = optuna.get_all_study_names(storage.storage), None
    elif study_name is not None and study_name in optuna.get_all_study_names(storage.storage):
        names, shared_name = [study_name], study_name
    else:
        return  # a new study, or one named after the whole identity
    for name in names:
        recorded = optuna.load_study(study_name=name, storage=storage.storage).user_attrs.get(IDENTITY_ATTR)
        if recorded is None:
            continue
        seen = {
            k: {kk: recorded.get(k, {}).get(kk) for kk in v} if isinstance(v, Mapping) else recorded.get(k)
            for k, v in known.items()
        }
        if differences := identity_differences(seen, known):
            raise other_settings(differences, shared_name)
