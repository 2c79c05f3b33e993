"""What ETA costs, and how much faster its batched best-of-N is than the reference algorithm.

One run, one random LLaVA sized so that the image prefill is realistic (336 px: 576 image
tokens), the same request and the same settings for every case, each the median of
--repeats interleaved rounds:

- vanilla              plain transformers generate, model not attached (the baseline)
- eta, safe path       attached ETA whose CLIP pre-check says safe: one CLIP pass, then vanilla
- eta, full alignment  attached ETA with both checks unsafe: buffered vanilla answer, reward
                       post-check, then prefix + best-of-N (N candidates sampled as one batch
                       from the vanilla call's KV cache, one reward call per sentence)
- reference-style      the authors' algorithm: vanilla answer, reward post-check, CLIP
                       pre-check (image encoded again), then each candidate decoded alone at
                       batch 1 (every first-sentence candidate re-prefills prompt and image,
                       later ones continue from a copy of the accepted cache), one reward call
                       per candidate, and the KV cache grown by torch.cat at every token

Boundary tokens (". ? ! newline") and EOS are suppressed for every case, so each sentence is
exactly --sentence-tokens long and all cases decode the same number of sentences and tokens.
The tiny CLIP and reward model are small next to the VLM (the "CLIP is small" case of the
safe-path target); with ArmoRM-8B the per-candidate reward calls of the reference cost far more.

    python benchmarks/eta_speed.py                   # CPU; writes benchmarks/results/eta_speed.md
    python benchmarks/eta_speed.py --device cuda --layers 16 --hidden 1024
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from timing import device_name, interleaved_medians, sized_llava_pair, write_report
from transformers import DynamicCache

import vlm_safety_plugins as vsp
from vlm_safety_plugins import testing
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.defenses.eta.best_of_n import GROWING_INPUTS, extend_context, keep_row
from vlm_safety_plugins.defenses.eta.defense import candidate_scores, uses_utility
from vlm_safety_plugins.scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION

PREFIX = "As an AI assistant"
BOUNDARY_CHARACTERS = ".?!\n"


def boundary_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a sentence-ending character, and the special tokens."""
    ids = [
        index
        for index in range(len(tokenizer))
        if any(char in tokenizer.decode([index]) for char in BOUNDARY_CHARACTERS)
    ]
    return sorted(set(ids) | set(tokenizer.all_special_ids))


class ReferenceStyleEta:
    """The reference implementation's algorithm and data flow, on the same models (no attach)."""

    def __init__(self, model, adapter, clip, reward, *, n, top_k, temperature, sentence_tokens, new_tokens, settings):
        self.model, self.adapter, self.clip, self.reward = model, adapter, clip, reward
        self.n, self.sentence_tokens, self.new_tokens = n, sentence_tokens, new_tokens
        self.sampling = dict(settings, do_sample=True, top_k=top_k, top_p=1.0, temperature=temperature)
        self.settings = settings
        self.runs: list[dict[str, float]] = []  # seconds per stage, one dict per request

    def __call__(self, inputs, image):
        self.runs.append({})
        started = time.perf_counter()
        vanilla = self.model.generate(
            **inputs, **self.settings, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False
        )
        prompt_length = inputs["input_ids"].shape[1]
        answer = self.adapter.tokenizer.decode(vanilla[0, prompt_length:], skip_special_tokens=True)
        self._lap("vanilla", started)
        started = time.perf_counter()
        self.reward.score([POST_EVAL_INSTRUCTION], [answer])
        self._lap("reward", started)
        started = time.perf_counter()
        image_embedding = self.clip.embed_images([image])  # encoded again for the utility term
        self.clip.safety_scores(image_embedding)
        self._lap("clip", started)
        started = time.perf_counter()
        tokens = self._align(inputs, image_embedding)
        self._lap("align", started)
        return tokens

    def _align(self, inputs, image_embedding):
        prefix = self.adapter.response_ids(PREFIX)
        context = extend_context(
            {name: inputs[name] for name in ("input_ids", *GROWING_INPUTS) if name in inputs}, prefix
        )
        accepted_cache, accepted, index = None, [], 0
        while len(accepted) < self.new_tokens:
            index += 1
            length = min(self.sentence_tokens, self.new_tokens - len(accepted))
            candidates, caches, rewards = [], [], []
            for _ in range(self.n):  # one candidate at a time, batch 1
                if accepted_cache is None:  # first sentence: prompt and image prefilled again
                    cache, step_inputs = DynamicCache(config=self.model.config), {**inputs, **context}
                else:
                    cache, step_inputs = copy.deepcopy(accepted_cache), context
                out = self.model.generate(
                    **step_inputs, past_key_values=cache, max_new_tokens=length, min_new_tokens=length, **self.sampling
                )
                candidate = out[0, context["input_ids"].shape[1] :].tolist()
                text = self.adapter.tokenizer.decode(prefix + accepted + candidate, skip_special_tokens=True)
                rewards.append(float(self.reward.score([BEST_OF_N_INSTRUCTION], [text])[0]))  # one call each
                candidates.append(candidate)
                caches.append(cache)
            scores = torch.tensor(rewards)
            if uses_utility(index, [False] * self.n):
                texts = self.adapter.tokenizer.batch_decode(candidates, skip_special_tokens=True)
                utilities = torch.cat(
                    [self.clip.similarity(self.clip.embed_texts([text]), image_embedding)[:, 0] for text in texts]
                )
                scores = candidate_scores(scores, utilities, index=index, alpha=1.0)
            winner = int(torch.argmax(scores))
            accepted += candidates[winner]
            context = extend_context(context, candidates[winner])
            accepted_cache = caches[winner]
            keep_row(accepted_cache, 0, length=context["input_ids"].shape[1] - 1)
        return prefix + accepted

    def _lap(self, stage, started):
        self.runs[-1][stage] = time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--sentence-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eta_speed.md")
    args = parser.parse_args()

    model, processor, twin = sized_llava_pair(args.hidden, args.layers, args.device)
    adapter = find_adapter(twin, processor)
    image = testing.tiny_image((200, 40, 40), size=336)
    inputs = adapter.build_inputs([("What is in the picture?", image)]).to(args.device)
    settings = dict(suppress_tokens=boundary_token_ids(adapter.tokenizer))
    forced = dict(settings, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    clip = vsp.ClipScorer.from_open_clip(*testing.tiny_clip(), device=args.device)
    reward = vsp.RewardScorer(*testing.tiny_reward_model())
    reward.model.to(args.device)
    vsp.attach(model, processor)

    def eta(pre_threshold, post_threshold):
        options = {
            "pre_threshold": pre_threshold,
            "post_threshold": post_threshold,
            "clip": {"model": "tiny-clip"},
            "reward_model": {"path": "tiny-reward-model"},
            "best_of_n": {"n": args.n, "top_k": 5, "temperature": 1.5, "max_sentence_tokens": args.sentence_tokens},
            "max_new_tokens": args.new_tokens,
        }
        return vsp.SafetyConfig.from_dict({"defenses": {"eta": options}}).to_generation_config(
            model.generation_config, return_dict_in_generate=True, **forced
        )

    safe, unsafe = eta(1.0, -1e3), eta(-1.0, 1e3)
    reports = []
    reference = ReferenceStyleEta(
        twin,
        adapter,
        clip,
        reward,
        n=args.n,
        top_k=5,
        temperature=1.5,
        sentence_tokens=args.sentence_tokens,
        new_tokens=args.new_tokens,
        settings=settings,
    )
    cases = {
        "vanilla": lambda: twin.generate(**inputs, **forced, do_sample=False),
        "eta, safe path": lambda: model.generate(**inputs, images=[image], generation_config=safe),
        "eta, full alignment": lambda: reports.append(
            model.generate(**inputs, images=[image], generation_config=unsafe).safety[0].defenses["eta"]
        ),
        "reference-style": lambda: reference(inputs, image),
    }
    timings = interleaved_medians(cases, args.repeats, args.device)

    details = reports[-1].details
    assert details["aligned"] and details["sentences"] == -(-args.new_tokens // args.sentence_tokens), details
    stages = {
        stage: statistics.median(report.details["time_s"][stage] for report in reports[1:])
        for stage in ("clip", "vanilla", "reward", "align", "decode", "score")
    }
    reference_stages = {
        stage: statistics.median(run[stage] for run in reference.runs[1:])
        for stage in ("clip", "vanilla", "reward", "align")
    }

    device = device_name(args.device)
    sentences = details["sentences"]
    lines = [
        f"# ETA speed ({args.device}: {device})",
        "",
        f"Random LLaVA (`sized_llava`: {args.layers} layers, hidden {args.hidden}, "
        f"{sum(p.numel() for p in twin.parameters()) / 1e6:.0f} M parameters, 576 image tokens, "
        f"{inputs['input_ids'].shape[1]}-token prompt); tiny CLIP and reward model. {args.new_tokens} new tokens; "
        f"alignment: N = {args.n}, {sentences} sentences of {args.sentence_tokens} tokens. Median of {args.repeats} "
        f"interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| case | median (s) | vs vanilla |",
        "|---|---:|---:|",
    ]
    for name, seconds in timings.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / timings['vanilla']:.2f}x |")
    speedup = timings["reference-style"] / timings["eta, full alignment"]
    align_speedup = reference_stages["align"] / stages["align"]
    lines += [
        "",
        f"Full alignment vs reference-style: **{speedup:.2f}x faster end to end**, "
        f"**{align_speedup:.2f}x faster in the alignment stage** (prefix + best-of-N).",
        "",
        "Where the time goes (median seconds per request):",
        "",
        "| stage | eta, full alignment | reference-style |",
        "|---|---:|---:|",
        f"| CLIP pre-check | {stages['clip']:.3f} | {reference_stages['clip']:.3f} |",
        f"| vanilla answer (prefill + decode) | {stages['vanilla']:.3f} | {reference_stages['vanilla']:.3f} |",
        f"| reward post-check | {stages['reward']:.3f} | {reference_stages['reward']:.3f} |",
        f"| alignment | {stages['align']:.3f} | {reference_stages['align']:.3f} |",
        f"| ... of which candidate decoding | {stages['decode']:.3f} | |",
        f"| ... of which scoring (reward + CLIP) | {stages['score']:.3f} | |",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
