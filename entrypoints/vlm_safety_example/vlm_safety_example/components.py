"""The example plugin's classes: a keyword-ban defense and a word-count reward evaluator.

Kept apart from ``plugin.py`` so that loading the plugin (which ``vlm-safety --help`` does)
imports nothing heavy; the hooks there import this module when the registry is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from vlm_safety_plugins import MODIFIED, Defense, Evaluator, option


@dataclass(frozen=True)
class KeywordOptions:
    keywords: list[str] = option(
        doc="Words the answer must not contain (case-sensitive). The first token "
        "of each, as it appears after a space, is banned."
    )


class BanTokens(LogitsProcessor):
    """Sets the scores of ``token_ids`` to -inf at every step.

    It also counts, per input row, the steps where a banned token had the highest score,
    i.e. where the ban changed what greedy decoding would have picked; such rows are
    marked ``modified`` in their DefenseRecord.

    Args:
        token_ids: the vocabulary ids to ban.
        records: one DefenseRecord per input row (rows of ``scores`` may repeat each input
            row, for ``num_return_sequences`` or beams).
    """

    def __init__(self, token_ids, records):
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)
        self.records = records

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        banned = self.token_ids.to(scores.device)
        copies = scores.shape[0] // len(self.records)
        for index in torch.isin(scores.argmax(dim=-1), banned).nonzero().flatten().tolist():
            record = self.records[index // copies]
            record.decision = MODIFIED
            record.details["blocked_steps"] += 1
        scores = scores.clone()
        scores[:, banned] = float("-inf")
        return scores


class KeywordRefusal(Defense):
    """Keeps configured keywords out of the answer by banning the first token of each.

    A keyword whose first token is a common prefix (``▁b``) bans every word starting
    with it; a real defense would ban whole token sequences.
    """

    name = "keyword_refusal"
    Options = KeywordOptions
    description = "Bans the first token of each configured keyword from the answer (example plugin)."

    @classmethod
    def conformance_options(cls, model, processor, workdir):
        return {"neutral": {"keywords": []}, "active": {"keywords": ["the", "a", "is", "and"]}}

    def logits_processors(self, call):
        token_ids = sorted({call.adapter.continuation_ids(" " + word)[0] for word in self.options.keywords})
        records = self.records(call)
        for record in records:
            record.details["banned_token_ids"] = token_ids
            record.details.setdefault("blocked_steps", 0)
        return [BanTokens(token_ids, records)]


class LengthEvaluator(Evaluator):
    """Scores each response by its number of words: a stand-in for a real reward model.

    It has the ``reward`` kind's interface, so ETA can use it by name:
    ``reward_model: {evaluator: length_evaluator}``.
    """

    name = "length_evaluator"
    kind = "reward"
    description = "Example reward: the number of words in each response."

    @classmethod
    def load(cls, path: str, **settings) -> LengthEvaluator:
        """Nothing to load: the reward kind's loader, with its arguments ignored."""
        return cls()

    def score(self, instructions: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(response.split())) for response in responses])
