"""Plan files: round trip, readable layout, and schema errors that name the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hwprune import prunable
from tests.conftest import CASES
from tests.test_surgery import random_plan


@pytest.fixture
def plan() -> prunable.PrunePlan:
    model = CASES["llama_gqa"].build()
    p = random_plan(model, 5)
    return prunable.PrunePlan(
        model=p.model, layers=p.layers, hardware="gpu_h100", metadata={"latency_ms": 1.5}
    )


def test_round_trip(plan: prunable.PrunePlan, tmp_path: Path) -> None:
    path = plan.save(tmp_path / "sub" / "plan.yaml")
    loaded = prunable.PrunePlan.load(path)
    assert loaded == plan
    text = path.read_text()
    assert text.startswith("# hwprune pruning plan")
    assert "version: 1" in text and "hardware: gpu_h100" in text
    # One line per index list keeps the plan readable as a table of layers.
    assert "- heads: [" in text and "  mlp: [" in text


def test_json_is_accepted(plan: prunable.PrunePlan, tmp_path: Path) -> None:
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    assert prunable.PrunePlan.load(path) == plan


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=7), r"unknown plan format version 7; supported versions: \[1\]"),
        (lambda d: d.update(format="other"), r"format is 'other', expected 'hwprune.plan'"),
        (lambda d: d["model"].pop("structure_fingerprint"), r"model.structure_fingerprint must be a string"),
        (lambda d: d.update(layers=[]), r"'layers' must be a non-empty list"),
        (lambda d: d["layers"][1].update(mlp=[1, "x"]), r"layers\[1\].mlp must be a list of integers"),
        (
            lambda d: d["layers"][0].update(experts=[0]),
            r"layers\[0\] must have exactly the keys 'heads' and 'mlp'",
        ),
        (lambda d: d.update(metadata=[1]), r"metadata must be a mapping"),
    ],
)
def test_schema_errors_name_file_and_field(
    plan: prunable.PrunePlan, tmp_path: Path, edit, message: str
) -> None:  # type: ignore[no-untyped-def]
    data = plan.to_dict()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(prunable.PlanError, match=message) as err:
        prunable.PrunePlan.load(path)
    assert str(path) in str(err.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(prunable.PlanError, match="does not exist"):
        prunable.PrunePlan.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [unclosed\n")
    with pytest.raises(prunable.PlanError, match="not valid YAML"):
        prunable.PrunePlan.load(bad)


def test_layer_count_mismatch(plan: prunable.PrunePlan) -> None:
    structure = prunable.discover(CASES["llama_gqa"].build())
    short = prunable.PrunePlan(model=plan.model, layers=plan.layers[:2])
    with pytest.raises(prunable.PlanError, match="plan has 2 layers, the model has 3"):
        short.check(structure)


def test_from_units_expands_groups_to_query_heads() -> None:
    structure = prunable.discover(CASES["llama_gqa"].build())
    ref = prunable.ModelRef(class_name="LlamaModel", structure_fingerprint=structure.fingerprint())
    plan = prunable.PrunePlan.from_units(structure, ref, attention=[[1], [], [0, 1]], mlp=[[3, 1], [], [0]])
    assert plan.layers[0].heads == (4, 5, 6, 7)
    assert plan.layers[0].mlp == (1, 3)
    assert plan.kept_counts() == [(4, 2), (0, 0), (8, 1)]
    assert [u.tolist() for u, _ in plan.kept_units(structure)] == [[1], [], [0, 1]]
    with pytest.raises(prunable.PlanError, match="need one entry per layer"):
        prunable.PrunePlan.from_units(structure, ref, attention=[[0]], mlp=[[0]])
