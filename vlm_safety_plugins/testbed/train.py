"""Train the testbed's three models on the CPU, with fixed seeds, and measure them on held-out data.

    python -m vlm_safety_plugins.testbed.train --out vlm_safety_plugins/testbed/weights

writes ``vlm/``, ``clip/`` and ``reward_model/`` under ``--out`` (float16 safetensors plus
tokenizer, processor and config files) and ``metrics.json`` (training seconds, held-out
behaviour and score summaries). ``--only`` retrains some of the models and keeps the
metrics of the others. Torch uses ``--threads`` threads (2 by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import NAMES, WEIGHTS, evaluate

MODELS = ("vlm", "clip", "reward_model")


def _train(which: str, out: Path, seed: int) -> dict:
    log = lambda message: print(message, flush=True)  # noqa: E731
    if which == "vlm":
        from . import vlm

        stats = vlm.train(out / "vlm", seed=seed, log=log)
        model, processor = vlm.load(out / "vlm")
        stats["held_out"] = evaluate.vlm_behaviour(model, processor)
    elif which == "clip":
        from . import clip_model

        stats = clip_model.train(out / "clip", seed=seed, log=log)
        stats["held_out"] = evaluate.summary(evaluate.clip_scores(*clip_model.load(out / "clip")))
    else:
        from . import reward_model

        stats = reward_model.train(out / "reward_model", seed=seed, log=log)
        stats["held_out"] = evaluate.summary(evaluate.reward_scores(*reward_model.load(out / "reward_model")))
    return stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_safety_plugins.testbed.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="output directory (default: the package's weights)")
    parser.add_argument("--only", choices=MODELS, nargs="+", default=list(MODELS), help="models to (re)train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    for which in args.only:
        started = time.perf_counter()
        stats = _train(which, args.out, args.seed)
        stats["total_seconds"] = round(time.perf_counter() - started, 1)
        stats["seconds"] = round(stats["seconds"], 1)
        stats["seed"], stats["threads"] = args.seed, args.threads
        metrics[which] = stats
        print(json.dumps({which: stats}, indent=2), flush=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"names: {', '.join(NAMES)}; weights in {args.out}")
    return metrics


if __name__ == "__main__":
    main()
