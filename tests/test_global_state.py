"""hwprune leaves the caller's process as it found it: torch threads, random generators, log levels."""

from __future__ import annotations

import optuna
import torch

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TorchProfiler, torch_threads
from hwprune.search._study import _optuna_warnings_only

SPEC = cost_models.BlockSpec(hidden=32, head_dim=8, heads=4, kv_heads=4, mlp=64, num_layers=1)
WORKLOAD = cost_models.Workload(batch_size=1, seq_len=8)


def test_the_profiler_restores_threads_and_the_random_generator() -> None:
    before_threads = torch.get_num_threads()
    other = 1 if before_threads != 1 else 2
    torch.manual_seed(123)
    expected = torch.rand(3)  # what the caller's generator gives next, had nothing run
    torch.manual_seed(123)
    profiler = TorchProfiler(warmup=0, repeats=1, threads=other)
    assert torch.get_num_threads() == before_threads  # constructing changes nothing
    profiler.measure_block(SPEC, WORKLOAD, units=2, mlp=32)
    assert torch.get_num_threads() == before_threads
    torch.testing.assert_close(torch.rand(3), expected)
    assert profiler.metadata()["threads"] == other  # the threads it measured with


def test_torch_threads_restores_after_an_error() -> None:
    before = torch.get_num_threads()
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before


def test_a_random_init_model_is_seeded_without_touching_the_callers_generator() -> None:
    source = "random:benchmarks/models/all_minilm_l6_v2.json"
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a = prunable.load_model(source, "BertModel")
    torch.testing.assert_close(torch.rand(2), expected)
    b = prunable.load_model(source, "BertModel")  # the same weights every time
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_optuna_verbosity_is_restored_after_a_study() -> None:
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        with _optuna_warnings_only():
            assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(optuna.logging.INFO)
