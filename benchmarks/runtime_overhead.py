"""What attaching costs: vanilla generate vs the attached generate, off and on.

Measured in one run, on the same inputs and model, each as the median of --repeats:

- vanilla              plain transformers generate, model not attached (the baseline)
- attached, no flags   attached model, no ``vlm_safety`` key (hooks installed, inactive)
- attached, no defense ``vlm_safety`` present with no defense enabled
- adashield            the input-transform defense (a longer prompt: its cost is prefill)
- steer all layers     an AddVector intervention on every decoder layer (hooks active)

Prints a table of medians and ratios to vanilla, and writes it to --out.

    python benchmarks/runtime_overhead.py                      # tiny model, CPU
    python benchmarks/runtime_overhead.py --family qwen2_vl --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import device_name, interleaved_medians, write_report

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.testing import FAMILIES, tiny_image, tiny_vlm


class SteerAllLayers(vsp.Defense):
    """Benchmark-only defense: a fixed small vector added at every decoder layer."""

    name = "benchmark_steer_all_layers"

    def interventions(self, call):
        size, count = call.adapter.hidden_size(), len(call.adapter.decoder_layers())
        vector = torch.full((size,), 1e-3, device=call.prompt_ids.device)
        return [vsp.AddVector({layer: vector for layer in range(count)})]


class BenchmarkPlugin:
    @vsp.hookimpl
    def register_defenses(self, register):
        register(SteerAllLayers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_overhead.md")
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    plugins.pm.register(BenchmarkPlugin())
    model, processor = tiny_vlm(args.family)
    twin, _ = tiny_vlm(args.family)  # same seed, same weights: the never-attached baseline
    model.to(args.device)
    twin.to(args.device)
    requests = [("What is in the picture?", tiny_image((40 * i % 256, 90, 200))) for i in range(args.batch)]
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs(requests).to(args.device)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    vsp.attach(model, processor)

    def flagged(defenses):
        return vsp.SafetyConfig.from_dict({"defenses": defenses}).to_generation_config(
            model.generation_config, **settings
        )

    configs = {
        "attached, no defense": flagged({}),
        "adashield": flagged({"adashield": {}}),
        "steer all layers": flagged({"benchmark_steer_all_layers": {}}),
    }
    cases = {
        "vanilla": lambda: twin.generate(**inputs, **settings),
        "attached, no flags": lambda: model.generate(**inputs, **settings),
    }
    for name, config in configs.items():
        cases[name] = lambda config=config: model.generate(**inputs, generation_config=config)
    timings = interleaved_medians(cases, args.repeats, args.device)

    device = device_name(args.device)
    lines = [
        f"# Runtime overhead ({args.family}, {args.device}: {device})",
        "",
        f"tiny_vlm({args.family!r}), batch {args.batch}, {args.new_tokens} new tokens (greedy, forced length), "
        f"median of {args.repeats} interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| case | median (ms) | ms / token | vs vanilla |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in timings.items():
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {seconds * 1e3 / args.new_tokens:.2f} | "
            f"{seconds / timings['vanilla']:.3f}x |"
        )
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
