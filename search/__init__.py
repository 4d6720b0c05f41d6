"""The main job: tasks, the Optuna Pareto search, recovery, the Hydra apps and their reports.

Apps: `hwprune-search` (search.app), `hwprune-profile` (search.profile_app), `hwprune-apply`
(search.apply_app): a thin layer that turns a checked Hydra config into the plain objects below.

From Python, plain objects:

    job = SearchJob(model=..., source=..., name=..., task=..., saliency=hessian.NViTSaliency(),
                    hardware=cost_models.load_profile("gpu_h100"), workload=cost_models.Workload(),
                    settings=SearchSettings(n_trials=300))
    outcome = run_search(job, run_dir)   # saliency, exact front, study, recovered re-scoring
    write_report(outcome)                # trials/pareto CSV, plots, plans, report
    result = apply_and_measure(plan_path, out_dir, task=job.task)  # prune, recover, save, time

or the apps' configuration, checked against the same schemas as the command line:

    outcome = run_config(to_object(compose("config", ["task=sts", ...])), run_dir)
    result = run_apply(apply_config(plan=..., out=..., task=cfg.task))

The search's parts, for studies of the search itself: `SearchSpace` and `Widths` (per-layer width
choices), `SaliencyProxy` (predicted loss of a configuration), `option_tables` and `exact_front`
(the proxy's exact Pareto front over a cost model), `hypervolume`, `SearchObjective` and
`run_study` (the Optuna study), `open_storage`; `block_spec`, `model_cost_model`, `model_timer`
and `real_block_factory` (the model's own layers for a `TorchProfiler`) connect a model to
`cost_models`; `export_onnx` and `check_onnx` write a model's ONNX
graph and prove it in ONNX Runtime in a fresh process.
"""

from hwprune.search._apply import apply_and_measure
from hwprune.search._blocks import block_spec, head_width, model_cost_model, model_timer, real_block_factory
from hwprune.search._exact import option_tables, pick, within_budgets
from hwprune.search._from_config import run_config
from hwprune.search._int8 import Int8Recipe, OnnxRuntimeModel, quantize_int8
from hwprune.search._job import SearchJob, SearchSettings
from hwprune.search._onnx import check_onnx, export_onnx
from hwprune.search._outcome import Candidate, RunOutcome
from hwprune.search._pareto import ExactFront, exact_front, hypervolume, hypervolume_subset
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._report import write_report
from hwprune.search._run import run_search
from hwprune.search._sampler import ParetoLocalSearchSampler
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import open_storage
from hwprune.search._study import Constraints, SearchObjective, run_study
from hwprune.search.apply_app import apply_config
from hwprune.search.apply_app import run as run_apply
from hwprune.search.config import compose, load_hardware, to_object

__all__ = [
    "Candidate",
    "Constraints",
    "ExactFront",
    "Int8Recipe",
    "OnnxRuntimeModel",
    "ParetoLocalSearchSampler",
    "RunOutcome",
    "SaliencyProxy",
    "SearchJob",
    "SearchObjective",
    "SearchSettings",
    "SearchSpace",
    "Widths",
    "apply_and_measure",
    "apply_config",
    "block_spec",
    "check_onnx",
    "compose",
    "exact_front",
    "export_onnx",
    "head_width",
    "hypervolume",
    "hypervolume_subset",
    "load_hardware",
    "model_cost_model",
    "model_timer",
    "open_storage",
    "option_tables",
    "pick",
    "quantize_int8",
    "real_block_factory",
    "run_apply",
    "run_config",
    "run_search",
    "run_study",
    "to_object",
    "within_budgets",
    "write_report",
]
