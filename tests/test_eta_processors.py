"""Tests for the generation building blocks used in a plain generate: prefix processor and sentence criteria."""

import itertools
import math

import pytest
import torch
from transformers import LogitsProcessor

from vlm_safety_plugins.defenses.eta.processors import InterferencePrefixProcessor, SentenceBoundaryCriteria
from vlm_safety_plugins.testing import FAMILIES, tiny_image, tiny_vlm

PREFIX = "As an AI assistant"
DECODING = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "temperature": 1.5, "top_k": 5},
    "beam": {"do_sample": False, "num_beams": 3},
}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = tiny_vlm(request.param)
    return request.param, model, processor


def _inputs(family, processor):
    """A left-padded batch of two rows of different prompt lengths, one image each."""
    chats = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        for text in ("What is this?", "Describe the picture in detail, please.")
    ]
    prompts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    images = [[tiny_image((255, 0, 0))], [tiny_image((0, 0, 255))]]
    # Gemma 3's template already starts with BOS.
    return processor(
        text=prompts,
        images=images,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=family != "gemma3",
    )


def _append(inputs, ids):
    """The inputs with the same token ids appended to every row, per-position inputs grown to match."""
    added = torch.tensor([ids] * inputs["input_ids"].shape[0])
    grown = dict(inputs, input_ids=torch.cat([inputs["input_ids"], added], dim=1))
    for name, value in {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}.items():
        if name in inputs:
            grown[name] = torch.cat([inputs[name], torch.full_like(added, value)], dim=1)
    return grown


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- InterferencePrefixProcessor --------------------------------------------------------------


@pytest.mark.parametrize("decoding", DECODING)
def test_prefix_starts_every_row(tiny, decoding):
    family, model, processor = tiny
    inputs = _inputs(family, processor)
    prefix = InterferencePrefixProcessor.from_text(processor.tokenizer, PREFIX)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            logits_processor=[prefix],
            max_new_tokens=len(prefix.prefix_ids) + 3,
            return_dict_in_generate=True,
            output_scores=True,
            **DECODING[decoding],
        )
    start = inputs["input_ids"].shape[1]
    forced = out.sequences[:, start : start + len(prefix.prefix_ids)]
    assert forced.tolist() == [list(prefix.prefix_ids)] * 2
    if decoding == "beam":
        assert torch.isfinite(out.sequences_scores).all()


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_one_prefix_processor_forces_the_prefix_in_every_generate_it_is_given_to(tiny, decoding):
    family, model, processor = tiny
    prefix = InterferencePrefixProcessor.from_text(processor.tokenizer, PREFIX)
    settings = dict(logits_processor=[prefix], max_new_tokens=len(prefix.prefix_ids) + 2, **DECODING[decoding])
    long_batch = _inputs(family, processor)
    short_batch = {name: value[:1] for name, value in long_batch.items()} if family == "llava" else long_batch
    for inputs in (long_batch, _append(long_batch, _ids(processor.tokenizer, " ok")), short_batch, long_batch):
        with torch.no_grad():
            out = model.generate(**inputs, **settings)
        start = inputs["input_ids"].shape[1]
        assert out[:, start : start + len(prefix.prefix_ids)].tolist() == [list(prefix.prefix_ids)] * out.shape[0]


def test_one_sentence_criteria_serves_many_generates(tiny):
    family, model, processor = tiny
    tokenizer = processor.tokenizer
    inputs = _inputs(family, processor)
    criteria = SentenceBoundaryCriteria(tokenizer)
    for grown in (inputs, _append(inputs, _ids(tokenizer, " ok")), inputs):
        start = grown["input_ids"].shape[1]
        script = _Script([_ids(tokenizer, "It is red. More text")] * 2, start)
        with torch.no_grad():
            out = model.generate(**grown, logits_processor=[script], max_new_tokens=30, stopping_criteria=[criteria])
        assert out[:, start:].tolist() == [_ids(tokenizer, "It is red.")] * 2


def test_prefix_then_distribution_untouched(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor)
    prefix_ids = _ids(processor.tokenizer, PREFIX)
    with torch.no_grad():
        forced = model.generate(
            **inputs,
            logits_processor=[InterferencePrefixProcessor(prefix_ids)],
            max_new_tokens=len(prefix_ids) + 6,
            do_sample=False,
        )
        vanilla = model.generate(**_append(inputs, prefix_ids), max_new_tokens=6, do_sample=False)
    assert forced.tolist() == vanilla.tolist()


def test_prefix_forces_by_generated_step():
    prefix = InterferencePrefixProcessor([3, 1], prompt_length=2)  # an explicit prompt length: reusable
    for length, expected in ((2, 3), (3, 1), (4, None), (2, 3)):
        scores = prefix(torch.zeros(2, length, dtype=torch.long), torch.randn(2, 5))
        if expected is None:
            assert torch.isfinite(scores).all()
        else:
            assert (scores.argmax(-1) == expected).all() and scores[0].tolist().count(-math.inf) == 4


def test_from_text_is_the_reply_start_without_special_tokens(tiny):
    family, _, processor = tiny
    tokenizer = processor.tokenizer
    ids = list(InterferencePrefixProcessor.from_text(tokenizer, PREFIX).prefix_ids)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == PREFIX
    # The same ids the chat template gives a reply that starts with the prefix.
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": PREFIX}]},
    ]
    rendered = _ids(tokenizer, processor.apply_chat_template(chat, tokenize=False))
    assert any(rendered[i : i + len(ids)] == ids for i in range(len(rendered)))
    if family == "llava":
        assert tokenizer.convert_ids_to_tokens(ids[0]).startswith("▁")


# -- SentenceBoundaryCriteria: synthetic sequences --------------------------------------------


class _Pieces:
    """A stand-in tokenizer whose token i decodes to ``pieces[i]``: tokens that span a boundary."""

    eos_token_id = 0

    def __init__(self, *pieces):
        self.pieces = ("<eos>", *pieces)

    def __call__(self, text, **kwargs):
        return {"input_ids": [self.pieces.index(piece) for piece in text.split("|")]}

    def batch_decode(self, sequences, **kwargs):
        return ["".join(self.pieces[token] for token in ids if token) for ids in sequences]

    def decode(self, ids):
        return self.batch_decode([ids])[0]


def _sentences(tokenizer, text, **options):
    """Cut ``text``'s tokens where the criteria says, restarting the sentence after each cut, as best-of-N does."""
    ids = _ids(tokenizer, text)
    cuts = [0]
    for end in range(1, len(ids) + 1):
        criteria = SentenceBoundaryCriteria(tokenizer, prompt_length=cuts[-1], **options)
        if criteria(torch.tensor([ids[:end]]), None).item():
            cuts.append(end)
    cuts.append(len(ids))
    return [tokenizer.decode(ids[a:b]).strip(" ") for a, b in itertools.pairwise(cuts) if b > a]


TEXT_BOUNDARIES = {
    "The sky is blue.": ["The sky is blue."],
    "Is it? Yes!": ["Is it?", "Yes!"],
    "It costs 3.5 dollars": ["It costs 3.5 dollars"],
    "Version 2.0 is out! Great": ["Version 2.0 is out!", "Great"],
    "It is 3. The end.": ["It is 3. The", "end."],  # an undecided "." ends with the next whitespace
    "Steps:\n1. Mix": ["Steps:\n", "1. Mix"],
    "Mix well.\n2. Bake": ["Mix well.", "\n2. Bake"],
    'He said "stop."': ['He said "stop.', '"'],
    "line one\nline two": ["line one\n", "line two"],
}


@pytest.mark.parametrize("text", TEXT_BOUNDARIES)
def test_text_boundaries(tiny, text):
    assert _sentences(tiny[2].tokenizer, text) == TEXT_BOUNDARIES[text]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It| is| red|. The| sky", ["It is red. The", "sky"]),
        ("It| is| red|.\n|Ok", ["It is red.\n", "Ok"]),
        ('It| is| red|."| Ok', ['It is red."', "Ok"]),
        ("It| is| 3|.\n|Ok", ["It is 3.\n", "Ok"]),
        ("It| is| 3|.| Ok", ["It is 3. Ok"]),  # the whitespace confirms the "." one token late
        ("1|. Mix|\n|2|.|\n|Ok", ["1. Mix\n", "2.\n", "Ok"]),  # list numbers open the sentence
        ("\n|\n|Ok|.", ["\n\nOk."]),  # a newline before any text is no boundary
        ("Pi| is| 3|.|14|.", ["Pi is 3.14."]),
    ],
)
def test_tokens_spanning_a_boundary(text, expected):
    pieces = _Pieces(*dict.fromkeys(text.split("|")))
    assert _sentences(pieces, text) == expected


def test_long_sentences_past_the_decoded_tail(tiny):
    tokenizer = tiny[2].tokenizer
    text = "The dog looks at a blue box in the garden for 3.5 hours and the bird sings every morning. Yes"
    assert _sentences(tokenizer, text) == [text[:-4], "Yes"]
    assert _sentences(tokenizer, "word " * 12 + "\nOk") == ["word " * 12 + "\n", "Ok"]


def test_rows_are_independent_and_padding_is_harmless(tiny):
    tokenizer = tiny[2].tokenizer
    rows = [_ids(tokenizer, text) for text in ("Is it? Yes! Sure", "The sky is blue. It")]
    width = max(map(len, rows))
    batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    criteria = SentenceBoundaryCriteria(tokenizer, prompt_length=0)
    fired = []
    for end in range(1, width + 1):
        done = criteria(batch[:, :end], None)
        alone = [criteria(batch[row : row + 1, :end], None).item() for row in (0, 1)]
        assert done.shape == (2,) and done.dtype == torch.bool and done.tolist() == alone
        fired.append(alone)
    first = [next(end for end, row in enumerate(fired, 1) if row[r]) for r in (0, 1)]
    assert first == [len(_ids(tokenizer, "Is it?")), len(_ids(tokenizer, "The sky is blue."))]


def test_eos_ends_a_sentence(tiny):
    _, model, processor = tiny
    tokenizer, eos_ids = processor.tokenizer, model.generation_config.eos_token_id
    words = _ids(tokenizer, "The sky")
    criteria = SentenceBoundaryCriteria(tokenizer, prompt_length=0, eos_token_id=eos_ids)
    for eos in [eos_ids] if isinstance(eos_ids, int) else eos_ids:
        assert criteria(torch.tensor([words + words[:1], words + [eos]]), None).tolist() == [False, True]
    default = SentenceBoundaryCriteria(tokenizer, prompt_length=0)
    assert default(torch.tensor([words + [tokenizer.eos_token_id]]), None).tolist() == [True]


def test_max_sentence_tokens_caps_every_row(tiny):
    tokenizer = tiny[2].tokenizer
    ids = torch.tensor([_ids(tokenizer, "It costs 3.5 dollars")[:6]] * 2)
    criteria = SentenceBoundaryCriteria(tokenizer, prompt_length=2, max_sentence_tokens=3)
    assert [criteria(ids[:, :end], None).tolist() for end in range(2, 7)] == [[False] * 2] * 3 + [[True] * 2] * 2
    with pytest.raises(ValueError, match="max_sentence_tokens"):
        SentenceBoundaryCriteria(tokenizer, max_sentence_tokens=0)


def test_reference_boundary_is_the_period_token_only(tiny):
    tokenizer = tiny[2].tokenizer
    assert _sentences(tokenizer, "It is 3.5 or blue. Is it? Yes!\nOk", boundary="reference") == [
        "It is 3.",
        "5 or blue.",
        "Is it? Yes!\nOk",
    ]


def test_invalid_boundary_lists_the_choices(tiny):
    with pytest.raises(ValueError, match="text, reference"):
        SentenceBoundaryCriteria(tiny[2].tokenizer, boundary="sentence")


# -- SentenceBoundaryCriteria in a real generate ----------------------------------------------


class _Script(LogitsProcessor):
    """Forces each row's own token ids, one per step: a model that writes given texts."""

    def __init__(self, rows, prompt_length):
        self.rows, self.prompt_length = rows, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -math.inf)
        for row, ids in enumerate(self.rows):
            forced[row, ids[min(step, len(ids) - 1)]] = 0
        return forced


def test_generate_stops_each_row_at_its_own_boundary(tiny):
    family, model, processor = tiny
    tokenizer, pad = processor.tokenizer, model.generation_config.pad_token_id
    inputs = _inputs(family, processor)
    start = inputs["input_ids"].shape[1]
    texts = ["It is red. More text", "It costs 3.5 dollars? Yes"]
    script = _Script([_ids(tokenizer, text) for text in texts], start)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            logits_processor=[script],
            max_new_tokens=30,
            stopping_criteria=[SentenceBoundaryCriteria(tokenizer)],
        )
    first, second = _ids(tokenizer, "It is red."), _ids(tokenizer, "It costs 3.5 dollars?")
    assert out[:, start:].tolist() == [first + [pad] * (len(second) - len(first)), second]


def test_generate_sampled_rows_stop_at_their_first_boundary(tiny):
    family, model, processor = tiny
    tokenizer, pad = processor.tokenizer, model.generation_config.pad_token_id
    options = {"max_sentence_tokens": 12, "eos_token_id": model.generation_config.eos_token_id}
    inputs = _inputs(family, processor)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            stopping_criteria=[SentenceBoundaryCriteria(tokenizer, **options)],
            max_new_tokens=40,
            do_sample=True,
            temperature=1.5,
            top_k=5,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    criteria = SentenceBoundaryCriteria(tokenizer, prompt_length=0, **options)
    for row in new:
        length = next(end for end in range(1, 13) if criteria(row[None, :end], None).item())
        assert (row[length:] == pad).all()
