"""Bad input: every value is checked before anything expensive runs, in one line naming it, and
nothing is written or lost."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hwprune.search._storage import StudyStorage, open_storage
from hwprune.search._study import run_study
from hwprune.search.config import compose, to_object
from tests.test_search_core import make_objective, structure_and_scores


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.n_trials=0", r"search\.n_trials=0 is invalid; valid: >= 1"),
        ("search.n_trials=-5", r"search\.n_trials=-5 is invalid; valid: >= 1"),
        ("search.rescore=-3", r"search\.rescore=-3 is invalid; valid: >= 0"),
        ("search.rescore_min_speedup=0.5", r"search\.rescore_min_speedup=0\.5 is invalid; valid: >= 1"),
        (
            "search.rescore_max_speedup=1.0",
            r"search\.rescore_max_speedup=1\.0 is invalid; valid: > search\.rescore_min_speedup=1\.0",
        ),
        (
            "search.latency_budget_fraction=1.5",
            r"search\.latency_budget_fraction=1\.5 is invalid; valid: in \(0, 1\)",
        ),
        ("search.latency_budget_fraction=-1", r"search\.latency_budget_fraction=-1\.0 is invalid"),
        ("search.latency_budget_ms=0", r"search\.latency_budget_ms=0\.0 is invalid; valid: > 0"),
        ("search.params_budget_fraction=2", r"search\.params_budget_fraction=2\.0 is invalid"),
        (
            "search.uniform_baselines=[0.5,1.2]",
            r"search\.uniform_baselines=\[0\.5, 1\.2\] is invalid; valid: fractions in \(0, 1\)",
        ),
        ("workload.batch_size=0", r"workload: batch_size and seq_len must be >= 1, got 0, 128"),
        ("workload.phase=train", r"workload: unknown phase 'train'; valid choices: \['prefill', 'decode'\]"),
        ("workload.phase=decode", r"workload: decode needs kv_len >= 1"),
        ("recovery.samples=0", r"recovery\.samples=0 is invalid; valid: >= 1"),
        ("search.heartbeat_s=0", r"search\.heartbeat_s=0 is invalid; valid: >= 1"),
        (
            "search.storage=mysql://db/x",
            r"search\.storage='mysql://db/x' is not supported; valid: null \(a journal in the run directory\)",
        ),
    ],
)
def test_values_fail_when_the_config_is_built(override: str, message: str) -> None:
    """`to_object` runs first in every app: these fail before a model loads, naming key and range."""
    cfg = compose("config", [override])
    with pytest.raises(Exception, match=message) as err:
        to_object(cfg)
    assert len(str(err.value).strip().splitlines()) <= 3  # one line (OmegaConf may add the key path)


def run_small_study(
    objective, storage: StudyStorage, identity: dict, name: str | None = None
) -> optuna.Study:  # type: ignore[no-untyped-def]
    return run_study(
        objective,
        sampler=optuna.samplers.RandomSampler(seed=0),
        storage=storage,
        n_trials=3,
        seeds=[],
        identity=identity,
        study_name=name,
    )


def test_a_run_directory_holds_one_identity(tmp_path: Path) -> None:
    objective = make_objective(structure_and_scores())
    identity = {"hardware": "cpu_local", "workload": {"batch_size": 1}, "task": "fidelity"}

    def study(**changes: object) -> optuna.Study:
        return run_small_study(objective, open_storage(None, tmp_path), identity | changes)

    first = study()
    assert first.user_attrs["hwprune_identity"] == identity and first.study_name.startswith("hwprune-")
    assert len(study().trials) == 3  # the same settings resume it
    with pytest.raises(
        ValueError, match=r"holds a study made for other settings \(hardware: 'cpu_local' -> 'gpu_h100'\)"
    ):
        study(hardware="gpu_h100")
    storage = open_storage(None, tmp_path).storage
    assert optuna.get_all_study_names(storage) == [first.study_name]  # nothing was added


def test_a_shared_study_is_joined_only_with_the_same_identity(tmp_path: Path) -> None:
    objective = make_objective(structure_and_scores())
    storage = open_storage(str(tmp_path / "shared.journal"), tmp_path)
    assert storage.shared

    def study(identity: dict, name: str | None = None) -> optuna.Study:
        return run_small_study(objective, storage, identity, name)

    cpu, gpu = study({"hardware": "cpu_local"}), study({"hardware": "gpu_h100"})
    assert cpu.study_name != gpu.study_name  # one study per identity in a shared storage
    study({"hardware": "cpu_local"}, name="mine")
    with pytest.raises(
        ValueError, match=r"study 'mine' was made for other settings \(hardware: 'cpu_local' -> 'gpu_h100'\)"
    ):
        study({"hardware": "gpu_h100"}, name="mine")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "search.latency_budget_ms=0.001",
            r"search\.latency_budget_ms=0\.001 is unreachable: the fastest configuration .* predicts [0-9.]+ ms "
            r"on cpu_local .*; valid: >= ",
        ),
        ("search.latency_budget_fraction=0.001", r"search\.latency_budget_fraction=0\.001 is unreachable"),
        (
            "workload.seq_len=4096",
            r"workload\.seq_len=4096 exceeds the model's max_position_embeddings=512; valid: <= 512 tokens",
        ),
    ],
)
def test_what_needs_the_model_fails_before_the_saliency(override: str, message: str, tmp_path: Path) -> None:
    from hwprune.search._from_config import run_config

    app = to_object(compose("config", [override, f"saliency.cache_dir={tmp_path / 'cache'}"]))
    with pytest.raises(ValueError, match=message):
        run_config(app, tmp_path / "run")  # type: ignore[arg-type]
    assert not (tmp_path / "cache").exists()  # no saliency was computed
    written = sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("."))
    assert written == ["study.journal"]  # the (empty) study, opened first; nothing else (locks are hidden)


def test_the_command_line_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        ["hwprune-search", "search.n_trials=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in (done.stderr + done.stdout).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith("search.n_trials=0 is invalid; valid: >= 1")
