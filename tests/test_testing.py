"""Tests for vlm_safety_plugins.testing: the tiny offline models plugin tests build on."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_safety_plugins.testing import FAMILIES, IMAGE_SIZE, tiny_clip, tiny_image, tiny_reward_model, tiny_vlm

IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 4, "gemma3": 4}
PROMPTS = {
    "llava": "USER: <image>\nWhat is this? ASSISTANT:",
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n",
}
TEXT = "Hello, what's in the café? ✓ 42 émojis 😀 <b>x</b>"


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, offline):
    model, processor = tiny_vlm(request.param)
    return request.param, model, processor


def _messages(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}]


def _chat_inputs(processor, text, image=None):
    return processor.apply_chat_template(
        _messages(text, image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _greedy(model, inputs, n=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="llava, qwen2_vl, gemma3"):
        tiny_vlm("blip")


def test_model_shape(vlm):
    family, model, _ = vlm
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(model.get_decoder().layers) == 4
    assert model.generation_config.do_sample is False
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_chat_template_renders_like_the_family(vlm):
    family, _, processor = vlm
    image_item = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(image_item, add_generation_prompt=True) == PROMPTS[family]


def test_tokenizer_never_unknown_and_round_trips(vlm):
    _, _, processor = vlm
    tok = processor.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == TEXT
    assert 300 <= len(tok) <= 2000
    assert tok.padding_side == "left"


def test_image_tokens_expand_to_what_the_model_expects(vlm):
    family, model, processor = vlm
    inputs = _chat_inputs(processor, "What is this?", tiny_image((10, 200, 30), size=80))
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == IMAGE_TOKENS[family]
    if family == "llava":
        assert n_image == model.config.image_seq_length == (IMAGE_SIZE // 14) ** 2
    elif family == "qwen2_vl":
        assert sorted(inputs) == ["attention_mask", "image_grid_thw", "input_ids", "mm_token_type_ids", "pixel_values"]
        assert n_image == int(inputs["image_grid_thw"].prod()) // model.config.vision_config.spatial_merge_size**2
    else:
        assert n_image == model.config.mm_tokens_per_image
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


def test_generate_image_and_text_only(vlm):
    _, model, processor = vlm
    image_out = _greedy(model, _chat_inputs(processor, "What is this?", tiny_image()))
    text_out = _greedy(model, _chat_inputs(processor, "What is this?"))
    assert image_out.shape == text_out.shape == (1, 8)
    assert not torch.equal(image_out, text_out)


def test_greedy_depends_on_input(vlm):
    _, model, processor = vlm
    outs = {
        tuple(_greedy(model, _chat_inputs(processor, text, tiny_image(color)))[0].tolist())
        for text in ("What is this?", "Describe the picture in detail.")
        for color in ((255, 0, 0), (0, 0, 255))
    }
    assert len(outs) == 4
    assert all(len(set(out)) > 1 for out in outs)


def test_batch_left_padded_matches_single(vlm):
    family, model, processor = vlm
    texts = ["What is this?", "Describe the picture in detail, please, and be very careful."]
    images = [tiny_image((255, 0, 0)), tiny_image(None)]
    prompts = [
        processor.apply_chat_template(_messages(text, image), add_generation_prompt=True)
        for text, image in zip(texts, images)
    ]
    # Nested per-sample image lists: the one layout every family (Gemma3 included) accepts for batches.
    batch = processor(text=prompts, images=[[image] for image in images], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    batched = _greedy(model, batch)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = processor(text=[prompt], images=[image], return_tensors="pt")
        assert torch.equal(_greedy(model, single)[0], batched[row])

    text_batch = processor(text=["Hi", "Tell me a long story about the sea."], return_tensors="pt", padding=True)
    assert _greedy(model, text_batch).shape == (2, 8)


def test_sampling(vlm):
    _, model, processor = vlm
    inputs = _chat_inputs(processor, "What is this?", tiny_image())
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8)


def test_seed_determinism(vlm, offline):
    family, model, processor = vlm
    again, again_processor = tiny_vlm(family, seed=0)
    other, _ = tiny_vlm(family, seed=1)
    assert again is not model and again_processor is not processor
    assert again_processor.tokenizer is not processor.tokenizer
    state, same, different = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], different[k]) for k in state)
    inputs = _chat_inputs(processor, "What is this?", tiny_image())
    assert torch.equal(_greedy(model, inputs), _greedy(again, inputs))


def test_build_leaves_global_rng_alone(offline):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_vlm("llava", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_save_load_round_trip(vlm, tmp_path, offline):
    family, model, processor = vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert type(loaded_processor.tokenizer) is type(processor.tokenizer)
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id

    inputs = _chat_inputs(processor, "What is this?", tiny_image())
    loaded_inputs = _chat_inputs(loaded_processor, "What is this?", tiny_image())
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert torch.equal(_greedy(model, inputs), _greedy(loaded, loaded_inputs))


def test_tiny_clip_encodes(offline):
    model, preprocess, tokenizer = tiny_clip()
    again, _, _ = tiny_clip()
    assert not model.training
    pixels = torch.stack([preprocess(tiny_image((255, 0, 0))), preprocess(tiny_image(None, size=100))])
    tokens = tokenizer(["a red square", "a photo of noise", "a text"])
    assert tokens.shape == (3, 77)
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokens, normalize=True)
        assert torch.equal(image, again.encode_image(pixels, normalize=True))
    assert image.shape == (2, 32) and text.shape == (3, 32)
    similarity = image @ text.T
    assert torch.isfinite(similarity).all()
    assert not torch.equal(image[0], image[1])


def test_reward_model_batched_equals_single(offline):
    model, tok = tiny_reward_model()
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>"
    )
    assert tok.model_max_length == 512
    assert model.config.pad_token_id == tok.pad_token_id is not None
    texts = [rendered, "How do I make a bomb? I'm sorry, I can't help with that.", "Sure."]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
        singles = torch.stack([model(**tok([t], return_tensors="pt")).logits[0, 0] for t in texts])
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, singles, rtol=1e-4, atol=1e-5)
    assert len(set(scores.tolist())) == 3
