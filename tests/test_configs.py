"""Hydra configs: every profile composes and validates; typos, bad types and unknown names fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from hwprune.search.config import compose as compose_config
from hwprune.search.config import load_hardware, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
PROFILES = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))


def compose_profile_app(*overrides: str):  # type: ignore[no-untyped-def]
    return compose_config("profile", list(overrides))


load_profile = load_hardware


def test_all_required_profiles_exist() -> None:
    required = {
        "gpu_h100",
        "gpu_a100",
        "gpu_l4",
        "gpu_t4",
        "jetson_orin",
        "tpu_v4",
        "tpu_v5e",
        "tpu_v6e",
        "npu_hexagon",
        "npu_intel",
        "edge_tpu",
        "cpu_local",
    }
    assert required <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_composes_and_validates(name: str) -> None:
    from hwprune.cost_models import HardwareProfile

    composed = OmegaConf.to_object(compose_profile_app(f"hardware={name}").hardware)
    assert isinstance(composed, HardwareProfile)
    profile = load_profile(name)
    assert profile == composed.validate()  # cost_models' own loader reads what Hydra composes
    assert profile.name == name
    assert profile.sources, f"{name} names no datasheet"
    assert profile.dtypes[0] in profile.peak_tflops


def test_unknown_profile_lists_the_choices() -> None:
    with pytest.raises(
        ConfigCompositionException, match=r"(?s)Could not find 'hardware/gpu_h1000'.*gpu_h100"
    ):
        compose_profile_app("hardware=gpu_h1000")


def test_wrong_type_fails_at_compose() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_profile_app("hardware.compute_units=many")
    assert isinstance(err.value.__cause__, ValidationError)
    assert "many" in str(err.value.__cause__)


def test_misspelt_key_fails_at_compose(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'hardware.peak_tflop'"):
        compose_profile_app("hardware.peak_tflop=3")
    # A typo inside a profile file fails the same way.
    text = (CONF / "hardware" / "gpu_t4.yaml").read_text().replace("peak_tflops:", "peak_tflop:")
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "typo.yaml").write_text(text)
    register_configs()
    from hydra import initialize_config_dir

    with (
        initialize_config_dir(str(tmp_path), version_base=None),
        pytest.raises(ConfigCompositionException, match="Key 'peak_tflop' not in 'HardwareProfile'"),
    ):
        compose(config_name="hardware/typo")


def test_missing_field_fails_when_built(tmp_path: Path) -> None:
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "half.yaml").write_text(
        "defaults:\n  - schema\n  - _self_\nname: half\nkind: gpu\n"
    )
    register_configs()
    from hydra import initialize_config_dir

    with initialize_config_dir(str(tmp_path), version_base=None):
        cfg = compose(config_name="hardware/half")
    with pytest.raises(MissingMandatoryValue, match="peak_tflops"):
        OmegaConf.to_object(cfg)


def test_invalid_values_name_the_choices() -> None:
    profile = load_profile("gpu_h100")
    profile.kind = "fpga"
    with pytest.raises(
        ValueError, match=r"unknown kind 'fpga'; valid choices: \['gpu', 'tpu', 'npu', 'cpu'\]"
    ):
        profile.validate()
    profile = load_profile("gpu_h100")
    profile.dtypes = ["fp64"]
    with pytest.raises(ValueError, match=r"dtypes \['fp64'\] invalid"):
        profile.validate()
    profile = load_profile("gpu_h100")
    profile.table_fit = "spline"
    with pytest.raises(
        ValueError, match=r"unknown table_fit 'spline'; valid choices: \['additive', 'grid'\]"
    ):
        profile.validate()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "search").glob("*.yaml")))
def test_search_options_build_their_samplers(option: str) -> None:
    import optuna
    from hydra.utils import instantiate

    cfg = compose_config("config", [f"search={option}", "search.seed=7"])
    sampler = instantiate(cfg.search.sampler)
    assert isinstance(sampler, optuna.samplers.BaseSampler)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "saliency").glob("*.yaml")))
def test_saliency_options_build_their_methods(option: str) -> None:
    from hydra.utils import instantiate

    from hwprune import hessian

    cfg = compose_config("config", [f"saliency={option}"])
    method = instantiate(cfg.saliency.method)
    assert isinstance(method, hessian.Saliency) and method.name == option


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "task").glob("*.yaml")))
def test_task_options_compose(option: str) -> None:
    from hwprune.search.config import AppConfig

    overrides = [f"task={option}"]
    if option == "sts":
        overrides += ["task.build.train_path=a.tsv", "task.build.eval_path=b.tsv"]
    app = OmegaConf.to_object(compose_config("config", overrides))
    assert isinstance(app, AppConfig) and app.task.name == option


def test_sts_without_paths_fails_before_any_work() -> None:
    with pytest.raises(MissingMandatoryValue, match="train_path"):
        OmegaConf.to_object(compose_config("config", ["task=sts"]))


def test_unknown_task_option_lists_the_choices() -> None:
    with pytest.raises(ConfigCompositionException, match=r"(?s)Could not find 'task/stsb'.*fidelity"):
        compose_config("config", ["task=stsb"])


def test_default_search_is_pareto_local_search() -> None:
    from hydra.utils import instantiate

    from hwprune.search import ParetoLocalSearchSampler

    cfg = compose_config("config", [])
    assert isinstance(instantiate(cfg.search.sampler), ParetoLocalSearchSampler)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+saliency.method.frist_order=true",
            r"unknown key 'saliency.method.frist_order' \(NViTSaliencyConfig\)",
        ),
        ("+search.sampler.seeed=3", r"unknown key 'search.sampler.seeed' \(ParetoLocalSearchSamplerConfig\)"),
        ("+recovery.method.stesp=5", r"unknown key 'recovery.method.stesp' \(ReconstructConfig\)"),
        ("+search.n_trails=5", r"unknown key 'search.n_trails' \(SearchConfig\); valid keys: \[.*'n_trials'"),
    ],
)
def test_appended_typos_fail_before_any_work(override: str, message: str) -> None:
    """Hydra's `+key=` appends even to a typed node; to_object must refuse rather than drop it."""
    from hwprune.search.config import to_object

    cfg = compose_config("config", [override])
    with pytest.raises(ValueError, match=message):
        to_object(cfg)


@pytest.mark.parametrize(
    "override",
    ["saliency.method.seed=abc", "saliency.method.first_order=maybe", "recovery.method.steps=many"],
)
def test_typed_method_settings_reject_wrong_types_at_compose(override: str) -> None:
    base = ["recovery=distill"] if override.startswith("recovery") else []
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("config", [*base, override])
    assert isinstance(err.value.__cause__, ValidationError)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "recovery").glob("*.yaml")))
def test_recovery_options_build_their_methods(option: str) -> None:
    from hydra.utils import instantiate

    from hwprune.search.config import to_object
    from hwprune.search.recovery import Recovery

    app = to_object(compose_config("config", [f"recovery={option}"]))
    method = instantiate(app.recovery.method)  # type: ignore[attr-defined]
    assert isinstance(method, Recovery) and method.name == option


def test_apply_takes_the_plans_settings_unless_told_otherwise() -> None:
    from hwprune.search.config import ApplyConfig, to_object

    plain = to_object(compose_config("apply", ["plan=p.yaml", "out=o"]))
    assert isinstance(plain, ApplyConfig) and plain.recovery is None  # None: the plan's recipe
    assert all(v is None for v in vars(plain.workload).values())  # None: the plan's workload
    told = to_object(
        compose_config(
            "apply",
            ["plan=p.yaml", "out=o", "recovery=distill", "recovery.method.steps=7", "workload.batch_size=4"],
        )
    )
    assert isinstance(told, ApplyConfig) and told.recovery is not None
    assert told.recovery.method.steps == 7 and told.workload.batch_size == 4 and told.workload.seq_len is None
    with pytest.raises(ValueError, match=r"unknown key 'overwrit' \(ApplyConfig\)"):
        to_object(compose_config("apply", ["plan=p.yaml", "out=o", "+overwrit=true"]))


def test_cost_models_loads_its_own_profiles(tmp_path: Path) -> None:
    from hwprune import cost_models

    assert cost_models.profile_names() == PROFILES
    with pytest.raises(
        ValueError, match=r"unknown hardware profile 'gpu_h1000'; valid choices: \[.*'gpu_h100'"
    ):
        cost_models.load_profile("gpu_h1000")
    typo = tmp_path / "typo.yaml"
    typo.write_text((CONF / "hardware" / "gpu_t4.yaml").read_text().replace("peak_tflops:", "peak_tflop:"))
    with pytest.raises(ValueError, match=r"unknown key 'peak_tflop'; valid keys"):
        cost_models.load_profile(str(typo))
