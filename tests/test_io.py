"""Pruned model directories: reload with identical outputs; AutoModel where the config can say it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from hwprune import prunable
from tests.conftest import CASES, Case, run
from tests.test_surgery import random_plan


def test_save_and_reload_non_uniform(case: Case, tmp_path: Path) -> None:
    model = case.build()
    plan = random_plan(model, 7, empty_layer=0)
    prunable.apply_plan(model, plan)
    expected = run(case, model)
    prunable.save_pruned(model, plan, tmp_path)
    assert {"model.safetensors", "config.json", "hwprune_plan.yaml", "hwprune.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    manifest = json.loads((tmp_path / "hwprune.json").read_text())
    assert manifest["config_expresses_shape"] is False  # an empty layer is never expressible
    reloaded = prunable.load_pruned(tmp_path)
    assert type(reloaded) is type(model)
    torch.testing.assert_close(run(case, reloaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "heads", "expressible"),
    [
        ("llama_gqa", [1], True),
        ("qwen2", [0], True),
        ("qwen3", [1], True),
        ("gemma", [0], True),
        ("gemma2", [1], True),
        ("gemma3_text", [0], True),
        ("granite", [1], True),
        ("olmo", [0], True),
        ("phi3", [1], True),
        ("stablelm", [1], False),  # its head width is hidden / heads: a config cannot say 1 group of 4 heads
        ("vit", [0, 3], True),
        ("deit", [1, 2], True),
        ("bert", [0, 1, 2, 3], True),
        ("gpt2", [0, 1, 2, 3], True),
        ("bert", [0, 1], False),
        ("distilbert", [0, 1, 2, 3], True),
        ("distilbert", [1], False),
        ("modernbert", [0, 1, 2, 3], True),
        ("modernbert", [2], False),
        ("gpt2", [2], False),
    ],
)
def test_uniform_plans_load_with_automodel(
    name: str, heads: list[int], expressible: bool, tmp_path: Path
) -> None:
    case = CASES[name]
    model = case.build()
    structure = prunable.discover(model)
    n = structure.layers[0].mlp_width
    plan = prunable.PrunePlan.from_units(
        structure, prunable.model_ref(model), attention=[heads] * 3, mlp=[list(range(1, n, 3))] * 3
    )
    prunable.apply_plan(model, plan)
    expected = run(case, model)
    prunable.save_pruned(model, plan, tmp_path)
    assert json.loads((tmp_path / "hwprune.json").read_text())["config_expresses_shape"] is expressible
    torch.testing.assert_close(run(case, prunable.load_pruned(tmp_path)), expected, rtol=0, atol=0)
    cls = getattr(transformers, type(model).__name__)
    if expressible:
        auto = cls.from_pretrained(str(tmp_path)).eval()
        torch.testing.assert_close(run(case, auto), expected, rtol=0, atol=1e-6)
    else:
        with pytest.raises((RuntimeError, ValueError), match=r"(?i)size"):
            cls.from_pretrained(str(tmp_path))


def test_load_pruned_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no hwprune\.json"):
        prunable.load_pruned(tmp_path)
    (tmp_path / "hwprune.json").write_text(json.dumps({"format": "x", "version": 1}))
    with pytest.raises(ValueError, match="unknown format 'x'"):
        prunable.load_pruned(tmp_path)


def test_unknown_sources_fail_without_downloading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither a bundled model \['bundled:all-MiniLM-L6-v2'\]"):
        prunable.resolve_source("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="'NotAModel' is not a class exported by transformers"):
        prunable.load_model(prunable.MINILM, "NotAModel")


def test_minilm_prune_save_reload(minilm: torch.nn.Module, tmp_path: Path) -> None:
    import copy

    model = copy.deepcopy(minilm)
    structure = prunable.discover(model)
    ref = prunable.model_ref(model, source=prunable.MINILM)
    gen = torch.Generator().manual_seed(0)
    heads = [torch.randperm(12, generator=gen)[: 12 - i].tolist() for i in range(6)]
    mlp = [torch.randperm(1536, generator=gen)[: 1536 - 200 * i].tolist() for i in range(6)]
    plan = prunable.PrunePlan.from_units(structure, ref, attention=heads, mlp=mlp, hardware="cpu_local")
    ids = torch.randint(1000, 5000, (2, 16), generator=gen)
    with prunable.gated(model) as gates, torch.no_grad():
        gates.keep_only(plan)
        gated = model(input_ids=ids).last_hidden_state
    prunable.apply_plan(model, plan)
    with torch.no_grad():
        pruned = model(input_ids=ids).last_hidden_state
    assert (pruned - gated).abs().max().item() <= 1e-4
    prunable.save_pruned(model, plan, tmp_path)
    plan_back = prunable.PrunePlan.load(tmp_path / "hwprune_plan.yaml")
    assert plan_back.model.source == prunable.MINILM and plan_back.hardware == "cpu_local"
    with torch.no_grad():
        again = prunable.load_pruned(tmp_path)(input_ids=ids).last_hidden_state
    assert torch.equal(again, pruned)


def test_random_source_builds_the_same_random_model_from_a_config(tmp_path: Path) -> None:
    import json

    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "vocab_size": 64,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    a = prunable.load_model(f"random:{path}", "LlamaForCausalLM")
    b = prunable.load_model(f"random:{path}", "LlamaForCausalLM")
    assert prunable.discover(a).layers[0].num_kv_heads == 2 and not a.training
    assert prunable.weights_fingerprint(a) == prunable.weights_fingerprint(b)  # seeded: one model per config
    with pytest.raises(FileNotFoundError, match=r"random:.*missing\.json': no config file"):
        prunable.load_model(f"random:{tmp_path / 'missing.json'}", "LlamaForCausalLM")


def test_a_head_checkpoint_loads_with_one_line_naming_its_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=2)
    transformers.DistilBertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    capfd.readouterr()
    with caplog.at_level("INFO", logger="hwprune.prunable._io"):
        base = prunable.load_model(str(tmp_path / "mlm"))
    assert type(base).__name__ == "DistilBertModel"
    lines = [r.getMessage() for r in caplog.records if r.name == "hwprune.prunable._io"]
    assert len(lines) == 1 and "5 checkpoint weights unused (vocab_layer_norm.bias" in lines[0]
    assert lines[0].endswith(
        "the checkpoint is a DistilBertForMaskedLM: model.class_name=DistilBertForMaskedLM loads it whole"
    )
    assert "LOAD REPORT" not in "".join(
        capfd.readouterr()
    )  # transformers' own many-line table is not printed
    caplog.clear()
    with caplog.at_level("INFO", logger="hwprune.prunable._io"):
        whole = prunable.load_model(str(tmp_path / "mlm"), "DistilBertForMaskedLM")
    assert type(whole).__name__ == "DistilBertForMaskedLM" and not caplog.records  # nothing unused


def test_the_weights_fingerprint_is_hashed_once_until_a_weight_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    model = CASES["bert"].build()
    calls = [0]
    real = hashlib.sha256

    def counting(*args: object) -> object:
        calls[0] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "sha256", counting)
    first = prunable.weights_fingerprint(model)
    assert prunable.weights_fingerprint(model) == first and calls[0] == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # in place: the version counter moves
    changed = prunable.weights_fingerprint(model)
    assert changed != first and calls[0] == 2
    prunable.apply_plan(model, random_plan(model, 3), check_weights=False)  # replaced tensors
    calls[0] = 0  # (structure fingerprints hash too)
    assert prunable.weights_fingerprint(model) != changed and calls[0] == 1
