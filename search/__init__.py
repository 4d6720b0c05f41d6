"""The main job: Optuna Pareto search over per-layer structure, Hydra apps and reports."""
