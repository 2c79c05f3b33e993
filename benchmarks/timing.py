"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

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


def sized_llava_pair(hidden: int, layers: int, device: str):
    """``(model, processor, twin)``: a ``sized_llava`` to attach and its never-attached twin
    (same seed, same weights) for the vanilla baseline, both on ``device``."""
    from vlm_safety_plugins.testing import sized_llava

    model, processor = sized_llava(hidden_size=hidden, num_layers=layers)
    twin, _ = sized_llava(hidden_size=hidden, num_layers=layers)
    return model.to(device), processor, twin.to(device)


def device_name(device: str) -> str:
    """A readable name of the device the benchmark ran on."""
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"


def write_report(lines: list[str], out: Path) -> None:
    """Print the Markdown report and write it to ``out`` (folders created)."""
    table = "\n".join(lines) + "\n"
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
