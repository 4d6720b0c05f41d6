"""hwprune: hardware-aware structural pruning search for transformers.

    from hwprune import prunable, hessian, cost_models, search

- `hwprune.prunable`: structure discovery, gates, physical pruning, plan files.
- `hwprune.hessian`: saliency of every prunable unit (NViT, Fisher, Hutchinson, Taylor, magnitude).
- `hwprune.cost_models`: latency of any per-layer width on a device, with where each number comes from.
- `hwprune.search`: tasks, the Optuna Pareto search, recovery, reports and the command-line apps.

In a source checkout these are the top-level folders beside `pyproject.toml`; this folder holds
links to them, so that the checkout, an editable install and a wheel all import one namespace.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hwprune")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
