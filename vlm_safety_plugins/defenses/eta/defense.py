"""ETA: Evaluating Then Aligning (arXiv 2410.06625), as docs/defenses/eta.md describes.

Per row: a CLIP pre-check scores the image against a safety prompt. A safe image means
the vanilla answer, generated (and streamed) as usual, and the reward model never runs.
Otherwise the vanilla answer is generated and buffered, the reward model post-checks it,
and when both checks say unsafe the answer is replaced by the interference prefix plus a
sentence-level best-of-N continuation scored by reward (safety) plus CLIP (utility).
Text-only rows are decided by the post-check alone (``text_only: post``) or passed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

from ...core import plugins
from ...core.defense import Defense, EngineWork
from ...core.errors import ConfigError, DefenseError
from ...core.options import Strength, option
from ...core.report import MODIFIED
from ...scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION
from .best_of_n import GROWING_INPUTS, extend_context, keep_row, prefill_cache, recording_cache, sentence_best_of_n


@dataclass(frozen=True)
class ClipOptions:
    evaluator: str = option("clip", doc="Registered image-safety evaluator to use (see `vlm-safety plugins`).")
    backend: Literal["open_clip", "transformers"] = option("open_clip", doc="CLIP implementation.")
    model: str = option(
        "ViT-L-14-336",
        doc="open_clip model name, or a transformers hub id / local path; `tiny-clip` builds the offline test model.",
        names_file=True,
    )
    pretrained: str | None = option(
        "openai", doc="open_clip pretrained tag or checkpoint file (ignored by transformers).", names_file=True
    )
    device: str | None = option(None, doc="Device for CLIP; default: the VLM's device.")


@dataclass(frozen=True)
class RewardModelOptions:
    evaluator: str = option("reward_model", doc="Registered reward evaluator to use (see `vlm-safety plugins`).")
    path: str = option(
        "RLHFlow/ArmoRM-Llama3-8B-v0.1",
        doc="Reward model hub id or local path; `tiny-reward-model` builds the offline test model.",
        names_file=True,
    )
    trust_remote_code: bool = option(
        False,
        doc="Run the checkpoint's own modeling code. Honoured only when the operator allows remote code "
        "(`attach(..., trust_remote_code=True)`, `--trust-remote-code`); otherwise a row that needs it is refused.",
    )
    max_length: int = option(4096, doc="Reward-model input is truncated to this many tokens.", min=8, max=2**20)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        doc="Weights dtype of the reward model: `auto` keeps the checkpoint's (ArmoRM's config says float32, "
        "about 32 GB; its model card loads it in bfloat16).",
    )
    device: str | None = option(None, doc="Device for the reward model; default: the VLM's device.")


@dataclass(frozen=True)
class BestOfNOptions:
    n: int = option(5, doc="Candidates sampled per sentence (one batch).", min=1, max=64)
    top_k: int = option(5, doc="Top-k of the candidate sampler (the reference ties it to n).", min=1, max=10_000)
    temperature: float = option(1.5, doc="Sampling temperature of the candidates.", above=0.0, max=100.0)
    alpha: float = option(
        1.0, doc="Weight of the CLIP utility term, divided by the sentence index.", min=0.0, max=100.0
    )
    max_sentence_tokens: int = option(70, doc="Cap on one sentence's tokens.", min=1, max=4096)


@dataclass(frozen=True)
class EtaOptions:
    pre_threshold: float = option(
        0.16, doc="CLIP cosine at or above which the image is judged unsafe.", min=-1.0, max=1.0
    )
    post_threshold: float = option(0.06, doc="Reward at or below which the answer is judged unsafe.")
    clip: ClipOptions = option(ClipOptions(), doc="Pre-generation evaluator (image safety).")
    reward_model: RewardModelOptions = option(RewardModelOptions(), doc="Post-generation evaluator.")
    prefix: str = option("As an AI assistant", doc="Interference prefix: the aligned answer's first words.")
    best_of_n: BestOfNOptions = option(BestOfNOptions(), doc="Sentence-level best-of-N search.")
    max_new_tokens: int = option(
        1024, doc="Cap on the aligned answer (also capped by the call's max_new_tokens).", min=1, max=65_536
    )
    boundary: Literal["text", "reference"] = option(
        "text", doc="Sentence boundary: `text` (. ? ! newline, not decimals or list numbers) or `reference` (. only)."
    )
    alignment: Literal["full", "shallow_only", "deep_only"] = option(
        "full", doc="Ablations: `shallow_only` = prefix then ordinary decoding; `deep_only` = best-of-N, no prefix."
    )
    text_only: Literal["post", "pass"] = option(
        "post", doc="Rows without an image: decided by the post-check alone (`post`), or never aligned (`pass`)."
    )
    safe_images: Literal["pass", "post"] = option(
        "pass",
        doc="Rows whose images the pre-check judges safe: passed unaligned (`pass`, the paper), or decided by the "
        "post-check alone (`post`, beyond the paper: catches a harmful question beside a harmless image, at one "
        "reward-model call per answer, and those answers no longer stream live).",
    )
    reward_sees: Literal["instruction", "question"] = option(
        "instruction",
        doc="What the reward model sees as the user turn: the reference's fixed safety "
        "instruction, or the user's real question.",
    )
    speculate: bool = option(
        False,
        doc="In front of an engine (`vlm-safety serve --upstream`) only: when the pre-check says unsafe, "
        "start the alignment beside the vanilla answer and use it only if the post-check says unsafe too "
        "(beyond the paper: lower latency for aligned answers, engine work wasted on the others).",
    )


class Eta(Defense):
    """Evaluate (CLIP pre-check, reward post-check), then align unsafe rows (prefix + best-of-N)."""

    name = "eta"
    Options = EtaOptions
    description = "ETA: CLIP + reward-model evaluation, then interference prefix and sentence best-of-N."
    strength = (  # a lower CLIP threshold and a higher reward threshold align more answers
        Strength("pre_threshold", (0.22, 0.19, 0.16, 0.13, 0.10), refine=True),
        Strength("post_threshold", (0.0, 0.03, 0.06, 0.09, 0.12), refine=True),
    )

    @classmethod
    def conformance_options(cls, model, processor, workdir):
        scorers = {"clip": {"model": "tiny-clip"}, "reward_model": {"path": "tiny-reward-model"}}
        # neutral: no image is unsafe (cosine < 1) and text-only rows pass; active: every row is
        # judged unsafe and aligned by the prefix alone (greedy, so deterministic)
        return {
            "neutral": {**scorers, "pre_threshold": 1.0, "text_only": "pass"},
            "active": {**scorers, "pre_threshold": -1.0, "post_threshold": 1e9, "alignment": "shallow_only"},
        }

    @classmethod
    def engine_work(cls, options, artifacts):
        """Inside an inference engine, only the interference prefix: the evaluation (CLIP, reward)
        and the best-of-N search need the whole answer and run in front of the engine, which
        asks the engine for the prefix on the rows it judged unsafe (``alignment: shallow_only``)."""
        if options.alignment != "shallow_only":
            raise ConfigError(
                "inside the inference engine eta is only its interference prefix, `alignment: shallow_only` "
                "(the evaluation and best-of-N run in front of the engine)",
                path="defenses.eta.alignment",
            )
        return EngineWork(answer_prefix=options.prefix)

    @classmethod
    def gateway_needs(cls, options):
        return ("extensions",)  # n candidates with top-k, and answers that continue the assistant turn

    async def around_upstream(self, call, proceed):
        from .gateway import around_upstream

        return await around_upstream(self, call, proceed)

    def around_generate(self, call, proceed):
        options, rows = self.options, range(call.batch_size)
        copies = call.setting("num_return_sequences") or 1
        if copies > 1:
            raise DefenseError(f"eta returns one answer per row; got num_return_sequences={copies}")
        records = self.records(call)
        started = time.perf_counter()
        image_embeddings, pre = self._pre_check(call)
        clip_s = time.perf_counter() - started
        checked = [row for row in rows if post_checked(options, pre[row])]
        for row, record in enumerate(records):
            if pre[row] is not None:
                record.scores["pre"] = pre[row]
            record.details.update(
                pre_unsafe=pre_unsafe(options, pre[row]), unsafe=False, aligned=False, time_s={"clip": clip_s}
            )
        if not checked:  # every image judged safe: the vanilla answer streams live
            call.pass_stream(self.name)
            return proceed()

        started = time.perf_counter()
        reuse_cache = (call.setting("num_beams") or 1) == 1
        cache = recording_cache(call.model.config) if reuse_cache else None
        output = proceed(streamer=None, **({"past_key_values": cache} if reuse_cache else {}))
        prompt_length = call.inputs["input_ids"].shape[1]
        answers = [ids.tolist() for ids in output.sequences[:, prompt_length:]]
        vanilla_s = time.perf_counter() - started

        started = time.perf_counter()
        texts = call.adapter.tokenizer.batch_decode([answers[row] for row in checked], skip_special_tokens=True)
        post = self._reward(call).score(self._user_turns(call, checked, POST_EVAL_INSTRUCTION), texts).tolist()
        reward_s = time.perf_counter() - started
        unsafe = [row for row, score in zip(checked, post) if score <= options.post_threshold]
        for row, score in zip(checked, post):
            records[row].scores["post"] = score
        for record in records:
            record.details["time_s"].update(vanilla=vanilla_s, reward=reward_s)
        call.pass_stream(self.name)  # decided: what is streamed from here on is this defense's final answer

        if unsafe and cache is None:  # beam search reorders its cache: prefill the prompts again
            cache = prefill_cache(call.generate, call.model.config, {})
        for position, row in enumerate(unsafe):
            started = time.perf_counter()
            row_cache = cache if position == len(unsafe) - 1 else copy.deepcopy(cache)
            keep_row(row_cache, row, length=prompt_length - 1)
            answers[row] = self._align(call, row, row_cache, image_embeddings[row])
            records[row].details.update(unsafe=True, aligned=True)
            records[row].decision, records[row].replaced_answer = MODIFIED, True
            records[row].details["time_s"]["align"] = time.perf_counter() - started
        return self._output(call, output, answers)

    # -- evaluation -------------------------------------------------------------------------

    def _pre_check(self, call):
        """Per row: the CLIP embeddings of its images (or None) and its pre score (max over images, or None)."""
        images = call.images
        if not any(images):
            return [None] * call.batch_size, [None] * call.batch_size
        return pre_check(self._clip(call), images)

    def _user_turns(self, call, rows, instruction):
        if self.options.reward_sees == "instruction":
            return [instruction] * len(rows)
        return [call.adapter.user_text(call.inputs["input_ids"][row]) for row in rows]

    # -- alignment ------------------------------------------------------------------------

    def _align(self, call, row: int, cache: DynamicCache, image_embedding) -> list[int]:
        """The aligned answer of one row: interference prefix, then best-of-N (per the ablation).

        ``cache`` holds the row's prompt but its last position; it is consumed.
        """
        options = self.options
        prompt = {
            name: call.inputs[name][row : row + 1] for name in ("input_ids", *GROWING_INPUTS) if name in call.inputs
        }
        budget = min(options.max_new_tokens, self._call_budget(call) or options.max_new_tokens)
        prefix = (call.adapter.response_ids(options.prefix) if options.alignment != "deep_only" else [])[:budget]
        context = extend_context(prompt, prefix)
        streamer = call.streamer if call.batch_size == 1 else None
        if streamer is not None:  # the aligned answer streams as it is decided
            streamer.put(prompt["input_ids"].cpu())
            streamer.put(torch.tensor(prefix, dtype=torch.long))

        def generate(**kwargs):  # candidates and continuations decode without the call's beams
            return call.generate(rows=[row] * kwargs["input_ids"].shape[0], **{"num_beams": 1, **kwargs})

        if len(prefix) == budget:  # the token budget ends inside the prefix: nothing left to generate
            return prefix
        if options.alignment == "shallow_only":
            output = generate(**context, past_key_values=cache, max_new_tokens=budget - len(prefix), streamer=None)
            tokens = output.sequences[0, context["input_ids"].shape[1] :].tolist()
            if streamer is not None:
                streamer.put(torch.tensor(tokens, dtype=torch.long))
            return prefix + tokens
        search = sentence_best_of_n(
            generate,
            call.adapter.tokenizer,
            context,
            self._scorer(call, row, prefix, image_embedding),
            cache=cache,
            n=options.best_of_n.n,
            top_k=options.best_of_n.top_k,
            temperature=options.best_of_n.temperature,
            max_sentence_tokens=options.best_of_n.max_sentence_tokens,
            max_new_tokens=budget - len(prefix),
            boundary=options.boundary,
            eos_token_id=call.eos_token_ids(),
            streamer=streamer,
        )
        record = call.record(self.name, row)
        record.details.update(sentences=search.sentences, candidates=search.candidates)
        record.details["time_s"].update(decode=search.decode_s, score=search.score_s)
        return prefix + search.token_ids

    @staticmethod
    def _call_budget(call) -> int | None:
        """The call's own cap on new tokens: ``max_new_tokens``, else what ``max_length`` leaves after the prompt."""
        if call.setting("max_new_tokens") is not None:
            return int(call.setting("max_new_tokens"))
        if call.setting("max_length") is not None:
            return max(1, int(call.setting("max_length")) - call.inputs["input_ids"].shape[1])
        return None

    def _scorer(self, call, row, prefix, image_embedding):
        """Score rule of docs/defenses/eta.md: reward, plus α/i · CLIP(image, sentence) after the first sentence."""
        tokenizer, reward, clip = call.adapter.tokenizer, self._reward(call), self._clip(call)
        alpha = self.options.best_of_n.alpha
        user_turn = self._user_turns(call, [row], BEST_OF_N_INSTRUCTION)[0]

        def score(candidates, index, accepted):
            responses = tokenizer.batch_decode(
                [prefix + accepted + ids for ids in candidates.token_ids], skip_special_tokens=True
            )
            rewards = reward.score([user_turn] * len(responses), responses)
            return sentence_scores(
                rewards, clip, candidates.texts, candidates.ended_with_eos, index, image_embedding, alpha
            )

        return score

    # -- helpers ----------------------------------------------------------------------------

    def _output(self, call, output, answers):
        """The batch's sequences: the prompt, then each row's answer, padded to one length."""
        prompt = call.inputs["input_ids"]
        pad = call.pad_token_id()
        width = max(map(len, answers))
        rows = [torch.tensor(answer + [pad] * (width - len(answer)), dtype=prompt.dtype) for answer in answers]
        output.sequences = torch.cat([prompt, torch.stack(rows).to(prompt.device)], dim=1)
        if call.streamer is not None:
            if not call.streamer.started:
                call.streamer.put(prompt.cpu())
                call.streamer.put(output.sequences[:, prompt.shape[1] :].cpu())
            call.streamer.end()
        return output

    def _clip(self, call):
        return self.clip(call.resources, str(call.model.device))

    def _reward(self, call):
        return self.reward(call.resources, str(call.model.device))

    def clip(self, resources, device: str):
        """The CLIP evaluator of these options (on ``clip.device``, else ``device``), loaded once per key."""
        options = self.options.clip
        device = options.device or device
        cls = _evaluator(options.evaluator, "image_safety", "clip.evaluator")
        return resources.get(
            (cls, options.backend, options.model, options.pretrained, device),
            lambda: cls.load(options.backend, options.model, options.pretrained, device),
        )

    def reward(self, resources, device: str):
        """The reward evaluator of these options (on ``reward_model.device``, else ``device``), loaded once per key."""
        options = self.options.reward_model
        device = options.device or device
        cls = _evaluator(options.evaluator, "reward", "reward_model.evaluator")
        resources.check_remote_code(options.trust_remote_code, "eta.reward_model.trust_remote_code")
        dtype = {} if options.dtype == "auto" else {"dtype": getattr(torch, options.dtype)}
        return resources.get(
            (cls, options.path, options.trust_remote_code, options.max_length, options.dtype, device),
            lambda: cls.load(
                options.path,
                trust_remote_code=options.trust_remote_code,
                max_length=options.max_length,
                device=device,
                **dtype,
            ),
        )


def _evaluator(name: str, kind: str, key: str) -> type:
    """The registered evaluator class ``name``, checked to score ``kind``."""
    registered = plugins.registry().evaluators
    if name not in registered or registered[name].cls.kind != kind:
        known = sorted(item.name for item in registered.values() if item.cls.kind == kind)
        raise DefenseError(
            f"eta: {key} names no registered {kind} evaluator {name!r}; registered: {', '.join(known) or 'none'}"
        )
    return registered[name].cls


def pre_unsafe(options: EtaOptions, pre: float | None) -> bool:
    """Whether the pre-check judged a row's images unsafe (a row without images: no)."""
    return pre is not None and pre >= options.pre_threshold


def post_checked(options: EtaOptions, pre: float | None) -> bool:
    """Whether a row goes on to the reward post-check: its images judged unsafe, or, as the options
    say, a row without images (``text_only``) or one whose images were judged safe (``safe_images``)."""
    if pre is None:
        return options.text_only == "post"
    return pre_unsafe(options, pre) or options.safe_images == "post"


def pre_check(clip, images: list[list]) -> tuple[list, list[float | None]]:
    """Per row of ``images``: the CLIP embeddings of its images (or None) and its pre score, the
    highest safety score of its images (or None for a row without images)."""
    embeddings = clip.embed_images([image for row_images in images for image in row_images])
    scores = clip.safety_scores(embeddings)
    per_row, pre, start = [], [], 0
    for row_images in images:
        stop = start + len(row_images)
        per_row.append(embeddings[start:stop] if row_images else None)
        pre.append(float(scores[start:stop].max()) if row_images else None)
        start = stop
    return per_row, pre


def uses_utility(index: int, ended_with_eos: list[bool]) -> bool:
    """Whether the i-th sentence's candidates get the CLIP utility term: not the first, and none ended."""
    return index > 1 and not any(ended_with_eos)


def sentence_scores(rewards, clip, sentences, ended, index, image_embedding, alpha):
    """The best-of-N scores of one round's candidates from their ``rewards`` (of each whole response
    so far): plus the CLIP utility of each new sentence against the image(s), best image if
    several, where ``uses_utility`` says so."""
    utilities = None
    if uses_utility(index, ended) and image_embedding is not None and alpha:
        utilities = clip.similarity(clip.embed_texts(sentences), image_embedding).max(dim=1).values
    return candidate_scores(rewards, utilities, index=index, alpha=alpha)


def candidate_scores(
    rewards: torch.Tensor, utilities: torch.Tensor | None, *, index: int, alpha: float
) -> torch.Tensor:
    """ETA's best-of-N score (docs/defenses/eta.md): ``reward + (α / i) · cos(image, sentence)``, or the
    reward alone when there is no utility term (see ``uses_utility``)."""
    if utilities is None:
        return rewards
    return rewards + alpha / index * utilities.to(rewards)
