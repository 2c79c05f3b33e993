"""Tokenizers of the testbed models, trained on the world's sentences so that its words are single tokens.

Each mimics its real counterpart's kind: the VLM's is LLaVA's (Llama SentencePiece-style
BPE with byte fallback, ``<image>`` and ``<pad>`` appended), the reward model's is
Llama-3's (byte-level BPE, header/eot chat markup), CLIP's is open_clip's
``SimpleTokenizer`` over a merges file of our own. Training is seeded by the corpus
order alone, so the same corpus gives the same vocabulary.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..testing import ALPHABET, BYTE_TOKENS, LLAMA3_TEMPLATE
from . import world

_RM_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>")  # fmt: skip


def _general_sentences() -> list[str]:
    """A little ordinary English, so text outside the world still tokenizes into words and pieces."""
    from ..testing import corpus

    return list(corpus())


def _train_bpe(tokenizer, corpus: list[str], specials: list[str], alphabet: list[str], vocab_size: int, **extra):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False, **extra
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return json.loads(tokenizer.to_str())["model"]


def vlm_tokenizer(vocab_size: int = 1000):
    """A LLaVA-style tokenizer: BOS ``<s>``, EOS ``</s>``, ``<image>`` and ``<pad>`` after the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    # Punctuation kept apart at training time, so that "bomb." is "▁bomb" + "." as in Llama's vocabulary.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    # Whole chat turns, so that words are learnt with the spaces they have in context.
    corpus = [f"USER: {request} ASSISTANT: {answer}" for request, answer in world.dialogues()] + _general_sentences()
    trained = _train_bpe(bpe, corpus, ["<unk>", "<s>", "</s>", *BYTE_TOKENS], ALPHABET + ["▁"], vocab_size)
    vocab = trained["vocab"]
    vocab.update({token: len(vocab) + i for i, token in enumerate(("<image>", "<pad>"))})
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    llama = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens=["<image>"], **specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=llama.backend_tokenizer, extra_special_tokens=["<image>"], padding_side="left", **specials
    )


def reward_tokenizer(vocab_size: int = 800):
    """A Llama-3-style byte-level BPE tokenizer with its chat template, right padding, 512 tokens max."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = world.texts() + _general_sentences() + [POST_EVAL_INSTRUCTION, BEST_OF_N_INSTRUCTION] * 20
    trained = _train_bpe(bpe, corpus, [], pre_tokenizers.ByteLevel.alphabet(), vocab_size)
    vocab = trained["vocab"]
    vocab.update({token: len(vocab) + i for i, token in enumerate(_RM_SPECIALS)})
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", extra_special_tokens=[_RM_SPECIALS[1], _RM_SPECIALS[3], _RM_SPECIALS[4]],
        add_bos_token=True, chat_template=LLAMA3_TEMPLATE, model_max_length=512, padding_side="right",
    )  # fmt: skip


def write_clip_merges(path: Path, captions: list[str], vocab_size: int = 1200) -> Path:
    """Train CLIP-style BPE merges (byte-level, ``</w>`` word ends) on ``captions``; write open_clip's gzip format.

    ``open_clip.SimpleTokenizer(bpe_path=path)`` then has 512 byte tokens, one token per
    merge and its two specials: a vocabulary of ``515 + merges`` instead of 49408.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    # SimpleTokenizer's word pattern, then bytes mapped to unicode as in CLIP (and GPT-2).
    words = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(words), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trained = _train_bpe(bpe, captions, [], alphabet, vocab_size, end_of_word_suffix="</w>")
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]
    path = Path(path)
    with gzip.GzipFile(path, "wb", mtime=0) as file:
        file.write("\n".join(["#version: 0.2", *merges]).encode("utf-8"))
    return path


def clip_tokenizer(merges_path: Path):
    """open_clip's ``SimpleTokenizer`` over the testbed's merges (context length 77)."""
    import open_clip

    return open_clip.SimpleTokenizer(bpe_path=str(merges_path), context_length=77)
