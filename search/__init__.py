"""The main job: tasks, the Optuna Pareto search, recovery, the Hydra apps and their reports.

Apps: `hwprune-search` (search.app), `hwprune-profile` (search.profile_app), `hwprune-apply`
(search.apply_app). From Python:

    cfg = to_object(compose("config", ["task=sts", ...]))   # the apps' configuration, checked
    outcome = run_search(cfg, run_dir)                       # saliency, study, recovered re-scoring
    write_report(outcome)                                    # trials/pareto CSV, plots, plans, report
    result = run_apply(apply_config(plan=..., out=..., task=cfg.task))

`load_hardware` reads a hardware profile, `block_spec` turns a model's structure into the plain
numbers cost models take, and `ParetoLocalSearchSampler` is the default Optuna sampler.
"""

from hwprune.search._blocks import block_spec, model_cost_model, model_timer
from hwprune.search._outcome import Candidate, RunOutcome
from hwprune.search._report import write_report
from hwprune.search._run import run_search
from hwprune.search._sampler import ParetoLocalSearchSampler
from hwprune.search.apply_app import apply_config
from hwprune.search.apply_app import run as run_apply
from hwprune.search.config import compose, load_hardware, to_object

__all__ = [
    "Candidate",
    "ParetoLocalSearchSampler",
    "RunOutcome",
    "apply_config",
    "block_spec",
    "compose",
    "load_hardware",
    "model_cost_model",
    "model_timer",
    "run_apply",
    "run_search",
    "to_object",
    "write_report",
]
