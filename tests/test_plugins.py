"""A plug-in is one class plus its YAML: defining the class registers it, its constructor is its
config schema (defaults written once), and the apps offer it with nothing else to edit."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hydra.utils import instantiate

from hwprune import hessian
from hwprune.search import tasks
from hwprune.search.config import compose, to_object


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[tuple[ModuleType, str]]:
    """The user's plug-in module, imported now, and a config directory for their YAML files."""
    sys.modules.pop("tests._plugins", None)
    module = importlib.import_module("tests._plugins")  # defining the classes registers them
    for group in ("saliency", "task"):
        (tmp_path / group).mkdir()
    yield module, f"hydra.searchpath=[file://{tmp_path}]"
    hessian.SALIENCY.discard("weight_count")  # the other tests see the shipped plug-ins only
    tasks.TASKS.discard("countdown")
    sys.modules.pop("tests._plugins", None)


def write(search_path: str, relative: str, text: str) -> None:
    root = Path(search_path.removeprefix("hydra.searchpath=[file://").removesuffix("]"))
    (root / relative).write_text(text)


def test_a_saliency_method_is_its_class_and_a_yaml_file(plugins: tuple[ModuleType, str]) -> None:
    module, search_path = plugins
    assert hessian.SALIENCY["weight_count"] is module.WeightCount
    assert "weight_count" in hessian.SALIENCY.names()
    write(
        search_path,
        "saliency/weight_count.yaml",
        "defaults:\n  - schema_weight_count\n  - _self_\nname: weight_count\n",
    )
    cfg = to_object(compose("config", [search_path, "saliency=weight_count", "saliency.method.scale=2.5"]))
    method = instantiate(cfg.saliency.method)  # type: ignore[attr-defined]
    assert isinstance(method, module.WeightCount) and method.scale == 2.5 and method.per_layer is False
    with pytest.raises(Exception, match="scael"):  # its schema is its constructor: typos fail
        compose("config", [search_path, "saliency=weight_count", "saliency.method.scael=2"])
    with pytest.raises(Exception, match="scale"):  # and so do wrong types
        to_object(compose("config", [search_path, "saliency=weight_count", "saliency.method.scale=big"]))


def test_a_task_is_its_class_and_a_yaml_file(plugins: tuple[ModuleType, str]) -> None:
    module, search_path = plugins
    write(
        search_path,
        "task/countdown.yaml",
        "defaults:\n  - schema\n  - build: countdown\n  - _self_\nname: countdown\ntokenizer: none\n",
    )
    cfg = to_object(compose("config", [search_path, "task=countdown", "task.build.start=3"]))
    task = instantiate(cfg.task.build)  # type: ignore[attr-defined]
    assert isinstance(task, module.Countdown) and task.evaluate(None) == 3.0
    assert tasks.higher_is_better("countdown_error") is False  # its direction, from the class alone


def test_shipped_option_files_repeat_no_constructor_default() -> None:
    """Defaults are written once, in the constructor: an option file sets only what differs."""
    import yaml

    from hwprune.search._options import option_schemas

    conf = Path(__file__).resolve().parents[1] / "conf"
    for group, key in (("saliency", "method"), ("recovery", "method"), ("search", "sampler")):
        for name, schema in option_schemas()[group].items():
            path = conf / group / f"{name}.yaml"
            assert path.is_file(), f"{group}={name} has a schema but no {path}"
            values = (yaml.safe_load(path.read_text()) or {}).get(key) or {}
            defaults = schema()
            repeated = [k for k, v in values.items() if not isinstance(v, str) and getattr(defaults, k) == v]
            assert not repeated, f"{path} repeats the constructor's defaults of {repeated}"
