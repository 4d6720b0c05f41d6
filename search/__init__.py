"""The main job: tasks, the Optuna Pareto search, the Hydra apps and their reports.

Apps: `hwprune-search` (search.app), `hwprune-profile` (search.profile_app), `hwprune-apply`
(search.apply_app). From Python, `load_hardware` reads a hardware profile and `block_spec` turns a
model's structure into the plain numbers cost models take, and
`ParetoLocalSearchSampler` is the default Optuna sampler of the search.
"""

from hwprune.search._blocks import block_spec
from hwprune.search._sampler import ParetoLocalSearchSampler
from hwprune.search.config import compose, load_hardware

__all__ = ["ParetoLocalSearchSampler", "block_spec", "compose", "load_hardware"]
