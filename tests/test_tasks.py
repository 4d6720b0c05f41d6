"""Tasks: data parsing with clear errors, calibration batches, metrics, on small local data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from hwprune import hessian, prunable
from hwprune.search.config import TaskConfig, build_task
from hwprune.search.tasks import (
    ClassificationTask,
    FidelityTask,
    LMTask,
    STSTask,
    digits_split,
    pydoc_passages,
    read_sts,
    train_vit_digits,
)
from tests.conftest import CASES

ROWS = [
    (
        "main-captions",
        "MSRvid",
        "2012test",
        "0001",
        "5.000",
        "A man is playing a flute.",
        "A man plays a flute.",
    ),
    ("main-captions", "MSRvid", "2012test", "0002", "0.500", "A cat sleeps.", "The stock market fell."),
    ("main-news", "x", "2013", "0003", "3.200", 'He said "no" twice.', "He refused twice.", "extra note"),
    ("main-news", "x", "2013", "0004", "2.000", "Dogs bark at night.", "A dog barked loudly."),
]


def write_sts(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(prunable.resolve_source(prunable.MINILM)))


def test_read_sts_keeps_quotes_and_ignores_extra_columns(tmp_path: Path) -> None:
    pairs = read_sts(write_sts(tmp_path / "s.tsv", ROWS))
    assert pairs.first[2] == 'He said "no" twice.'  # QUOTE_NONE: quotes are text
    assert pairs.scores.tolist() == pytest.approx([5.0, 0.5, 3.2, 2.0])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a", "b", "c", "d", "five", "x", "y")], r"s.tsv:1: score 'five' is not a number"),
        ([ROWS[0], ("a", "b", "c", "d", "7.0", "x", "y")], r"s.tsv:2: score 7.0 outside \[0, 5\]"),
        ([("a", "b", "c", "1.0", "x")], r"s.tsv:1: 5 columns, expected at least 7"),
    ],
)
def test_malformed_sts_names_line_and_format(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        read_sts(write_sts(tmp_path / "s.tsv", rows))
    assert "tab-separated" in str(err.value) or "outside" in str(err.value)


def test_missing_sts_file(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"STS file .*nope.tsv does not exist; expected tab-separated"
    ):
        read_sts(tmp_path / "nope.tsv")


def test_sts_task_batches_and_metric(tmp_path: Path, tokenizer, minilm: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    path = write_sts(tmp_path / "s.tsv", ROWS)
    held_out = write_sts(tmp_path / "dev.tsv", ROWS[::-1])  # the same pairs in another order: another file
    task = STSTask(
        train_path=path, eval_path=held_out, tokenizer=tokenizer, calibration_samples=3, batch_size=2
    )
    calib = task.calibration(minilm)
    assert calib.n_samples == 3 and [b.n_samples for b in calib.batches] == [2, 1]
    assert calib.batches[0].sample_of_row.tolist() == [0, 1, 0, 1]  # [first sentences; second sentences]
    losses = calib.objective.losses(minilm, calib.batches[0])
    assert losses.shape == (2,) and bool((losses >= 0).all())
    # Gauss-Newton probe: sqrt(2) cos, so half its squared gradient is l''(cos)/2 (dcos)^2 = (dcos)^2.
    with torch.no_grad():
        cos = calib.objective.cosines(minilm, calib.batches[0])
        probe = calib.objective.curvature_losses(minilm, calib.batches[0], torch.Generator())
    targets = calib.batches[0].targets
    torch.testing.assert_close(probe, 2**0.5 * cos)
    torch.testing.assert_close(losses.detach(), (cos - targets).pow(2))
    # The loss slope is dL/dprobe, so loss gradients follow from probe gradients by the chain rule.
    p = probe.clone().requires_grad_(True)
    (p / 2**0.5 - targets).pow(2).sum().backward()
    torch.testing.assert_close(calib.objective.loss_slope(probe, calib.batches[0]), p.grad)
    rho = task.evaluate(minilm)
    assert -100.0 <= rho <= 100.0 and rho > 0  # the pretrained model ranks these pairs sensibly
    with pytest.raises(ValueError, match="calibration_samples must be >= 1, got 0"):
        STSTask(train_path=path, eval_path=held_out, tokenizer=tokenizer, calibration_samples=0)


def test_sts_on_shared_dev_reproduces_the_reference(
    stsb_dir: Path, tokenizer, minilm: torch.nn.Module
) -> None:  # type: ignore[no-untyped-def]
    task = STSTask(
        train_path=stsb_dir / "sts-train.csv", eval_path=stsb_dir / "sts-dev.csv", tokenizer=tokenizer
    )
    assert task.evaluate(minilm) == pytest.approx(86.7, abs=0.1)  # shared/data/README.md


def test_fidelity_on_python_docs(tokenizer, minilm: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    assert len(pydoc_passages()) > 500
    task = FidelityTask(tokenizer=tokenizer, calibration_samples=8, eval_samples=8)
    assert not set(task.calib_texts) & set(task.eval_texts)
    with pytest.raises(RuntimeError, match="needs prepare"):
        task.evaluate(minilm)
    task.prepare(minilm)
    assert task.evaluate(minilm) == pytest.approx(100.0, abs=1e-3)
    calib = task.calibration(minilm)
    assert isinstance(calib.objective, hessian.OutputDistance)
    with pytest.raises(ValueError, match="asked for 5000 \\+ 5000 passages"):
        FidelityTask(tokenizer=tokenizer, calibration_samples=5000, eval_samples=5000)


def test_fidelity_text_file_errors(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match=r"text file .*missing\.txt does not exist"):
        FidelityTask(tokenizer=tokenizer, text_path=tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("only one paragraph")
    with pytest.raises(ValueError, match=r"found 1 paragraph\(s\); need at least 2"):
        FidelityTask(tokenizer=tokenizer, text_path=tmp_path / "one.txt")


def test_classification_recipe_trains_a_real_vit(tmp_path: Path) -> None:
    x_train, _, x_test, _ = digits_split(0)
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    path = train_vit_digits(tmp_path / "vit", epochs=12)
    model = prunable.load_model(str(path), "ViTForImageClassification")
    task = ClassificationTask(calibration_samples=64)
    accuracy = task.evaluate(model)
    assert accuracy > 60.0  # far above chance (10 %) after a few epochs on real digits
    scores = hessian.NViTSaliency().score(model, task.calibration(model))
    assert len(scores.attention) == 4
    built = build_task(
        TaskConfig(
            name="classification",
            tokenizer="none",
            build={"_target_": "hwprune.search.tasks.ClassificationTask", "calibration_samples": 8},
        ),
        str(path),
    )
    assert isinstance(built, ClassificationTask)


def test_lm_perplexity_with_byte_level_ids(tmp_path: Path) -> None:
    model = CASES["gpt2"].build()  # vocab 120 < 256: give it a byte vocabulary
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=256)
    ).eval()
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small text for a language model. " * 40)
    task = LMTask(
        tokenizer=None, text_path=text, block_size=32, calibration_blocks=4, eval_blocks=4, batch_size=2
    )
    ppl = task.evaluate(model)
    assert math.isfinite(ppl) and 50 < ppl < 1000  # untrained: about the vocabulary size
    calib = task.calibration(model)
    assert calib.objective.losses(model, calib.batches[0]).shape == (2,)
    with pytest.raises(ValueError, match="need 4 \\+ 400"):
        LMTask(tokenizer=None, text_path=text, block_size=32, calibration_blocks=4, eval_blocks=400)


def test_required_tokenizer_missing_is_a_clear_error(tmp_path: Path) -> None:
    path = train_vit_digits(tmp_path / "vit", epochs=1)
    cfg = TaskConfig(
        name="fidelity", tokenizer="required", build={"_target_": "hwprune.search.tasks.FidelityTask"}
    )
    with pytest.raises(ValueError, match="task 'fidelity' needs a tokenizer"):
        build_task(cfg, str(path))
    with pytest.raises(ValueError, match=r"task.tokenizer 'maybe' invalid; valid choices: \['required'"):
        TaskConfig(name="x", tokenizer="maybe", build={})


def _rows(batch: hessian.Batch) -> set[tuple]:
    """Each row of a batch as a hashable value: unpadded token ids, or the image's bytes."""
    if "pixel_values" in batch.inputs:
        return {tuple(x.flatten().tolist()) for x in batch.inputs["pixel_values"]}
    ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    return {
        tuple(r[m.bool()].tolist()) if mask is not None else tuple(r.tolist())
        for r, m in zip(ids, mask if mask is not None else ids, strict=True)
    }


def _task_cases(tmp_path: Path, tokenizer) -> list[tuple]:  # type: ignore[no-untyped-def]
    """(task, model, rows the metric is measured on) for every task, small."""
    train = write_sts(tmp_path / "train.tsv", ROWS)
    dev_rows = [
        ("g", "f", "y", "8", "1.0", "Birds fly south.", "Geese migrate in winter."),
        ("g", "f", "y", "9", "4.5", "The sun is hot.", "The sun is very hot."),
        ("g", "f", "y", "10", "0.2", "Trains run late.", "Cheese is made of milk."),
    ]
    sts = STSTask(
        train_path=train,
        eval_path=write_sts(tmp_path / "dev.tsv", dev_rows),
        tokenizer=tokenizer,
        calibration_samples=3,
        batch_size=2,
    )
    sts_eval = {tuple(tokenizer(row[c])["input_ids"]) for row in dev_rows for c in (5, 6)}
    fidelity = FidelityTask(tokenizer=tokenizer, calibration_samples=8, eval_samples=8)
    fidelity_eval = {
        tuple(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in fidelity.eval_texts
    }
    text = tmp_path / "lm.txt"
    text.write_text("".join(f"line {i} of a small text for a language model.\n" for i in range(120)))
    lm = LMTask(
        tokenizer=None, text_path=text, block_size=32, calibration_blocks=4, eval_blocks=4, batch_size=2
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=256)
    ).eval()
    lm_eval = {tuple(r.tolist()) for r in lm.eval_set}
    digits = ClassificationTask(calibration_samples=16)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=10,
        )
    ).eval()
    digits_eval = {tuple(x.flatten().tolist()) for x in digits.test[0]}
    minilm = prunable.load_model(prunable.MINILM, "BertModel")
    return [
        ("sts", sts, minilm, sts_eval),
        ("fidelity", fidelity, minilm, fidelity_eval),
        ("lm", lm, gpt2, lm_eval),
        ("classification", digits, vit, digits_eval),
    ]


def test_task_conformance(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Every task: calibration with per-sample losses, a deterministic finite metric, and recovery
    data that runs through the model, is seeded, and never contains what the metric is measured on."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "task"
    for name, task, model, eval_rows in _task_cases(tmp_path, tokenizer):
        assert (conf / f"{task.name}.yaml").is_file(), (
            f"{name}: task.name {task.name!r} is no conf/task option"
        )
        task.prepare(model)
        calib = task.calibration(model)
        assert calib.batches, name
        losses = (
            calib.objective.losses(model, calib.batches[0])
            if not isinstance(calib.objective, hessian.OutputDistance)
            else None
        )
        assert losses is None or (
            losses.shape == (calib.batches[0].n_samples,) and torch.isfinite(losses).all()
        ), name
        metric = task.evaluate(model)
        assert math.isfinite(metric) and task.evaluate(model) == metric, name
        data = task.recovery_data(samples=6, seed=1)
        assert data.batches and sum(b.n_samples for b in data.batches) <= 6, name
        with torch.no_grad():
            model(**data.batches[0].inputs)
        recovery_rows = set().union(*(_rows(b) for b in data.batches))
        assert recovery_rows and not recovery_rows & eval_rows, (
            f"{name}: recovery data overlaps the evaluation data"
        )
        again = task.recovery_data(samples=6, seed=1)
        assert _rows(again.batches[0]) == _rows(data.batches[0]), f"{name}: recovery data is not seeded"
        if data.objective is not None and data.batches[0].targets is not None:
            assert torch.isfinite(data.objective.losses(model, data.batches[0])).all(), name


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_a_model_directory_without_tokenizer_files_gets_byte_level_ids(name: str, tmp_path: Path) -> None:
    """transformers builds an empty tokenizer for such a directory; the task must not use it."""
    model = CASES[name].build()
    model.resize_token_embeddings(256)
    model.save_pretrained(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("a text for a language model, long enough for a few blocks. " * 20)
    cfg = TaskConfig(
        name="lm",
        tokenizer="optional",
        build={
            "_target_": "hwprune.search.tasks.LMTask",
            "text_path": str(text),
            "block_size": 16,
            "calibration_blocks": 2,
            "eval_blocks": 2,
        },
    )
    task = build_task(cfg, str(tmp_path))
    assert isinstance(task, LMTask)
    first = task.calibration(model).batches[0].inputs["input_ids"][0]
    assert first.tolist() == list(b"a text for a lan")  # bytes, not an empty tokenizer's nothing
