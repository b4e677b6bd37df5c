"""Sizing a replica: batch_size "auto" from the free accelerator memory, CPU threads."""

from __future__ import annotations

import pytest
import torch

from workers.wham import model as model_module
from workers.wham.engine import RolloutEngine
from workers.wham.model import random_model
from workers.wham.resources import (
    CPU_BATCH,
    auto_batch_size,
    available_cpus,
    kv_cache_bytes,
    max_batch_for_memory,
    set_cpu_threads,
)

GIB = 2**30


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0)


def test_memory_helpers(model) -> None:
    per_row = RolloutEngine.kv_cache_bytes(model, 1)
    assert per_row == kv_cache_bytes(model, 1)
    assert RolloutEngine.kv_cache_bytes(model, 8) == 8 * per_row
    assert max_batch_for_memory(model, 0) == 0
    assert max_batch_for_memory(model, 10**9) > max_batch_for_memory(model, 10**8) > 0


def test_auto_batch_size_from_a_given_free_memory_figure(model) -> None:
    assert auto_batch_size(model, free_bytes=GIB) == max_batch_for_memory(model, int(0.85 * GIB))
    assert auto_batch_size(model, free_bytes=GIB, headroom=0.5) < auto_batch_size(
        model, free_bytes=GIB)
    assert auto_batch_size(model, free_bytes=0) == 1  # at least one rollout
    assert auto_batch_size(model) == CPU_BATCH  # on the CPU without a figure


def test_auto_batch_size_reads_the_free_cuda_memory(model, monkeypatch) -> None:
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 3 * GIB, 80 * GIB

    monkeypatch.setattr(model_module.WHAMModel, "device",
                        property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    want = max_batch_for_memory(model, int(0.85 * 3 * GIB))
    assert auto_batch_size(model) == want > 1
    assert calls == [torch.device("cuda", 0)]


def test_cpu_threads_never_exceed_the_available_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(10_000) == available_cpus() == torch.get_num_threads()
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads() == available_cpus()
    finally:
        torch.set_num_threads(before)
