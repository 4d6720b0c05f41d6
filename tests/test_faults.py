"""Bad input and faults, as a user meets them: each case runs through the apps' code and checks the
outcome (a one-line error naming the bad value and the valid choices, before the expensive step,
nothing written or deleted that the user did not ask for). The README's reliability section lists
these cases."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hwprune.search import apply_config, run_apply
from hwprune.search.config import compose
from tests.conftest import SMALL


def apply_settings(plan: Path, out: Path | str, **extra: object):  # type: ignore[no-untyped-def]
    settings: dict[str, object] = {"repeats": 1, "onnx": False, **extra}
    return apply_config(plan=plan, out=out, task=compose("config", SMALL[:3]).task, **settings)


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


# --- saliency that would score every unit 0: refused before the passes, not a front of one point ----


def test_taylor_on_a_label_free_task_is_refused_before_scoring(tmp_path: Path) -> None:
    from hwprune.search import run_config
    from tests.conftest import app_config

    app = app_config(tmp_path, "saliency=taylor")  # the default task: fidelity, no labels
    with pytest.raises(
        ValueError,
        match=r"saliency=taylor uses the loss gradient alone, and the embedding-distance objective is at its "
        r"minimum at the dense model .* valid with this objective: \['fisher', 'heapr', 'hutchinson', "
        r"'magnitude', 'nvit', 'random'\]",
    ):
        run_config(app, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # no scoring pass ran


def test_scores_that_are_all_zero_are_refused() -> None:
    import torch

    from hwprune import hessian, prunable
    from tests.test_saliency import calibration

    class Flat(hessian.MagnitudeSaliency, register=False):  # a method whose loss never moves
        name = "flat"

        def _score(self, model, structure, calibration, options):  # type: ignore[no-untyped-def]
            return [torch.zeros(la.attention_units) for la in structure.layers], [
                torch.zeros(la.mlp_width) for la in structure.layers
            ]

    model, calib = calibration("bert", supervised=True)
    with pytest.raises(
        ValueError, match=r"saliency=flat scored every unit 0 on toy bert: the loss does not change"
    ):
        Flat().score(model, calib)
    assert prunable.discover(model).num_layers == 3


# --- hwprune-apply prices the widths it applies, not what the plan file says -----------------------


def test_apply_prices_the_widths_it_applies(
    run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from hwprune import cost_models, prunable
    from hwprune.search import model_cost_model

    plan_path = run_dir / "plans" / "uniform_50pct.yaml"
    plan = prunable.PrunePlan.load(plan_path)
    stored = plan.metadata["dense_latency_ms"] / plan.metadata["latency_ms"]
    with caplog.at_level("WARNING"):
        as_searched = run_apply(apply_settings(plan_path, tmp_path / "a"))
    assert as_searched["predicted_speedup"] == pytest.approx(stored, rel=1e-9)
    assert as_searched["precision"] == plan.metadata["precision"] == "bf16"  # the plan's (gpu_h100)
    assert as_searched["predicted_speedup_stored"] == pytest.approx(stored, rel=1e-9)
    assert "the plan says it predicted" not in caplog.text

    # Edited by hand: every layer keeps one attention unit and 64 neurons; the file says what it said.
    edited = dataclasses.replace(
        plan, layers=tuple(dataclasses.replace(lp, heads=lp.heads[:1], mlp=lp.mlp[:64]) for lp in plan.layers)
    )
    edited_path = edited.save(tmp_path / "edited.yaml")
    with caplog.at_level("WARNING"):
        result = run_apply(apply_settings(edited_path, tmp_path / "e"))
    model = prunable.load_model(plan.model.source, plan.model.class_name)  # type: ignore[arg-type]
    cost_model = model_cost_model(
        cost_models.load_profile("gpu_h100"), model, cost_models.Workload(**plan.metadata["workload"])
    )
    n = len(plan.layers)
    expected = cost_model.dense_ms() / float(cost_model.predict([1] * n, [64] * n).latency_ms)
    assert result["predicted_speedup"] == pytest.approx(expected, rel=1e-9) and expected > stored * (1 + 1e-3)
    assert result["predicted_speedup_stored"] == pytest.approx(stored, rel=1e-9)
    assert (
        f"the plan says it predicted {stored:.2f}x, its widths predict {expected:.2f}x on gpu_h100"
        in caplog.text
    )


# --- the front's `dominated` column counts the uniform baselines -----------------------------------


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_a_search_plan_a_uniform_baseline_beats_is_dominated(higher_is_better: bool) -> None:
    """The default run's trial_140 (1.58x, 72.98) was listed as on the front beside uniform 50 %
    (1.73x, 74.33), which beats it on both."""
    import numpy as np

    from hwprune.search._outcome import Candidate
    from hwprune.search._rescore import mark_dominated
    from hwprune.search._space import Widths

    sign = 1.0 if higher_is_better else -1.0  # the same metrics, negated for a lower-is-better task
    w = Widths(np.zeros(1), np.zeros(1))

    def candidate(kind: str, speedup: float, metric: float) -> Candidate:
        return Candidate(kind, w, 10.0 / speedup, 0.0, metric=sign * metric)

    dense, trial, uniform, fast = (
        candidate("dense", 1.0, 100.0),
        candidate("search", 1.58, 72.98),
        candidate("uniform", 1.73, 74.33),
        candidate("search", 3.0, 50.0),
    )
    mark_dominated([dense, trial, uniform, fast], higher_is_better=higher_is_better)
    assert [c.dominated for c in (dense, trial, uniform, fast)] == [False, True, False, False]


# --- inputs that would make every number NaN or meaningless ----------------------------------------


def write_sts(path: Path, scores: list[float]) -> Path:
    rows = [
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s}\tA man plays {i}.\tA man is playing {i}."
        for i, s in enumerate(scores)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ([3.0], r"eval\.csv: 1 pair\(s\) with 1 distinct score\(s\); Spearman's correlation needs"),
        ([2.5] * 8, r"eval\.csv: 8 pair\(s\) with 1 distinct score\(s\)"),
    ],
)
def test_an_eval_file_whose_metric_is_nan_is_refused(tmp_path: Path, scores: list[float], match: str) -> None:
    from hwprune.search.tasks import STSTask

    train = write_sts(tmp_path / "train.csv", [0.0, 1.0, 2.0, 5.0])
    with pytest.raises(ValueError, match=match):
        STSTask(train_path=train, eval_path=write_sts(tmp_path / "eval.csv", scores), tokenizer=None)


def test_the_training_file_is_refused_as_the_eval_file(tmp_path: Path) -> None:
    from hwprune.search.tasks import STSTask

    train = write_sts(tmp_path / "train.csv", [0.0, 1.0, 2.0, 5.0])
    copy = shutil.copy(train, tmp_path / "copy.csv")
    for eval_path in (train, Path(copy)):
        with pytest.raises(
            ValueError, match=r"eval_path=.* is the training file too: recovery would train on"
        ):
            STSTask(train_path=train, eval_path=eval_path, tokenizer=None)


def test_decode_on_an_encoder_is_refused_before_the_saliency(tmp_path: Path) -> None:
    from hwprune.search import run_config
    from tests.conftest import app_config

    app = app_config(tmp_path, "workload=decode_b1_kv2048")
    with pytest.raises(
        ValueError,
        match=r"workload\.phase=decode needs a decoder that generates with a KV cache; BertModel \(bert\) is an "
        r"encoder; valid for it: workload\.phase=prefill",
    ):
        run_config(app, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_a_parameter_budget_only_removing_everything_meets_is_refused(tmp_path: Path) -> None:
    from hwprune.search import run_config
    from tests.conftest import app_config

    app = app_config(tmp_path, "search.params_budget_fraction=0.001", "hardware=gpu_h100")
    with pytest.raises(
        ValueError,
        match=r"search\.params_budget_fraction=0\.001 leaves no optimal configuration but the one that removes "
        r"every unit: the next smallest on the exact front keeps [0-9.e-]+ of the blocks' parameters; valid: >= ",
    ):
        run_config(app, tmp_path / "run")
    assert not (tmp_path / "run" / "trials.csv").exists()
    assert (tmp_path / "run" / "study.journal").read_text() == ""  # no trial ran


# --- a measurement on a busy machine says so, after trying to get a stable one ---------------------


def fake_timers(monkeypatch: pytest.MonkeyPatch, dense: list[float], pruned: list[float]) -> None:
    """`model_timer` that replays the given latencies (dense model first, as `measure` builds them)."""
    from hwprune.search import _timing

    queues = [iter(dense), iter(pruned)]
    made = iter(range(2))
    monkeypatch.setattr(_timing, "model_timer", lambda model, workload, device: queues[next(made)].__next__)


def test_an_unstable_speedup_is_measured_again_then_flagged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from hwprune import cost_models
    from hwprune.search._timing import MAX_BATCHES, measure

    warm = [1.0] * 3  # the three warm-up calls of each timer
    busy = [68.0, 391.0, 164.0, 70.0] * MAX_BATCHES  # a loaded machine: quartiles 68/164/391 ms
    fake_timers(monkeypatch, warm + busy, warm + [50.0] * len(busy))
    with caplog.at_level("INFO"):
        timing = measure(
            [(torch.nn.Identity(), cost_models.Workload()), (torch.nn.Identity(), cost_models.Workload())],
            device=torch.device("cpu"),
            repeats=4,
        )
    assert len(timing.dense) == 4 * MAX_BATCHES and timing.stable is False and timing.spread > 0.25
    assert timing.speedup == pytest.approx(117.0 / 50.0)  # median dense / median pruned
    assert "timing 4 more rounds" in caplog.text and "the measured speedup is unstable" in caplog.text

    # A noisy start that settles: measured again until the quartiles close in (12 rounds), stable.
    caplog.clear()
    settled = [10.0, 30.0, 10.0, 30.0] + [20.0] * 12
    fake_timers(monkeypatch, warm + settled, warm + [10.0] * 16)
    with caplog.at_level("INFO"):
        timing = measure(
            [(torch.nn.Identity(), cost_models.Workload()), (torch.nn.Identity(), cost_models.Workload())],
            device=torch.device("cpu"),
            repeats=4,
        )
    assert len(timing.dense) == 12 and timing.stable is True and timing.speedup == pytest.approx(2.0)
    assert "unstable" not in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python ignores an exception raised while it runs a finalizer: a Ctrl-C handled there is lost,
    and without `stop_at_once` remembering it an apply timing 100000 rounds would go on."""
    import gc
    import os
    import signal

    import torch

    from hwprune import cost_models
    from hwprune.search._interrupt import stop_at_once
    from hwprune.search._timing import measure

    calls: list[int] = []
    monkeypatch.setattr(
        "hwprune.search._timing.model_timer", lambda model, workload, device: lambda: calls.append(1) or 1.0
    )

    class PressesCtrlC:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs (and raises) at a bytecode boundary in here
                pass

    models = [(torch.nn.Identity(), cost_models.Workload()), (torch.nn.Identity(), cost_models.Workload())]
    with stop_at_once():
        PressesCtrlC()  # finalized at once: "Exception ignored in ... KeyboardInterrupt"
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            measure(models, device=torch.device("cpu"), repeats=100_000)
    assert calls == []  # stopped before the first forward
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    measure(models, device=torch.device("cpu"), repeats=4)  # and forgotten once the block is left
    assert len(calls) == 2 * (3 + 4)


def test_apply_reports_the_median_dense_over_the_median_pruned_latency(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the median (nor the mean) of the per-round speedups: those differ on these latencies."""
    import itertools
    import json
    import statistics

    from hwprune.search import _timing

    # dense, pruned (rounds pair them unevenly), and the dense model at the pruned one's precision
    cycles = [[10.0, 40.0, 20.0, 30.0], [2.0, 5.0, 9.0], [9.0]]
    made = iter(range(3))
    monkeypatch.setattr(
        _timing, "model_timer", lambda model, workload, device: itertools.cycle(cycles[next(made)]).__next__
    )
    out = tmp_path / "m"
    run_apply(apply_settings(run_dir / "plans" / "dense.yaml", out, precision="fp32", repeats=8))
    result = json.loads((out / "apply.json").read_text())
    rounds = result["workload"]["repeats"]
    assert rounds >= 8 and rounds % 8 == 0  # the per-round speedups spread: timed again in batches of 8
    dense = list(itertools.islice(itertools.cycle(cycles[0]), 3, 3 + rounds))  # after 3 warm-up calls
    pruned = list(itertools.islice(itertools.cycle(cycles[1]), 3, 3 + rounds))
    want = statistics.median(dense) / statistics.median(pruned)
    per_round = [d / p for d, p in zip(dense, pruned, strict=True)]
    assert abs(statistics.median(per_round) - want) > 0.1 and abs(statistics.mean(per_round) - want) > 0.1
    assert result["measured_speedup"] == pytest.approx(want)
    assert result["latency_ms_dense"] == statistics.median(dense)
    assert result["latency_ms_pruned"] == statistics.median(pruned)


# --- the command lines: one line for every user error, Ctrl-C included ------------------------------

TINY = [
    "task.build.calibration_samples=8",
    "task.build.eval_samples=8",
    "task.build.validation_samples=8",
    "search.rescore=0",
    "search.uniform_baselines=[]",
    "search.exact_seeds=3",
    "recovery=none",
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=600)


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    """The run's error line (asserting no traceback). `hwprune-search` logs `[hwprune][ERROR] - ...`;
    `hwprune-apply` logs plain lines to stdout, its error the last."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    if not errors and done.args[0] == "hwprune-apply":
        errors = [line for line in output.splitlines() if line.strip()][-1:]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_command_line_mistakes_are_one_line_with_the_valid_choices(run_dir: Path, tmp_path: Path) -> None:
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    cases = [
        (
            ["hwprune-search", "search.n_trails=4"],
            r"unknown key 'search.n_trails' \(SearchConfig\); valid keys: \[.*'n_trials'",
        ),
        (
            ["hwprune-search", "task=sts"],
            r"task.build.train_path is required and not set; pass task.build.train_path=",
        ),
        (
            ["hwprune-search", f"model.source={bad_config}"],
            r"bad_config: BertModel cannot be loaded from .*config.json.* is not a valid JSON file",
        ),
        (["hwprune-search", f"model.source={no_weights}"], r"no_weights: BertModel cannot be loaded from"),
        (
            ["hwprune-apply", f"plan={run_dir / 'plans' / 'dense.yaml'}"],
            r"out is required and not set; pass out=",
        ),
        (
            ["hwprune-apply", f"plan={run_dir}", f"out={tmp_path / 'o'}"],
            r"plan=.* is a directory; valid: a plan file \(a search run's plans/\*\.yaml, e\.g\. dense\.yaml",
        ),
    ]
    for args, match in cases:
        done = cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout[-2000:], done.stderr[-2000:])
        assert re.search(match, one_error(done)), (args, one_error(done))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.csv"))


def test_postgresql_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    from hwprune.search._storage import open_storage

    for url, match in (
        (
            "postgresql://postgres@127.0.0.1:5432/hwprune_no_such_db",
            r'database "hwprune_no_such_db" does not exist',
        ),
        (
            "postgresql://postgres:secret@127.0.0.1:1/postgres",
            r"postgres:\*\*\*@127\.0\.0\.1:1/postgres: cannot connect",
        ),
    ):
        with pytest.raises(
            ValueError, match=r"search\.storage=postgresql://.*: cannot connect to PostgreSQL: "
        ) as err:
            open_storage(url, tmp_path)
        assert len(str(err.value).splitlines()) == 1
        assert re.search(match, str(err.value)) and "secret" not in str(err.value)


def interrupt_when(args: list[str], cwd: Path, marker: str, delay: float) -> subprocess.CompletedProcess[str]:
    """Run `args`, send SIGINT `delay` s after `marker` appears in its output, and wait for it."""
    import signal
    import threading
    import time

    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(marker in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # never leave it running: it would slow every later test
        proc.kill()
        proc.wait()
        reader.join()
        raise AssertionError(
            f"{args[0]} did not stop within 120 s of Ctrl-C:\n" + "".join(lines)[-3000:]
        ) from None
    reader.join()
    return subprocess.CompletedProcess(args, proc.returncode, "".join(lines), "")


def test_ctrl_c_keeps_the_trials_says_how_to_resume_and_a_refused_resume_changes_nothing(
    tmp_path: Path,
) -> None:
    import pandas as pd

    run = tmp_path / "run"
    args = ["hwprune-search", *TINY, "search.n_trials=100000", f"hydra.run.dir={run}"]
    done = interrupt_when(args, tmp_path, "exact proxy front", delay=3.0)
    assert done.returncode == 130, done.stdout[-3000:]
    line = one_error(done)
    assert "interrupted: the study's finished trials are kept in" in line
    resume = shlex.split(line.split("resume with: ", 1)[1])  # as a shell reads the pasted command
    assert resume[0] == "hwprune-search" and f"hydra.run.dir={run}" in resume
    assert set(args[1:-1]) <= set(resume)
    # The printed command resumes (here with a trial budget already met: nothing more runs).
    again = cli(
        *[a if not a.startswith("search.n_trials=") else "search.n_trials=1" for a in resume], cwd=tmp_path
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming study" in again.stdout + again.stderr
    assert len(pd.read_csv(run / "trials.csv")) >= 1
    record = (run / ".hydra" / "config.yaml").read_bytes()
    refused = cli(*resume, "hardware=gpu_h100", cwd=tmp_path)
    assert refused.returncode == 2
    assert "holds a study made for other settings (hardware: 'cpu_local' -> 'gpu_h100'" in one_error(refused)
    assert (run / ".hydra" / "config.yaml").read_bytes() == record


def test_a_refused_resume_is_refused_before_the_model_loads(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hwprune import prunable
    from hwprune.search import run_config
    from tests.conftest import app_config

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(prunable, "load_model", no_model)
    accepted: list[bool] = []
    for change, match in (
        ("hardware=cpu_local", r"hardware: 'gpu_h100' -> 'cpu_local'"),
        ("saliency=fisher", r"saliency: .*'method': 'nvit'.* -> .*'method': 'fisher'"),
        ("workload=b8_s128", r"workload: .*'batch_size': 1.* -> .*'batch_size': 8"),
        ("search.latency_budget_fraction=0.5", r"constraints: "),
    ):
        app = app_config(tmp_path, "hardware=gpu_h100", change)
        with pytest.raises(
            ValueError, match=r"this run directory holds a study made for other settings \(.*" + match
        ):
            run_config(app, run, accepted=lambda: accepted.append(True))
    assert accepted == []


def test_ctrl_c_in_apply_leaves_nothing_behind(run_dir: Path, tmp_path: Path) -> None:
    plan = run_dir / "plans" / "dense.yaml"
    args = ["hwprune-apply", f"plan={plan}", f"out={tmp_path / 'deploy'}", "repeats=100000", "onnx=false"]
    done = interrupt_when(args, tmp_path, "timing prefill", delay=2.0)
    assert done.returncode == 130, done.stdout[-3000:]
    assert one_error(done).endswith("interrupted: nothing was written (out stays as it was)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the report helps choose: which plan at which tolerance, degenerate plans marked ---------------


def test_which_plan_respects_the_metric_direction_of_a_task_registered_in_one_place() -> None:
    """A lower-is-better task defined in one class is treated so: no list elsewhere to update."""
    import pandas as pd

    from hwprune.search import tasks
    from hwprune.search._report import best_within, which_plan

    class ToyError(tasks.Task):  # registered by being defined
        name = "toy_error"
        metric_name = "toy_error_pct"
        higher_is_better = False

        def calibration(self, model):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def evaluate(self, model):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def recovery_data(self, *, samples, seed=0):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    assert tasks.TASKS["toy_error"] is ToyError and tasks.higher_is_better("toy_error_pct") is False
    tasks.TASKS.discard("toy_error")  # the other tests see the shipped tasks only
    with pytest.raises(ValueError, match=r"no task defines the metric 'mystery'; known metrics: \["):
        tasks.higher_is_better("mystery")
    frame = pd.DataFrame(
        {
            "kind": ["dense", "search", "search", "uniform", "search"],
            "label": ["dense", "trial 1", "trial 2", "uniform 50%", "trial 3"],
            "plan_path": ["plans/dense.yaml", "a", "b", "c", "d"],
            "latency_ms": [10.0, 8.0, 5.0, 6.0, 1.0],
            "speedup": [1.0, 1.25, 2.0, 1.67, 10.0],
            "metric": [10.0, 10.04, 10.4, 10.15, 10.0],  # error %: lower is better
            "degenerate": [None, None, None, None, "no attention left"],
        }
    )
    picked = {tol: best_within(frame, tol, higher_is_better=False) for tol in (0.005, 0.01, 0.02, 0.05)}
    assert [None if p is None else p.label for p in picked.values()] == [
        "trial 1",
        "trial 1",
        "uniform 50%",
        "trial 2",
    ]  # trial 3 is as good as dense and 10x, but keeps no attention: never picked
    table = "\n".join(which_plan(frame, higher_is_better=False, source="analytical"))
    assert "| 2% | `c` | 1.67x | 10.150 | +0.150 |" in table


def test_degenerate_plans_are_named() -> None:
    import numpy as np

    from hwprune import cost_models
    from hwprune.search._rescore import degenerate_reason
    from hwprune.search._space import Widths

    spec = cost_models.BlockSpec(hidden=384, head_dim=32, heads=12, kv_heads=12, mlp=1536, num_layers=6)
    n = spec.num_layers
    one_head_less = Widths(np.array([11] + [12] * (n - 1)), np.full(n, 1536))
    assert degenerate_reason(one_head_less, spec).startswith("removes 0.")
    assert degenerate_reason(Widths(np.zeros(n, int), np.full(n, 512)), spec) == "no attention left"
    assert degenerate_reason(Widths(np.full(n, 4), np.zeros(n, int)), spec) == "no MLP left"
    assert degenerate_reason(Widths(np.full(n, 6), np.full(n, 768)), spec) == ""
