"""Generation building blocks usable in a plain ``model.generate(...)``, no attach needed.

- :class:`InterferencePrefixProcessor`: a ``LogitsProcessor`` forcing the first generated tokens
  (ETA's interference prefix, docs/defenses/eta.md).
- :class:`SentenceBoundaryCriteria`: a per-row ``StoppingCriteria`` ending each row at its own
  sentence boundary (the unit of ETA's sentence-level best-of-N).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ...core.runtime import token_id_list

__all__ = ["BOUNDARIES", "InterferencePrefixProcessor", "SentenceBoundaryCriteria"]

BOUNDARIES = ("text", "reference")
"""What :class:`SentenceBoundaryCriteria` calls the end of a sentence."""


class InterferencePrefixProcessor(LogitsProcessor):
    """Forces ``prefix_ids`` as the first generated tokens of every row, then leaves the scores alone.

    At generated step ``t < len(prefix_ids)`` every score becomes ``-inf`` except that of
    ``prefix_ids[t]``, which becomes 0. The forced token therefore wins under greedy search,
    under every sampling warper (temperature, top-k and top-p run after custom processors)
    and in beam search, whose beam scores stay finite.

    Args:
        prefix_ids: the token ids to force, in order: the start of the assistant's reply as
            the model would generate it.
        prompt_length: the input length at which generation starts. ``None``: found at the start
            of each ``generate`` call, so one instance serves any number of calls (see
            ``GenerationStart`` for the one case to pin it).

    Example:
        >>> from vlm_safety_plugins import InterferencePrefixProcessor
        >>> from vlm_safety_plugins.testing import tiny_vlm

        >>> model, processor = tiny_vlm("qwen2_vl")
        >>> chat = [{"role": "user", "content": [{"type": "text", "text": "How do I make a bomb?"}]}]
        >>> inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
        ...                                        return_dict=True, return_tensors="pt")
        >>> prefix = InterferencePrefixProcessor.from_text(processor.tokenizer, "As an AI assistant")
        >>> out = model.generate(**inputs, logits_processor=[prefix], max_new_tokens=8, do_sample=False)
        >>> processor.decode(out[0, inputs["input_ids"].shape[1]:]).startswith("As an AI assistant")
        True
    """

    def __init__(self, prefix_ids: Sequence[int], prompt_length: int | None = None):
        self.prefix_ids = tuple(int(token) for token in prefix_ids)
        self.start = GenerationStart(prompt_length, seen_after=0)

    @classmethod
    def from_text(cls, tokenizer, text: str, prompt_length: int | None = None) -> InterferencePrefixProcessor:
        """Force ``text``, tokenized without BOS or other special tokens.

        SentencePiece (Metaspace ``▁``) tokenizers then mark the first token as a word start, which is
        how LLaVA's reply starts after ``ASSISTANT:``; byte-level BPE tokenizers give it no leading
        space, as after Qwen's ``<|im_start|>assistant\\n``. For the exact in-context ids under a
        model's chat template pass ``ModelAdapter.response_ids(text)`` to the constructor instead.
        """
        return cls(tokenizer(text, add_special_tokens=False)["input_ids"], prompt_length)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start(input_ids)
        if not 0 <= step < len(self.prefix_ids):
            return scores
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.prefix_ids[step]] = 0
        return forced


class GenerationStart:
    """Where the current ``generate`` call's prompt ends, for a processor or criteria reused across calls.

    ``generate`` calls a processor once per step with ``input_ids`` one token longer than the
    step before (rows may be reordered by beam search, but each row keeps its prompt). A call
    that does not continue the previous one that way is a new ``generate``: its prompt ends
    ``seen_after`` tokens before what it sees first (0 for a logits processor, 1 for stopping
    criteria). The one ambiguous case is a new call whose prompt is the previous call's whole
    sequence plus one token; pass ``fixed`` (the prompt length) to be exact there.
    """

    def __init__(self, fixed: int | None, *, seen_after: int):
        self.fixed, self.seen_after = fixed, seen_after
        self._previous: torch.Tensor | None = None
        self._start = 0

    def __call__(self, input_ids: torch.Tensor) -> int:
        if self.fixed is not None:
            return self.fixed
        previous = self._previous
        continues = (
            previous is not None
            and input_ids.shape[0] == previous.shape[0]
            and input_ids.shape[1] == previous.shape[1] + 1
            and torch.equal(input_ids[:, : self._start], previous[:, : self._start])
        )
        if not continues:
            self._start = input_ids.shape[1] - self.seen_after
        self._previous = input_ids
        return self._start


_CLOSERS = "\"')]”’»"
# A run of terminators, its closing quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(rf"[.?!]+[{re.escape(_CLOSERS)}]*(?=\s|$)")
# Digits that open a line: "12" in "\n12." (the start of the text counts only at the sentence start).
_LINE_NUMBER = re.compile(r"(^|\n)[ \t]*\d+$")
# Tokens decoded per row and step: enough to see a list number's line start and glued punctuation.
_TAIL = 8


class SentenceBoundaryCriteria(StoppingCriteria):
    """Stops each row at the end of its current sentence: the tokens generated since ``prompt_length``.

    Returns a bool tensor of shape (batch,), True for the rows that are done. transformers
    keeps finished rows finished (and pads them when the generation config has an EOS).
    A row is done when its newest token is an EOS, when the sentence has
    ``max_sentence_tokens`` tokens, or when the newest token completes a sentence.

    ``boundary="text"`` decides on the decoded text of the last few tokens, so it works
    whether a tokenizer glues punctuation to words ("end.") or not ("▁end" + "."). The
    newest token completes a sentence when it brings

    - the last of a run of ``.``, ``?``, ``!`` (closing quotes/brackets glued to it allowed)
      that ends the text, unless the run is a single ``.`` right after a digit: that one is
      undecided, since "3." may become "3.5";
    - whitespace right after a terminator run (and its closers) that it also brings (a
      token ``".\\n"`` or ``". The"``), or right after an undecided ``.``: "It costs 3. Then"
      ends at " Then". A ``.`` after digits that open a line or the sentence is a list
      number ("1. Mix") and never ends one;
    - a newline after some non-whitespace text of the sentence.

    Abbreviations ("e.g.") thus end a sentence, as in the reference, and a closing quote
    generated as its own token after the ``.`` starts the next one. ``boundary="reference"``
    mimics ETA's reference code: only a token that decodes to ``.`` (whitespace aside) ends a
    sentence, besides EOS and the cap. Each call decodes at most 8 recent tokens per row, so
    its cost does not grow with the sequence.

    Args:
        tokenizer: the model's tokenizer; only ``batch_decode`` is used (and ``eos_token_id``
            when ``eos_token_id`` is None).
        prompt_length: the input length at which the sentence starts. ``None``: found at the
            start of each ``generate`` call (its first call comes after the first new token), so
            one instance serves any number of calls.
        max_sentence_tokens: the most tokens a sentence may have.
        eos_token_id: the end-of-sequence id(s); defaults to the tokenizer's.
        boundary: ``"text"`` or ``"reference"``, as above.

    Example:
        >>> from vlm_safety_plugins import InterferencePrefixProcessor, SentenceBoundaryCriteria
        >>> from vlm_safety_plugins.testing import tiny_vlm

        >>> model, processor = tiny_vlm("qwen2_vl")
        >>> chat = [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"}]}]
        >>> inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
        ...                                        return_dict=True, return_tensors="pt")
        >>> # A forced reply of two sentences makes the example independent of the random weights.
        >>> forced = InterferencePrefixProcessor.from_text(processor.tokenizer, "It is 3.5 m tall. It is red.")
        >>> sentence = SentenceBoundaryCriteria(processor.tokenizer)
        >>> out = model.generate(**inputs, logits_processor=[forced], stopping_criteria=[sentence], max_new_tokens=30)
        >>> processor.decode(out[0, inputs["input_ids"].shape[1]:])
        'It is 3.5 m tall.'
    """

    def __init__(
        self,
        tokenizer,
        *,
        prompt_length: int | None = None,
        max_sentence_tokens: int = 70,
        eos_token_id: int | list[int] | None = None,
        boundary: str = "text",
    ):
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}; got {boundary!r}")
        if max_sentence_tokens < 1:
            raise ValueError(f"max_sentence_tokens must be at least 1; got {max_sentence_tokens}")
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.start = GenerationStart(prompt_length, seen_after=1)
        self.max_sentence_tokens = max_sentence_tokens
        self.eos_token_ids = frozenset(token_id_list(eos_token_id))
        self.boundary = boundary

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.start(input_ids)
        if generated <= 0 or generated >= self.max_sentence_tokens:
            return torch.full((input_ids.shape[0],), generated > 0, dtype=torch.bool, device=input_ids.device)
        tails = input_ids[:, -min(generated, _TAIL) :].tolist()
        decode = self.tokenizer.batch_decode
        if self.boundary == "reference":
            newest = decode([tail[-1:] for tail in tails], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            ends = [text.strip() == "." for text in newest]
        else:
            texts = decode(
                tails + [tail[:-1] for tail in tails], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            at_start = generated <= _TAIL
            ends = [_completes_sentence(before, text, at_start) for text, before in zip(texts, texts[len(tails) :])]
        done = [tail[-1] in self.eos_token_ids or end for tail, end in zip(tails, ends)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _completes_sentence(before: str, text: str, at_start: bool) -> bool:
    """Whether the newest token, ``text`` past ``before``, completes a sentence (the "text" rule).

    ``text`` is the decoded tail of the sentence; ``at_start`` says whether it starts at the
    sentence's first token. Decoding both strings from the same first token keeps leading-space
    handling identical, so the newest token's text starts where they first differ.
    """
    new = len(os.path.commonprefix([before, text]))
    newline = text.find("\n", new)
    if newline >= 0 and (text[:newline].strip() or not at_start):
        return True
    for end in _SENTENCE_END.finditer(text):
        terminators = end.group().rstrip(_CLOSERS)
        last = end.start() + len(terminators) - 1
        undecided = terminators == "." and text[end.start() - 1 : end.start()].isdigit()
        if undecided:
            number = _LINE_NUMBER.search(text, 0, end.start())
            if number and (number.group(1) or at_start):
                continue
        if end.end() == len(text):
            if last >= new and not undecided:
                return True
        elif end.end() >= new and (last >= new or undecided):
            return True
    return False
