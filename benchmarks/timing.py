"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def interleaved_medians(cases: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per case over ``repeats`` rounds after one warm-up round.

    Cases run round-robin, so drift (thermal, other load) hits all of them alike; each
    round reseeds torch, so sampled cases repeat the same work in every round.
    """
    samples = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, run in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            torch.manual_seed(round_)
            started = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_:
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def device_name(device: str) -> str:
    """A readable name of the device the benchmark ran on."""
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
