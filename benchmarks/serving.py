"""What serving costs: `vlm-safety serve` under load against calling generate directly.

For each model (the testbed, and the random LLaVA sized like a real one: 576 image tokens)
and each policy (defenses off, adashield, eta on its safe path), one real server process on
127.0.0.1 is driven by the `openai` client at 1, 4 and 8 concurrent clients, each sending
requests back to back; latency p50 / p95 and throughput are measured at the client. The
baseline is measured in the same run: the same requests through the attached model's
`generate`, in this process, alternating with the one-client requests (the server's overhead
is its p50 at one client over that). The requests are benign (ETA takes its safe path: CLIP pre-check, then
the answer streams live); greedy, a fixed answer length.

    python benchmarks/serving.py                     # both models, CPU
    python benchmarks/serving.py --models testbed --requests 8
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import yaml
from timing import device_name, write_report

import vlm_safety_plugins as vsp
from vlm_safety_plugins.testing import sized_llava, tiny_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIENTS = (1, 4, 8)
SIZED = "sized-llava"


def policies(model: str) -> dict[str, dict]:
    eta = yaml.safe_load((CONFIGS / "eta-testbed.yaml").read_text())
    if model == SIZED:  # random weights: tiny scorers, and nothing judged unsafe (the safe path)
        eta = {
            "defenses": {
                "eta": {
                    "clip": {"model": "tiny-clip"},
                    "reward_model": {"path": "tiny-reward-model"},
                    "pre_threshold": 1.0,
                }
            }
        }
    return {"off": {"defenses": {}}, "adashield": yaml.safe_load((CONFIGS / "adashield.yaml").read_text()), "eta": eta}


def requests_for(model: str, count: int) -> list[tuple[str, object]]:
    if model == SIZED:
        return [("What is in the picture?", tiny_image((37 * i % 256, 90, 200), size=336)) for i in range(count)]
    from vlm_safety_plugins.testbed import world

    questions = [sample for sample in world.samples(8 * count, split="test", seed=3) if sample.kind == "question"]
    return [(sample.text, sample.image) for sample in questions[:count]]


def load(model: str):
    if model == SIZED:
        return sized_llava()
    from vlm_safety_plugins import testbed

    return testbed.load_vlm()


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# -- the server --------------------------------------------------------------------------------


class ServerProcess:
    """`vlm-safety serve` in a subprocess on a free port (sized LLaVA: a small launcher script)."""

    def __init__(self, model: str, policy: Path, port: int, folder: Path):
        if model == SIZED:
            # the sized LLaVA has no name the CLI knows: save it as a folder the server loads by path
            target = folder / SIZED
            if not target.exists():
                built, processor = sized_llava()
                built.save_pretrained(target)
                processor.save_pretrained(target)
            model = str(target)
        command = [
            sys.executable,
            "-c",
            "from vlm_safety_plugins.cli import cli; cli()",
            "serve",
            "--model",
            model,
            "--served-model-name",
            "bench",
            "--config",
            str(policy),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--threads",
            str(torch.get_num_threads()),
        ]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def drive(url: str, bodies: list[dict], clients: int) -> tuple[list[float], float]:
    """Per-request latencies and the wall time of sending ``bodies`` from ``clients`` threads."""
    client = client_for(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda body: timed(lambda: client.chat.completions.create(**body)), bodies))
    return latencies, time.perf_counter() - started


def one_client_against_direct(url: str, bodies: list[dict], direct_calls: list) -> tuple[list[float], list[float]]:
    """One client's latencies and the direct generate's, request by request in turn (the
    server idle meanwhile), so drift in the machine's load hits both alike."""
    client, served, direct = client_for(url), [], []
    for body, call in zip(bodies, direct_calls):
        direct.append(timed(call))
        served.append(timed(lambda body=body: client.chat.completions.create(**body)))
    return served, direct


def direct_calls(model, processor, policy: dict, requests, max_tokens: int) -> list:
    """The baseline: each request through the attached model's generate in this process,
    from the decoded image on (the server also decodes the PNG)."""
    vsp.detach(model)
    vsp.attach(model, processor, policy=policy)
    adapter = vsp.get_attachment(model).adapter

    def call(text, image):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        inputs = adapter.conversation_inputs([messages])
        model.generate(**inputs, images=[[image]], max_new_tokens=max_tokens, do_sample=False)

    return [lambda text=text, image=image: call(text, image) for text, image in requests]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"testbed,{SIZED}")
    parser.add_argument("--requests", type=int, default=16, help="Requests per (policy, clients) case.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for model_name in args.models.split(","):
            requests = requests_for(model_name, args.requests)
            bodies = [
                {
                    "model": "bench",
                    "temperature": 0,
                    "max_tokens": args.max_tokens,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                                {"type": "text", "text": text},
                            ],
                        }
                    ],
                }
                for text, image in requests
            ]
            model, processor = load(model_name)
            for policy_name, policy in policies(model_name).items():
                calls = direct_calls(model, processor, policy, requests, args.max_tokens)
                path = folder / f"{policy_name}.yaml"
                path.write_text(yaml.safe_dump(policy))
                server = ServerProcess(model_name, path, args.port, folder)
                try:
                    one_client_against_direct(server.url, bodies[:4], calls[:4])  # warm-up
                    served, direct = one_client_against_direct(server.url, bodies, calls)
                    rows.append((model_name, policy_name, 1, served, sum(served), statistics.median(direct)))
                    for clients in CLIENTS[1:]:
                        latencies, wall = drive(server.url, bodies, clients)
                        rows.append((model_name, policy_name, clients, latencies, wall, None))
                    for row in rows[-len(CLIENTS) :]:
                        print(row[:3], f"p50 {statistics.median(row[3]):.3f} s", flush=True)
                finally:
                    server.stop()
            del model
    off = {(row[0], row[2]): len(row[3]) / row[4] for row in rows if row[1] == "off"}
    lines = [
        f"# Serving ({device_name('cpu')})",
        "",
        f"`vlm-safety serve` (transformers engine, `--concurrency 4`) driven by the `openai` client on 127.0.0.1; "
        f"{args.requests} benign image requests per case, greedy, {args.max_tokens} new tokens; ETA on its safe "
        f"path. *direct* = the same requests through the attached `generate` in the client's process, one at a "
        f"time, alternating with the one-client requests (median). torch {torch.__version__}, {os.cpu_count()} "
        f"CPUs, {args.threads} torch thread(s) per generation. *overhead* = p50 − direct p50 at one client: "
        "a fixed cost per request (HTTP, JSON, base64 and PNG decoding, the SDK's parsing), so its ratio "
        "depends on how long the answer itself takes.",
        "",
        "| model | policy | clients | p50 (s) | p95 (s) | throughput (req/s) | direct p50 (s) | overhead (ms) "
        "| p50 vs direct | throughput vs off |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, policy_name, clients, latencies, wall, direct in rows:
        throughput = len(latencies) / wall
        p50 = statistics.median(latencies)
        direct_p50, overhead, vs_direct = ("", "", "")
        if direct:
            direct_p50, overhead, vs_direct = f"{direct:.3f}", f"{(p50 - direct) * 1000:.0f}", f"{p50 / direct:.2f}x"
        lines.append(
            f"| {model_name} | {policy_name} | {clients} | {p50:.3f} | "
            f"{percentile(latencies, 0.95):.3f} | {throughput:.2f} | {direct_p50} | {overhead} | {vs_direct} | "
            f"{throughput / off[(model_name, clients)]:.2f}x |"
        )
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
