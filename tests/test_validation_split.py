"""Plans are chosen on a validation split and reported on the evaluation data (never the same pairs)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from hwprune import prunable
from hwprune.search._outcome import Candidate
from hwprune.search._report import best_within, choice_column, which_plan
from hwprune.search._rescore import mark_dominated
from hwprune.search._space import Widths
from hwprune.search.tasks import FidelityTask, LMTask, STSTask


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(prunable.resolve_source(prunable.MINILM)))


def write_sts(path: Path, n: int, *, offset: int = 0) -> Path:
    rows = [
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{(i * 7) % 51 / 10}\tA man plays {i}.\tA man is playing {i}."
        for i in range(offset, offset + n)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def pairs_of(pairs) -> set[str]:  # type: ignore[no-untyped-def]
    return set(pairs.first)


def test_sts_holds_out_a_seeded_part_of_the_training_file(tmp_path: Path, tokenizer, minilm) -> None:  # type: ignore[no-untyped-def]
    train, dev = write_sts(tmp_path / "train.csv", 200), write_sts(tmp_path / "dev.csv", 40, offset=1000)
    task = STSTask(train_path=train, eval_path=dev, tokenizer=tokenizer)
    assert task.validation_pairs is not None and len(task.validation_pairs.scores) == 30  # 15 % of 200
    assert len(task.train.scores) == 170
    held, kept = pairs_of(task.validation_pairs), pairs_of(task.train)
    assert not held & kept and not held & pairs_of(task.eval) and len(held | kept) == 200
    assert task.validation == "30 pairs held out of train.csv (seed 0)"
    # Calibration and recovery draw only from what is left of the training file.
    assert task.calibration(minilm).n_samples == 170
    assert task.recovery_data(samples=1000).description.startswith("170 pairs of train.csv")
    # Seeded: the same split again, another one for another seed.
    again = STSTask(train_path=train, eval_path=dev, tokenizer=None)
    assert pairs_of(again.validation_pairs) == held  # type: ignore[arg-type]
    other = STSTask(train_path=train, eval_path=dev, tokenizer=None, seed=1)
    assert pairs_of(other.validation_pairs) != held  # type: ignore[arg-type]
    off = STSTask(train_path=train, eval_path=dev, tokenizer=None, validation_fraction=0)
    assert off.validation is None and off.validation_pairs is None and len(off.train.scores) == 200


def test_sts_takes_a_validation_file_and_refuses_one_that_is_another_split(tmp_path: Path) -> None:
    train, dev = write_sts(tmp_path / "train.csv", 50), write_sts(tmp_path / "dev.csv", 40, offset=1000)
    val = write_sts(tmp_path / "val.csv", 20, offset=2000)
    task = STSTask(train_path=train, eval_path=dev, tokenizer=None, validation_path=val)
    assert task.validation == "val.csv (20 pairs)" and len(task.train.scores) == 50  # train untouched
    for same, role in ((dev, "eval"), (train, "training")):
        with pytest.raises(ValueError, match=rf"validation_path=.*{same.name} is the {role} file too"):
            STSTask(train_path=train, eval_path=dev, tokenizer=None, validation_path=same)
    with pytest.raises(ValueError, match=r"validation_fraction=0.9: valid: 0 \(no validation split\) to 0.5"):
        STSTask(train_path=train, eval_path=dev, tokenizer=None, validation_fraction=0.9)
    flat = tmp_path / "flat.csv"
    flat.write_text("".join(f"g\tf\ty\t{i}\t2.0\ta {i}\tb {i}\n" for i in range(5)))
    with pytest.raises(ValueError, match=r"validation_path=.*flat.csv: 5 pair\(s\) with 1 distinct score"):
        STSTask(train_path=train, eval_path=dev, tokenizer=None, validation_path=flat)


def test_a_training_file_too_small_to_hold_out_from_says_so(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    train, dev = write_sts(tmp_path / "train.csv", 4), write_sts(tmp_path / "dev.csv", 10, offset=100)
    with caplog.at_level(logging.WARNING, logger="hwprune.search"):
        task = STSTask(train_path=train, eval_path=dev, tokenizer=None)
    assert task.validation is None and len(task.train.scores) == 4
    assert "leaves no usable validation split" in caplog.text and "biased upwards" in caplog.text


def test_sts_validate_measures_the_validation_pairs(tmp_path: Path, tokenizer, minilm) -> None:  # type: ignore[no-untyped-def]
    train, dev = write_sts(tmp_path / "train.csv", 60), write_sts(tmp_path / "dev.csv", 20, offset=500)
    task = STSTask(train_path=train, eval_path=dev, tokenizer=tokenizer, validation_fraction=0.5)
    on_dev, on_val = task.evaluate(minilm), task.validate(minilm)
    assert on_val is not None and on_val != on_dev
    # The same figure as an STS task whose eval file holds the validation pairs.
    pairs = task.validation_pairs
    assert pairs is not None
    val_file = tmp_path / "val.csv"
    val_file.write_text(
        "".join(
            f"g\tf\ty\t{i}\t{s}\t{a}\t{b}\n"
            for i, (a, b, s) in enumerate(zip(pairs.first, pairs.second, pairs.scores.tolist(), strict=True))
        )
    )
    direct = STSTask(train_path=dev, eval_path=val_file, tokenizer=tokenizer, validation_fraction=0)
    assert direct.evaluate(minilm) == pytest.approx(on_val, abs=1e-9)


def test_fidelity_and_lm_hold_out_validation_data_apart(tokenizer, minilm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fidelity = FidelityTask(tokenizer=tokenizer, calibration_samples=8, eval_samples=8, validation_samples=8)
    held = set(fidelity.validation_texts)
    assert len(held) == 8 and not held & set(fidelity.eval_texts) and not held & set(fidelity.train_texts)
    fidelity.prepare(minilm)
    assert fidelity.validate(minilm) == pytest.approx(100.0, abs=1e-3)  # the dense model agrees with itself
    assert FidelityTask(tokenizer=tokenizer, validation_samples=0).validate(minilm) is None
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i}" for i in range(3000)))
    lm = LMTask(
        tokenizer=None,
        text_path=text,
        block_size=32,
        calibration_blocks=4,
        eval_blocks=8,
        validation_blocks=8,
    )
    n = len(lm.train_blocks) + len(lm.validation_set) + len(lm.eval_set)
    assert len(lm.validation_set) == 8 and lm.validation == f"8 blocks of {text} before the evaluated ones"
    # [train | validation | eval]: no block of one is in another.
    rows = {
        tuple(b.tolist()): name for name, s in (("t", lm.train_blocks), ("v", lm.validation_set)) for b in s
    }
    assert len(rows) + len(lm.eval_set) == n and not any(tuple(b.tolist()) in rows for b in lm.eval_set)


def candidate(
    label: str, latency: float, metric: float, validation: float, kind: str = "search"
) -> Candidate:
    w = Widths(np.array([1]), np.array([1]), None, None)
    return Candidate(kind, w, latency, 0.0, metric=metric, metric_validation=validation, label=label)


def test_the_front_and_the_pick_follow_the_validation_metric_not_the_reported_one() -> None:
    # Plan b looks best on the evaluation data, but plans are chosen on validation, where a wins.
    dense, a, b = (
        candidate("dense", 10.0, 80.0, 82.0, kind="dense"),
        candidate("a", 5.0, 79.0, 81.9),
        candidate("b", 4.0, 79.9, 70.0),
    )
    mark_dominated([dense, a, b], higher_is_better=True)
    assert (dense.dominated, a.dominated, b.dominated) == (False, False, False)
    c = candidate("c", 6.0, 80.5, 81.0)  # beats a on the eval metric, not on validation: dominated
    mark_dominated([dense, a, b, c], higher_is_better=True)
    assert c.dominated and not a.dominated
    rows = [
        {"kind": x.kind, "label": x.label, "plan_path": f"plans/{x.label}.yaml", "latency_ms": x.latency_ms}
        | {"speedup": 10.0 / x.latency_ms, "metric": x.metric, "metric_validation": x.metric_validation}
        | {"degenerate": None}
        for x in (dense, a, b, c)
    ]
    pareto = pd.DataFrame(rows)
    assert choice_column(pareto) == "metric_validation"
    assert best_within(pareto, 0.005, higher_is_better=True).label == "a"  # type: ignore[union-attr]
    # Without a validation split the same frame is chosen on the reported metric (and says so).
    no_val = pareto.assign(metric_validation=float("nan"))
    assert choice_column(no_val) == "metric"
    assert best_within(no_val, 0.005, higher_is_better=True).label == "b"  # type: ignore[union-attr]
    table = which_plan(pareto, higher_is_better=True, source="table", validation="30 pairs")
    assert "chosen on the validation split (30 pairs" in table[2]
    assert table[6].startswith("| 0.5% | `plans/a.yaml` | 2.00x | 79.000 | -1.000 | 81.900 | -0.100 |")
    plain = which_plan(no_val, higher_is_better=True, source="table", validation=None)
    assert "biased upwards" in plain[2] and plain[6].startswith("| 0.5% | `plans/b.yaml` | 2.50x | 79.900 |")


def test_lower_is_better_validation_is_chosen_the_right_way() -> None:
    dense, a, b = (
        candidate("dense", 10.0, 20.0, 21.0, kind="dense"),
        candidate("a", 5.0, 20.05, 21.05),  # perplexity: +0.05 on validation
        candidate("b", 4.0, 20.0, 25.0),
    )
    rows = [
        {"kind": x.kind, "label": x.label, "plan_path": x.label, "latency_ms": x.latency_ms, "speedup": 1.0}
        | {"metric": x.metric, "metric_validation": x.metric_validation, "degenerate": None}
        for x in (dense, a, b)
    ]
    pick = best_within(pd.DataFrame(rows), 0.005, higher_is_better=False)
    assert pick is not None and pick.label == "a"
    assert torch.isfinite(torch.tensor(pick.metric_validation))
