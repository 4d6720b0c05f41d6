"""Bad input and faults, as a user meets them: each case runs through the apps' code and checks the
outcome (a one-line error naming the bad value and the valid choices, before the expensive step,
nothing written or deleted that the user did not ask for). The README's reliability section lists
these cases."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hwprune.search import apply_config, run_apply
from hwprune.search.config import compose
from tests.conftest import SMALL


def apply_settings(plan: Path, out: Path | str, **extra: object):  # type: ignore[no-untyped-def]
    return apply_config(
        plan=plan, out=out, task=compose("config", SMALL[:2]).task, repeats=1, onnx=False, **extra
    )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- hwprune-apply's output: never destroys what it did not write ---------------------------------


def test_overwrite_never_deletes_a_search_run_the_plan_or_the_working_directory(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    plan = run / "plans" / "dense.yaml"
    for out, match in (
        (run, r"would write over the plan"),  # the run directory holds the plan
        (run / "plans", r"would write over the plan"),
        (plan, r"would write over the plan"),
    ):
        with pytest.raises(ValueError, match=match):
            run_apply(apply_settings(plan, out, overwrite=True))
    # A run directory is refused as such when the plan is elsewhere: it is no apply output.
    elsewhere = shutil.copy(plan, tmp_path / "plan.yaml")
    with pytest.raises(
        ValueError, match=r"is not an earlier hwprune-apply output \(it has no \.hwprune-apply"
    ):
        run_apply(apply_settings(Path(elsewhere), run, overwrite=True))
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    for out in (work / "sub", work, "."):
        with pytest.raises(ValueError, match=r"would write over the working directory"):
            run_apply(apply_settings(Path(elsewhere), out, overwrite=True))
    assert snapshot(run) == before


@pytest.mark.parametrize(("out", "match"), [("", r"out='' is empty; valid: a new or empty directory")])
def test_an_empty_out_says_so(run_dir: Path, out: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_apply(apply_settings(run_dir / "plans" / "dense.yaml", out))


def test_output_is_readable_by_other_users_and_marked_as_applys_own(run_dir: Path, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        run_apply(apply_settings(run_dir / "plans" / "dense.yaml", tmp_path / "deploy" / "m"))
    finally:
        os.umask(umask)
    out = tmp_path / "deploy" / "m"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    marker = json.loads((out / ".hwprune-apply").read_text())
    assert marker["made_by"] == "hwprune-apply" and marker["plan"].endswith("dense.yaml")


def test_what_a_killed_apply_left_is_cleaned_up_or_restored(run_dir: Path, tmp_path: Path) -> None:
    plan = run_dir / "plans" / "dense.yaml"
    gone = f"{os.uname().nodename}:{2**22 + 12345}"  # beyond Linux's pid_max: no such process
    abandoned = tmp_path / f".m.staging.{gone}.abc123"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".m.staging.{os.uname().nodename}:{os.getpid()}.def456"
    alive.mkdir()  # another apply of this very process (or a live one): left alone
    run_apply(apply_settings(plan, tmp_path / "m"))
    assert not abandoned.exists() and alive.exists()
    # Killed between moving the old output aside and the new one in: the old one comes back.
    first = tmp_path / "m"
    moved = tmp_path / f".n.replaced.{gone}.xyz"
    first.rename(moved)
    with pytest.raises(ValueError, match="exists and is not empty"):  # restored, then refused as usual
        run_apply(apply_settings(plan, tmp_path / "n"))
    assert (tmp_path / "n" / ".hwprune-apply").is_file() and not moved.exists()


def test_an_unwritable_out_is_refused_before_any_work(run_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    made = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if not made:  # no immutable attribute here: a read-only directory stops a non-root user
        if os.geteuid() == 0:
            pytest.skip("needs chattr +i (ext4 and friends) or a non-root user")
        locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"out=.*locked/m cannot be written: .*locked: "):
            run_apply(apply_settings(run_dir / "plans" / "dense.yaml", locked / "m"))
    finally:
        if made:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


# --- the study journal: a record cut off by a crash is set aside, the study resumes ----------------


def small_study(run: Path, n_trials: int):  # type: ignore[no-untyped-def]
    import optuna

    from hwprune.search._storage import open_storage
    from hwprune.search._study import run_study
    from tests.test_search_core import make_objective, structure_and_scores

    return run_study(
        make_objective(structure_and_scores()),
        sampler=optuna.samplers.RandomSampler(seed=0),
        storage=open_storage(None, run),
        n_trials=n_trials,
        seeds=[],
        identity={"hardware": "cpu_local"},
    )


def test_a_record_cut_off_mid_write_is_set_aside_and_the_study_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small_study(tmp_path, 4)
    journal = tmp_path / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + whole.splitlines()[-1][:45])  # a crash 45 bytes into the next record
    with caplog.at_level("WARNING"):
        study = small_study(tmp_path, 6)
    assert len(study.trials) == 6  # the 4 trials kept, 2 more run
    (aside,) = tmp_path.glob("study.journal.torn-*")
    assert aside.read_bytes() == whole.splitlines()[-1][:45] + b"\n"
    assert "1 record(s) were cut off mid-write" in caplog.text
    assert small_study(tmp_path, 6).trials[-1].number == 5  # the repaired journal loads again


def test_a_journal_spoiled_by_an_earlier_resume_keeps_its_whole_records(tmp_path: Path) -> None:
    """Before the repair existed, a resume appended its first record onto the torn line."""
    small_study(tmp_path, 3)
    journal = tmp_path / "study.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    spoiled = b"".join(lines[:-1]) + lines[-1][:30] + lines[-1]  # torn record + the next one, one line
    journal.write_bytes(spoiled)
    assert len(small_study(tmp_path, 4).trials) == 4


def test_a_file_that_is_no_journal_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "study.journal").write_text("this is not a journal\n")
    with pytest.raises(ValueError, match=r"study\.journal: line 1 is not an Optuna journal record"):
        small_study(tmp_path, 2)
