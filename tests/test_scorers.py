"""The ETA scorer backends on tiny real models: CLIP (open_clip and transformers) and a reward model."""

import copy
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlm_safety_plugins.scorers import ModelLoadError, builtin
from vlm_safety_plugins.scorers.clip import SAFETY_PROMPT, ClipScorer
from vlm_safety_plugins.scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION, RewardScorer
from vlm_safety_plugins.testing import tiny_clip, tiny_image, tiny_reward_model

# Words that CLIP's BPE keeps as one token each, so "n words" is "n tokens".
ONE_TOKEN_WORDS = "cat dog red car sun sea tree house bird fish".split()
CONTEXT = 77  # CLIP's text context: start token + 75 tokens + end token
TEXTS = ["a red square", "a photo of a cat", SAFETY_PROMPT]


def tiny_transformers_clip(seed: int = 0):
    """A tiny random transformers ``CLIPModel`` + ``CLIPProcessor``, with CLIP's real BPE built offline.

    The tokenizer takes its vocabulary and merges from the BPE file bundled with open_clip
    (the same as OpenAI CLIP's), so both backends tokenise identically.
    """
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def open_clip_parts():
    return tiny_clip()


@pytest.fixture(scope="module")
def transformers_parts():
    return tiny_transformers_clip()


@pytest.fixture(params=["open_clip", "transformers"])
def backend(request, open_clip_parts, transformers_parts):
    """(a fresh scorer, the name of the model's text method, raw unnormalised features of images and texts)."""
    if request.param == "open_clip":
        model, preprocess, tokenizer = open_clip_parts
        raw = SimpleNamespace(
            images=lambda images: model.encode_image(torch.stack([preprocess(image) for image in images])),
            texts=lambda texts: model.encode_text(tokenizer(texts)),
        )
        return ClipScorer.from_open_clip(*open_clip_parts), "encode_text", raw
    model, processor = transformers_parts
    raw = SimpleNamespace(
        images=lambda images: model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output,
        texts=lambda texts: (
            model.get_text_features(**processor.tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        ),
    )
    return ClipScorer.from_transformers(*transformers_parts), "get_text_features", raw


@pytest.fixture(scope="module")
def images():
    return [tiny_image((255, 0, 0)), tiny_image(None), tiny_image((10, 200, 40), size=40)]


def test_embeddings_are_unit_norm_float32(backend, images):
    scorer, _, _ = backend
    for embeddings, count in ((scorer.embed_images(images), len(images)), (scorer.embed_texts(TEXTS), len(TEXTS))):
        assert embeddings.dtype == torch.float32 and embeddings.shape == (count, 32)
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(count))


def test_image_in_a_batch_equals_the_image_alone(backend, images):
    scorer, _, _ = backend
    batched = scorer.embed_images(images)
    for row, image in enumerate(images):
        torch.testing.assert_close(batched[row], scorer.embed_images([image])[0], atol=1e-5, rtol=0)
    scorer.batch_size = 2  # chunked: 2 + 1
    torch.testing.assert_close(scorer.embed_images(images), batched, atol=1e-5, rtol=0)


def test_similarity_is_the_plain_cosine_of_the_raw_features(backend, images):
    scorer, _, raw = backend
    with torch.no_grad():
        expected = F.cosine_similarity(raw.images(images)[:, None], raw.texts(TEXTS)[None], dim=-1)
    similarity = scorer.similarity(scorer.embed_images(images), scorer.embed_texts(TEXTS))
    assert similarity.shape == (len(images), len(TEXTS))
    torch.testing.assert_close(similarity, expected, atol=1e-5, rtol=0)
    assert similarity.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(scorer.safety_scores(images), expected[:, TEXTS.index(SAFETY_PROMPT)], atol=1e-5, rtol=0)


def test_text_longer_than_the_context_is_truncated(backend, images):
    scorer, _, _ = backend
    words = [ONE_TOKEN_WORDS[i % len(ONE_TOKEN_WORDS)] for i in range(500)]
    long_text, truncated = " ".join(words), " ".join(words[: CONTEXT - 2])
    long_and_short = scorer.embed_texts([long_text, "a cat"])
    torch.testing.assert_close(long_and_short[0], scorer.embed_texts([truncated])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(long_and_short[1], scorer.embed_texts(["a cat"])[0], atol=1e-5, rtol=0)
    image_embeddings = scorer.embed_images(images)
    torch.testing.assert_close(
        scorer.safety_scores(image_embeddings, prompt=long_text),
        scorer.safety_scores(image_embeddings, prompt=truncated),
        atol=1e-5,
        rtol=0,
    )


def test_safety_prompt_is_encoded_once_and_images_once_per_call(backend, images, monkeypatch):
    scorer, text_method, _ = backend
    calls = {"text": 0}
    encode_text = getattr(scorer.model, text_method)

    def counting(*args, **kwargs):
        calls["text"] += 1
        return encode_text(*args, **kwargs)

    monkeypatch.setattr(scorer.model, text_method, counting)
    first = scorer.safety_scores(images)
    for _ in range(3):
        torch.testing.assert_close(scorer.safety_scores(images), first)
    assert calls["text"] == 1
    embeddings = scorer.embed_images(images)
    torch.testing.assert_close(scorer.safety_scores(embeddings), first, atol=1e-6, rtol=0)
    assert calls["text"] == 1


def test_bfloat16_model_gets_matching_inputs_and_gives_float32(open_clip_parts, transformers_parts, images):
    model, preprocess, tokenizer = open_clip_parts
    pairs = [
        (
            ClipScorer.from_open_clip(*open_clip_parts),
            ClipScorer.from_open_clip(copy.deepcopy(model).to(torch.bfloat16), preprocess, tokenizer),
        ),
        (
            ClipScorer.from_transformers(*transformers_parts),
            ClipScorer.from_transformers(
                copy.deepcopy(transformers_parts[0]).to(torch.bfloat16), transformers_parts[1]
            ),
        ),
    ]
    for full, low in pairs:
        scores = low.safety_scores(images)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, full.safety_scores(images), atol=0.05, rtol=0)


def test_transformers_clip_loads_from_a_local_directory(transformers_parts, images, tmp_path):
    for part in transformers_parts:
        part.save_pretrained(tmp_path)
    loaded = ClipScorer.load("transformers", str(tmp_path), device="cpu")
    torch.testing.assert_close(
        loaded.safety_scores(images), ClipScorer.from_transformers(*transformers_parts).safety_scores(images)
    )


def test_load_by_name_fails_fast_with_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-clip")
    cases = [
        (dict(backend="open_clip", model="No-Such-CLIP"), "No-Such-CLIP"),
        (dict(backend="open_clip", model="ViT-B-32", pretrained=missing), missing),
        (dict(backend="transformers", model=missing), missing),
    ]
    for kwargs, named in cases:
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match=kwargs["backend"]) as error:
            ClipScorer.load(**kwargs)
        assert time.perf_counter() - start < 5
        assert named in str(error.value) and error.value.__cause__ is None and error.value.__suppress_context__
    with pytest.raises(ValueError, match="unknown CLIP backend 'clip'; expected one of: open_clip, transformers"):
        ClipScorer.load(backend="clip")


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------

RESPONSES = ["I can't help with that.", "Sure.", "The capital of France is Paris. " * 8, "No", "Step one: " * 20]


@pytest.fixture(scope="module")
def reward_parts():
    return tiny_reward_model()


class ArmoRMLike(torch.nn.Module):
    """Our own stand-in for ArmoRM: its output has a ``score`` (n, 1) that differs from the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        logits = self.model(**inputs).logits
        return SimpleNamespace(logits=logits, score=1 - 2 * logits)


def test_batched_scores_equal_one_by_one(reward_parts):
    instructions = [POST_EVAL_INSTRUCTION] * 3 + ["What is the capital of France?", BEST_OF_N_INSTRUCTION]
    single = RewardScorer(*reward_parts, batch_size=1).score(instructions, RESPONSES)
    assert single.dtype == torch.float32 and single.shape == (len(RESPONSES),) and single.unique().numel() > 1
    for batch_size in (2, 16):
        batched = RewardScorer(*reward_parts, batch_size=batch_size).score(instructions, RESPONSES)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="got 5 instructions for 4 responses"):
        RewardScorer(*reward_parts, batch_size=1).score(instructions, RESPONSES[:4])


def test_score_attribute_is_preferred_to_logits(reward_parts):
    model, tokenizer = reward_parts
    instructions = [POST_EVAL_INSTRUCTION] * len(RESPONSES)
    plain = RewardScorer(model, tokenizer).score(instructions, RESPONSES)
    torch.testing.assert_close(RewardScorer(ArmoRMLike(model), tokenizer).score(instructions, RESPONSES), 1 - 2 * plain)


def test_pairs_render_as_a_two_turn_chat(reward_parts):
    [text] = RewardScorer(*reward_parts).render(["Is it safe?"], ["Yes, it is."])
    assert text.index("Is it safe?") < text.index("assistant") < text.index("Yes, it is.")


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_tokenized_pairs_start_with_exactly_one_bos(reward_parts, template_writes_bos, monkeypatch):
    model, tokenizer = reward_parts
    if not template_writes_bos:  # then the tokenizer must add it
        monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template.replace("{{ bos_token }}", ""))
    scorer = RewardScorer(model, tokenizer)
    assert scorer.render(["Is it safe?"], ["Yes."])[0].startswith(tokenizer.bos_token) == template_writes_bos
    ids = scorer.tokenize(["Is it safe?"], ["Yes."])["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_inputs_are_truncated_to_max_length(reward_parts):
    model, tokenizer = reward_parts
    assert RewardScorer(model, tokenizer).max_length == 512  # capped by the tokenizer's model_max_length
    scorer = RewardScorer(model, tokenizer, max_length=64)
    long_response = "x" * 10_000
    assert scorer.tokenize([POST_EVAL_INSTRUCTION], [long_response])["input_ids"].shape == (1, 64)
    assert scorer.score([POST_EVAL_INSTRUCTION] * 2, [long_response, "No"]).shape == (2,)


def test_reward_model_loads_from_a_local_directory(reward_parts, tmp_path):
    for part in reward_parts:
        part.save_pretrained(tmp_path)
    loaded = RewardScorer.load(str(tmp_path), device="cpu", max_length=64)
    assert loaded.max_length == 64
    torch.testing.assert_close(
        loaded.score(["Is it safe?"] * 2, RESPONSES[:2]),
        RewardScorer(*reward_parts).score(["Is it safe?"] * 2, RESPONSES[:2]),
    )


def test_loading_a_missing_reward_model_fails_fast_with_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-reward-model")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not load reward model") as error:
        RewardScorer.load(missing)
    assert time.perf_counter() - start < 5
    assert missing in str(error.value) and error.value.__cause__ is None


def test_builtin_plugin_registers_both_evaluators():
    registered = []
    builtin.register_evaluators(registered.append)
    assert [(cls, cls.name, cls.kind) for cls in registered] == [
        (ClipScorer, "clip", "image_safety"),
        (RewardScorer, "reward_model", "reward"),
    ]
    assert "pricacy" in POST_EVAL_INSTRUCTION and "reject to the question" in POST_EVAL_INSTRUCTION


def test_builtin_scorers_implement_their_kinds_protocol():
    from vlm_safety_plugins.scorers.base import ImageSafetyScorer, ResponseRewardScorer

    clip, reward = ClipScorer.from_open_clip(*tiny_clip()), RewardScorer(*tiny_reward_model())
    assert isinstance(clip, ImageSafetyScorer) and not isinstance(clip, ResponseRewardScorer)
    assert isinstance(reward, ResponseRewardScorer) and not isinstance(reward, ImageSafetyScorer)
