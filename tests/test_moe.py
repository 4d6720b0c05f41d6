"""Mixture-of-experts layers: routed experts and their neurons as units, checked before any change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from hwprune import hessian, prunable
from hwprune.search import block_spec
from tests.conftest import CASES, run
from tests.test_saliency import calibration

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def uniform_plan(model: torch.nn.Module, *, experts: list[int], width: int) -> prunable.PrunePlan:
    structure = prunable.discover(model)
    return prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(model),
        attention=[range(la.attention_units) for la in structure.layers],
        mlp=[range(la.mlp_width // 2) for la in structure.layers],
        experts=[experts] * structure.num_layers,
        expert_mlp=[[range(width)] * len(experts)] * structure.num_layers,
    )


@pytest.mark.parametrize("name", MOE)
def test_discovery_reads_experts_from_the_modules(name: str) -> None:
    structure = prunable.discover(CASES[name].build())
    for layer in structure.layers:
        assert (layer.num_experts, layer.top_k, layer.is_moe) == (4, 2, True)
        assert layer.expert_width == (48 if name == "mixtral" else 32)
    assert "4 experts (top-2)" in structure.describe()


def test_dense_models_hash_as_before_experts_were_described(minilm: torch.nn.Module) -> None:
    # The fingerprint every committed plan for the bundled MiniLM records.
    assert prunable.discover(minilm).fingerprint() == "05ff327550b1b147"
    moe = prunable.discover(CASES["mixtral"].build())
    fewer = prunable.Structure(
        **{**moe.to_dict(), "layers": tuple(replace(la, num_experts=3) for la in moe.layers)}
    )
    assert fewer.fingerprint() != moe.fingerprint()  # expert counts are part of an MoE model's hash


@pytest.mark.parametrize("name", MOE)
def test_uniform_expert_plans_reload_with_from_pretrained(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = case.build()
    plan = uniform_plan(model, experts=[0, 2, 3], width=16)
    prunable.apply_plan(model, plan)
    after = prunable.discover(model)
    assert {(la.num_experts, la.expert_width) for la in after.layers} == {(3, 16)}
    expected = run(case, model)
    prunable.save_pruned(model, plan, tmp_path)
    assert json.loads((tmp_path / "hwprune.json").read_text())["config_expresses_shape"] is True
    auto = getattr(transformers, type(model).__name__).from_pretrained(str(tmp_path)).eval()
    assert prunable.discover(auto) == after
    torch.testing.assert_close(run(case, auto), expected, rtol=1e-4, atol=1e-5)  # its own expert kernels
    torch.testing.assert_close(run(case, prunable.load_pruned(tmp_path)), expected, rtol=1e-4, atol=1e-5)


def test_plans_name_what_breaks_routing_before_any_change(tmp_path: Path) -> None:
    model = CASES["mixtral"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (
            dict(experts=[1], width=48),
            r"layer 0: keeps 1 experts, fewer than the 2 each token is routed to \(top_k\)",
        ),
        (
            dict(experts=[0, 1], width=12),
            r"experts keep 12 neurons; a pruned expert width must be a multiple of 8",
        ),
        (dict(experts=[0, 7], width=48), r"experts \[7\] out of range \[0, 4\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(prunable.PlanError, match=message):
            prunable.apply_plan(model, uniform_plan(model, **kwargs))  # type: ignore[arg-type]
    plan = uniform_plan(model, experts=[0, 1], width=16)
    layers = list(plan.layers)
    layers[1] = prunable.LayerPlan(
        heads=layers[1].heads, mlp=(), experts=(0, 1), expert_mlp=((0,) * 8, tuple(range(16)))
    )
    with pytest.raises(prunable.PlanError, match=r"layer 1: every kept expert must keep the same number"):
        prunable.apply_plan(model, prunable.PrunePlan(model=plan.model, layers=tuple(layers)))
    layers[1] = prunable.LayerPlan(heads=layers[1].heads, mlp=())
    with pytest.raises(prunable.PlanError, match=r"layer 1: a mixture-of-experts layer \(4 experts\) needs"):
        prunable.apply_plan(model, prunable.PrunePlan(model=plan.model, layers=tuple(layers)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dense = CASES["llama_gqa"].build()
    structure = prunable.discover(dense)
    bad = prunable.PrunePlan.dense(structure, prunable.model_ref(dense))
    layers = [
        prunable.LayerPlan(heads=lp.heads, mlp=lp.mlp, experts=(0,), expert_mlp=((0,),)) for lp in bad.layers
    ]
    with pytest.raises(prunable.PlanError, match="layer 0: keeps experts, but its MLP is dense"):
        prunable.PrunePlan(model=bad.model, layers=tuple(layers)).check(structure)


def test_moe_plan_files_round_trip(tmp_path: Path) -> None:
    model = CASES["qwen2_moe"].build()
    plan = uniform_plan(model, experts=[1, 3], width=8)
    text = plan.save(tmp_path / "plan.yaml").read_text()
    assert "experts: [1, 3]" in text and "expert_mlp:" in text
    assert prunable.PrunePlan.load(tmp_path / "plan.yaml") == plan
    data = plan.to_dict()
    del data["layers"][0]["expert_mlp"]
    with pytest.raises(prunable.PlanError, match=r"layers\[0\] must have exactly the keys"):
        prunable.PrunePlan.from_dict(data)


def test_removed_experts_are_never_routed_to_and_the_rest_renormalise() -> None:
    """Qwen2-MoE's router does not renormalise its top-k: pruning changes every token's softmax, which
    the masked model (routing restricted to the kept experts) reproduces exactly."""
    case = CASES["qwen2_moe"]
    model = case.build()
    assert model.config.norm_topk_prob is False
    plan = uniform_plan(model, experts=[0, 1], width=32)
    with prunable.gated(model) as gates:
        gates.keep_only(plan)
        masked = run(case, model)
        assert all(r is not None and r.tolist() == [True, True, False, False] for r in gates.routable)
    pruned = run(case, prunable.apply_plan(model, plan))
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)


def test_cost_models_read_the_experts_from_the_structure() -> None:
    spec = block_spec(prunable.discover(CASES["qwen2_moe"].build()))
    assert (spec.experts, spec.top_k, spec.expert_width, spec.mlp) == (4, 2, 32, 40)


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize(
    "method",
    [
        hessian.NViTSaliency(seed=1),
        hessian.HEAPrSaliency(seed=1),
        hessian.TaylorSaliency(),
        hessian.MagnitudeSaliency(),
        hessian.RandomSaliency(),
    ],
    ids=lambda m: m.name,
)
def test_expert_scores_conform(method: hessian.Saliency, name: str, tmp_path: Path) -> None:
    model, calib = calibration(name, supervised=True)
    scores = method.score(model, calib)
    structure = prunable.discover(model)
    for layer, experts, neurons in zip(structure.layers, scores.experts, scores.expert_mlp, strict=True):
        assert experts.shape == (layer.num_experts,) and neurons.shape == (
            layer.num_experts,
            layer.expert_width,
        )
        assert torch.isfinite(neurons).all() and (neurons != 0).any()
    again = hessian.UnitScores.load(scores.save(tmp_path / "scores.npz"))
    assert all(torch.equal(a, b) for a, b in zip(again.expert_mlp, scores.expert_mlp, strict=True))
    assert set(scores.to_frame().kind) == {"attention", "mlp", "experts", "expert_mlp"} - (
        {"mlp"} if structure.layers[0].mlp_width == 0 else set()
    )


def test_nvit_expert_scores_equal_brute_force_per_sample_fisher() -> None:
    """An expert's and an expert neuron's score is 1/2 mean over samples of (dL_s/dgate)^2, with
    dL_s/dgate = sum of g * w over what it owns of the down projection (its output)."""
    model, calib = calibration("mixtral", supervised=True, n_batches=1)
    scores = hessian.NViTSaliency().score(model, calib)
    batch = calib.batches[0]
    experts = [layer.mlp.experts for layer in model.model.layers]
    want_neurons = [torch.zeros_like(t) for t in scores.expert_mlp]
    want_experts = [torch.zeros_like(t) for t in scores.experts]
    for s in range(batch.n_samples):
        model.zero_grad()
        calib.objective.losses(model, batch.select([s])).sum().backward()
        for i, e in enumerate(experts):
            gw = (e.down_proj * e.down_proj.grad).double()  # (experts, hidden, width)
            want_neurons[i] += gw.sum(1).pow(2)
            want_experts[i] += gw.sum((1, 2)).pow(2)
    n = batch.n_samples
    for got, want in zip(scores.expert_mlp + scores.experts, want_neurons + want_experts, strict=True):
        torch.testing.assert_close(got, 0.5 * want / n, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize(
    "method", [hessian.FisherSaliency(), hessian.HutchinsonSaliency()], ids=lambda m: m.name
)
def test_methods_without_expert_scores_refuse_moe_models(method: hessian.Saliency) -> None:
    model, calib = calibration("qwen3_moe", supervised=True, n_batches=1)
    with pytest.raises(ValueError, match=rf"saliency {method.name} does not score routed experts.*'nvit'"):
        method.score(model, calib)


def test_the_proxy_keeps_the_top_experts_and_their_top_neurons() -> None:
    from hwprune.search._proxy import SaliencyProxy
    from hwprune.search._space import SearchSpace, Widths

    model, calib = calibration("qwen3_moe", supervised=True, n_batches=1)
    scores = hessian.RandomSaliency(seed=4).score(model, calib)
    structure = prunable.discover(model)
    proxy = SaliencyProxy(scores, structure)
    space = SearchSpace.build(structure, mlp_step=16, expert_width_step=8)
    assert space.moe and space.expert_choices == (2, 3, 4) and space.expert_width_choices == (8, 16, 24, 32)
    whole = SearchSpace.build(structure, mlp_step=16, expert_axes=False)  # search.expert_axes=false
    assert whole.expert_choices == (4,) and whole.expert_width_choices == (32,)
    widths = Widths(np.array([2, 1, 2]), np.array([0, 0, 0]), np.array([3, 2, 4]), np.array([16, 8, 32]))
    # Brute force: experts removed by ascending score, then each kept expert's lowest neurons.
    expected = 0.0
    for i, (k, w) in enumerate(zip(widths.experts, widths.expert_width, strict=True)):
        e, n = scores.experts[i].numpy(), scores.expert_mlp[i].numpy()
        top = np.argsort(-e)[:k]
        expected += np.sort(e)[: len(e) - k].sum() + sum(np.sort(n[j])[: n.shape[1] - w].sum() for j in top)
        expected += np.sort(scores.attention[i].numpy())[: 2 - widths.units[i]].sum()
    assert float(proxy.loss(*widths)[0]) == pytest.approx(expected, rel=1e-12)
    plan = proxy.plan(widths, prunable.model_ref(model))
    for i, lp in enumerate(plan.layers):
        e, n = scores.experts[i].numpy(), scores.expert_mlp[i].numpy()
        assert list(lp.experts) == sorted(np.argsort(-e)[: widths.experts[i]].tolist())
        for kept, neurons in zip(lp.experts, lp.expert_mlp, strict=True):
            assert set(neurons) == set(np.argsort(-n[kept])[: widths.expert_width[i]].tolist())
    prunable.apply_plan(model, plan)
    assert [(la.num_experts, la.expert_width) for la in prunable.discover(model).layers] == [
        (3, 16),
        (2, 8),
        (4, 32),
    ]


def test_search_with_expert_axes_end_to_end(tmp_path: Path) -> None:
    """hwprune-search on a Mixtral-like model: the study chooses expert counts and widths per layer,
    and its plans apply, reload and are timed by hwprune-apply."""
    import pandas as pd

    from hwprune.search._from_config import run_config
    from hwprune.search._report import write_report
    from hwprune.search.apply_app import apply_config
    from hwprune.search.apply_app import run as run_apply
    from hwprune.search.config import AppConfig, compose, to_object

    model = CASES["mixtral"].build()
    model.resize_token_embeddings(256)  # byte-level ids
    model.save_pretrained(tmp_path / "model")
    overrides = [
        f"model.source={tmp_path / 'model'}",
        "model.class_name=MixtralForCausalLM",
        "model.name=mixtral",
        "task=lm",
        "workload.seq_len=32",
        "task.build.block_size=32",
        "task.build.calibration_blocks=4",
        "task.build.eval_blocks=4",
        "search.n_trials=40",
        "search.rescore=2",
        "search.rescore_min_speedup=1.2",
        "search.uniform_baselines=[0.5]",
        "search.exact_seeds=5",
        "recovery=none",
        "hardware=cpu_local",  # 16-wide tiles: a 48-wide expert has widths to choose (an H100's tile is 128)
        f"saliency.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = to_object(compose("config", overrides))
    assert isinstance(cfg, AppConfig)
    outcome = run_config(cfg, tmp_path / "run")
    pareto = write_report(outcome)
    assert outcome.space.expert_choices == (2, 3, 4) and outcome.cost_model.spec.experts == 4
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert {"experts_0", "expert_width_2"} <= set(trials.columns)
    assert trials.experts_0.nunique() > 1 and trials.expert_width_0.nunique() > 1
    search = pareto[pareto.kind == "search"]
    assert len(search) >= 1
    row = search.iloc[0]
    plan = prunable.PrunePlan.load(tmp_path / "run" / row.plan_path)
    assert [len(lp.experts or ()) for lp in plan.layers] == [int(v) for v in row.experts.split()]
    # hwprune-apply's defaults, ONNX included (transformers' experts dispatch has no ONNX operator).
    result = run_apply(
        apply_config(plan=tmp_path / "run" / row.plan_path, out=tmp_path / "out", task=cfg.task)
    )
    assert result["onnx"]["exported"] and (tmp_path / "out" / "model.onnx").is_file()
    assert result["onnx"]["max_abs_diff"] <= result["onnx"]["tolerance"]
    reloaded = prunable.load_pruned(tmp_path / "out")
    assert [la.num_experts for la in prunable.discover(reloaded).layers] == [
        int(v) for v in row.experts.split()
    ]
    assert result["predicted_speedup"] > 1.0 and result["params_pruned"] < result["params_dense"]


def test_heapr_is_the_output_space_second_order_score_of_atomic_experts() -> None:
    """score(e, n) = 1/2 sum_t (r_t a_tn)^2 * mean_t (g_t . w_n)^2 over the tokens routed to e,
    recomputed here from the plain model's routing, activations and output gradients."""
    from torch.nn import functional as F

    model, calib = calibration("mixtral", supervised=True, n_batches=1)
    scores = hessian.HEAPrSaliency().score(model, calib)
    captured: dict[tuple[int, str], object] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def inputs(module: object, args: tuple, i: int = i) -> None:
            captured[(i, "in")] = args  # (hidden (N, H), top_k_index (N, k), top_k_weights (N, k))

        def output(module: object, args: tuple, out: torch.Tensor, i: int = i) -> None:
            out.register_hook(lambda g, i=i: captured.__setitem__((i, "grad"), g))

        handles += [
            layer.mlp.experts.register_forward_pre_hook(inputs),
            layer.mlp.register_forward_hook(output),
        ]
    batch = calib.batches[0]
    calib.objective.losses(model, batch).sum().backward()
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        hidden, index, weights = captured[(i, "in")]  # type: ignore[misc]
        grad = captured[(i, "grad")].reshape(-1, hidden.shape[-1])  # type: ignore[union-attr]
        want = torch.zeros_like(scores.expert_mlp[i])
        with torch.no_grad():
            for e in range(experts.gate_up_proj.shape[0]):
                token, slot = torch.where(index == e)
                gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = weights[token, slot, None] * experts.act_fn(gate) * up  # (n, width)
                projected = grad[token] @ experts.down_proj[e]  # (n, width): g_t . w_n
                want[e] = (
                    0.5 * act.double().pow(2).sum(0) * projected.double().pow(2).mean(0) / batch.n_samples
                )
        torch.testing.assert_close(scores.expert_mlp[i], want, rtol=1e-4, atol=1e-14)
        torch.testing.assert_close(scores.experts[i], want.sum(-1), rtol=1e-4, atol=1e-14)
    assert all((s > 0).any() for s in scores.expert_mlp)
    dense_model, dense_calib = calibration("llama_gqa", supervised=True, n_batches=1)
    with pytest.raises(ValueError, match="saliency heapr scores routed experts and LlamaModel has none"):
        hessian.HEAPrSaliency().score(dense_model, dense_calib)


def test_a_saliency_that_cannot_score_the_model_fails_before_any_data_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hwprune.search import _from_config
    from hwprune.search.config import compose, to_object

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the task was built")

    monkeypatch.setattr(_from_config, "build_task", boom)
    cfg = to_object(compose("config", ["saliency=heapr", f"saliency.cache_dir={tmp_path}"]))
    with pytest.raises(
        ValueError, match="saliency heapr scores routed experts and BertModel has none; use nvit"
    ):
        _from_config.run_config(cfg, tmp_path / "run")  # type: ignore[arg-type]
