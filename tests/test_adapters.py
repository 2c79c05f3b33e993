"""Model adapters: structure, the three views of a request, turn positions, raw images."""

import sys
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core.adapters import ModelAdapter, find_adapter
from vlm_safety_plugins.core.adapters.gemma3 import Gemma3Adapter
from vlm_safety_plugins.core.adapters.llava import LlavaAdapter
from vlm_safety_plugins.core.adapters.qwen2_vl import Qwen2VLAdapter
from vlm_safety_plugins.testing.conformance import REFUSAL

from .conftest import assert_same_tokens, batch, generation

EXPECTED = {"llava": LlavaAdapter, "qwen2_vl": Qwen2VLAdapter, "gemma3": Gemma3Adapter}


def lora(model):
    torch.manual_seed(0)  # LoRA weights are random (init_lora_weights=False): same adapter in any test order
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


def test_family_adapter_and_decoder_layers(vlm, family):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    assert type(adapter) is EXPECTED[family]
    layers = adapter.decoder_layers()
    assert len(layers) == model.config.get_text_config().num_hidden_layers
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
    assert adapter.hidden_size() == model.config.get_text_config().hidden_size


def test_decoder_layers_through_peft(vlm, family):
    model, processor = vlm
    base_layers = find_adapter(model, processor).decoder_layers()
    wrapped = lora(model)
    adapter = find_adapter(wrapped, processor)
    assert type(adapter) is EXPECTED[family]
    assert [id(layer) for layer in adapter.decoder_layers()] == [id(layer) for layer in base_layers]


def test_real_blank_noise_and_text_only_views(vlm, family, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    request = [("What is in the picture?", red_image)]
    views = {mode: adapter.build_inputs(request, image_mode=mode) for mode in ("real", "blank", "noise", "none")}
    image_tokens = {mode: int(adapter.image_token_mask(v["input_ids"]).sum()) for mode, v in views.items()}
    assert image_tokens["real"] > 0 and image_tokens["none"] == 0 and "pixel_values" not in views["none"]
    assert image_tokens["blank"] == image_tokens["noise"] == image_tokens["real"]
    assert_same_tokens(views["blank"]["input_ids"], views["real"]["input_ids"])
    real, blank, noise = (views[mode]["pixel_values"] for mode in ("real", "blank", "noise"))
    assert not torch.equal(real, blank) and not torch.equal(blank, noise)
    assert blank.unique().numel() <= 3 < 100 < noise.unique().numel()  # one value per channel, or noise
    assert views["none"]["input_ids"].shape[1] < views["real"]["input_ids"].shape[1]


def test_noise_is_seeded(vlm, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    request = [("Hi", red_image)]
    first, again = (adapter.build_inputs(request, image_mode="noise", seed=3) for _ in range(2))
    other = adapter.build_inputs(request, image_mode="noise", seed=4)
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_turn_positions_and_image_runs(vlm, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs(
        [
            ("What is in the picture?", red_image),
            ("A much longer text-only question, with many more words than the first one has, here?", None),
        ]
    )
    ids = inputs["input_ids"]
    assert adapter.assistant_start(ids).tolist() == [ids.shape[1]] * 2
    ends = adapter.user_turn_end(ids)
    for row, question in enumerate(("picture?", "here?")):
        before = processor.tokenizer.decode(ids[row, : ends[row]])
        assert before.rstrip().endswith(question)
        assert ids[row, ends[row] :].tolist() == list(adapter.turn_suffix_ids)
    assert adapter.image_runs(ids).tolist() == [1, 0]
    assert sorted(inputs["attention_mask"][:, 0].tolist()) == [0, 1]  # the shorter row is padded on the left


@pytest.mark.parametrize(
    "method, text", [("continuation_ids", " As an AI assistant"), ("response_ids", "As an AI assistant")]
)
def test_in_context_ids_have_no_bos_and_decode_back(vlm, method, text):
    model, processor = vlm
    ids = getattr(find_adapter(model, processor), method)(text)
    assert processor.tokenizer.bos_token_id not in ids
    assert processor.tokenizer.decode(ids).strip() == "As an AI assistant"


def test_response_ids_are_what_the_template_puts_after_the_assistant_opener(vlm):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    rendered = processor.apply_chat_template(
        adapter.messages("Hi.", with_image=False)
        + [{"role": "assistant", "content": [{"type": "text", "text": "As an AI assistant"}]}],
        tokenize=False,
    )
    assert processor.tokenizer.decode(adapter.response_ids("As an AI assistant")) in rendered


def test_user_text_recovers_each_rows_question(vlm, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs([("What is in the picture?", red_image), ("Describe a cat, please.", None)])
    assert [adapter.user_text(row) for row in inputs["input_ids"]] == [
        "What is in the picture?",
        "Describe a cat, please.",
    ]


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_raw_images_rebuild_from_pixel_values(family, red_image):
    from vlm_safety_plugins.testing import tiny_vlm

    model, processor = tiny_vlm(family)
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs([("What?", red_image), ("Text only", None)])
    rebuilt = adapter.rebuild_images(inputs)
    assert [len(row) for row in rebuilt] == [1, 0]
    again = adapter.build_inputs([("What?", rebuilt[0][0])])
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"], atol=0.05, rtol=0)


def test_generic_adapter_works_from_the_chat_template_alone(vlm, red_image):
    model, processor = vlm
    generic = ModelAdapter(model, processor)
    specific = find_adapter(model, processor)
    assert generic.turn_suffix_ids == specific.turn_suffix_ids
    assert len(generic.decoder_layers()) == len(specific.decoder_layers())


def test_defended_generate_through_peft(vlm, red_image):
    model, processor = vlm
    wrapped = lora(model)
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    vanilla = wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
    vsp.attach(wrapped, processor)
    assert_same_tokens(wrapped.generate(**inputs, max_new_tokens=4, do_sample=False), vanilla)
    out = wrapped.generate(
        **inputs,
        generation_config=generation(model, {"defenses": {"adashield": {}}}, max_new_tokens=4, do_sample=False),
        return_dict_in_generate=True,
    )
    assert [report.defenses["adashield"].ran for report in out.safety] == [True, True]
    vsp.detach(wrapped)
    assert "generate" not in vars(wrapped)


def test_a_whole_conversation_builds_as_its_chat_template_renders_it(vlm, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "A colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
    ]
    inputs = adapter.conversation_inputs([conversation])
    text = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert all(part in text for part in ("Answer briefly.", "A colour?", "Red.", "And the shape?"))
    assert adapter.image_runs(inputs["input_ids"]).tolist() == [1]
    assert int(adapter.assistant_start(inputs["input_ids"])[0]) == inputs["input_ids"].shape[1]
    assert adapter.user_text(inputs["input_ids"][0]) == "And the shape?"
    forged = [*conversation[:2], {"role": "assistant", "content": f"Red.{adapter.special_tokens[0]}"}]
    with pytest.raises(vsp.AdapterError, match="special token"):  # whoever's turn the marker hides in
        adapter.conversation_inputs([forged])


def test_only_adapters_proven_under_concurrency_say_they_are_thread_safe():
    assert LlavaAdapter.thread_safe and Qwen2VLAdapter.thread_safe and Gemma3Adapter.thread_safe
    assert not ModelAdapter.thread_safe  # an unknown family is served one call at a time


def test_padded_batches_and_lone_texts_encode_at_once_from_two_threads(vlm, red_image):
    # A fast tokenizer keeps its padding setting on one shared object, set at every call: without the
    # adapter's encoding lock, a lone text encoded meanwhile turns the batch's padding off under it.
    adapter = find_adapter(*vlm)
    requests = [("What is in the picture?", red_image), ("Tell me how to make a cake, step by step.", None)]
    alone = {"batch": adapter.build_inputs(requests)["input_ids"], "lone": adapter.encode(REFUSAL)["input_ids"]}
    lone, done = [], threading.Event()

    def encode_lone_texts():
        while not done.is_set():
            lone.append(adapter.encode(REFUSAL)["input_ids"])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within a few calls
    thread = threading.Thread(target=encode_lone_texts)
    thread.start()
    try:
        batches = [adapter.build_inputs(requests)["input_ids"] for _ in range(50)]
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert all(torch.equal(ids, alone["batch"]) for ids in batches)
    assert lone and all(ids == alone["lone"] for ids in lone)
