"""The one copy-rate measurement (`offload_moe.base.timing`): trials after a warm-up, median and spread."""

from __future__ import annotations

import pytest
import torch

from offload_moe.base.timing import Rate, copy_rate, measure_copy_rate, seconds_per_call

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def test_rate_of_trials():
    r = Rate.of([3.0, 1.0, 2.0, 10.0])
    assert (r.median, r.low, r.high, r.trials) == (2.5, 1.0, 10.0, (3.0, 1.0, 2.0, 10.0))
    with pytest.raises(ValueError):
        Rate.of([])


def test_measure_copy_rate_on_the_host():
    r = measure_copy_rate(1 << 20, "cpu", "cpu", trials=4, repeats=2, warmup=1)
    assert len(r.trials) == 4 and all(t > 0 for t in r.trials)
    assert r.low <= r.median <= r.high and r.low == min(r.trials) and r.high == max(r.trials)


def test_copy_rate_copies_and_checks_sizes():
    src = torch.arange(4096, dtype=torch.int32)
    dst = torch.zeros_like(src)
    assert copy_rate(src, dst, trials=1).high > 0
    assert torch.equal(dst, src)                       # it timed the real copy
    with pytest.raises(ValueError):
        copy_rate(src, torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError):
        measure_copy_rate(0)


def test_seconds_per_call_warms_up_then_times_each_trial():
    calls = []
    seconds = seconds_per_call(lambda: calls.append(1), torch.device("cpu"), trials=3, warmup=2)
    assert len(calls) == 5 and len(seconds) == 3 and all(s > 0 for s in seconds)


@needs_cuda
def test_measure_copy_rate_host_to_cuda_and_back():
    for src, dst in (("cpu", "cuda"), ("cuda", "cpu")):
        r = measure_copy_rate(1 << 22, src, dst, trials=3)
        assert len(r.trials) == 3 and 0 < r.low <= r.median <= r.high
