"""The attached generate: exact vanilla behaviour when off, defenses composed when on."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig
from transformers.generation.streamers import BaseStreamer

import vlm_safety_plugins as vsp

from .conftest import assert_same_tokens, batch, concurrent, generation, new_tokens

ADASHIELD = {"defenses": {"adashield": {}}}


def requests(image):
    return [("What is in the picture?", image), ("Tell me a short story about the sea, please.", None)]


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_attached_without_flags_is_bit_for_bit_vanilla(vlm, red_image, sampling):
    model, processor = vlm
    inputs = batch(model, processor, requests(red_image))
    settings = dict(max_new_tokens=6, do_sample=sampling, top_k=0 if sampling else None)

    def run(**extra):
        torch.manual_seed(7)
        return model.generate(**inputs, **settings, **extra)

    vanilla = run()
    vsp.attach(model, processor)
    assert_same_tokens(run(images=[red_image, None]), vanilla)
    assert_same_tokens(run(generation_config=GenerationConfig(**settings, vlm_safety={"defenses": {}})), vanilla)
    torch.manual_seed(7)
    unflagged = model.generate(
        **inputs, generation_config=GenerationConfig(**settings), return_dict_in_generate=True, output_scores=True
    )
    assert_same_tokens(unflagged.sequences, vanilla)
    assert not hasattr(unflagged, "safety")


def test_detach_restores_the_original_object(vlm):
    model, processor = vlm
    layers = vsp.get_attachment(vsp.attach(model, processor)).adapter.decoder_layers()
    vsp.attach(model, processor)  # idempotent: still one hook per layer
    assert all(len(layer._forward_hooks) == 1 for layer in layers)
    vsp.detach(model)
    assert vsp.get_attachment(model) is None and "generate" not in vars(model)
    assert model.generate.__func__ is type(model).generate
    assert all(len(layer._forward_hooks) == 0 for layer in layers)


def test_return_types_follow_the_caller(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    gen = generation(model, ADASHIELD, max_new_tokens=3)
    plain = model.generate(**inputs, generation_config=gen)
    assert isinstance(plain, torch.Tensor)
    rich = model.generate(**inputs, generation_config=gen, return_dict_in_generate=True)
    assert_same_tokens(rich.sequences, plain)


def test_num_return_sequences_and_beams_keep_the_callers_prompt(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    for extra in ({"num_return_sequences": 2, "do_sample": True}, {"num_beams": 2, "num_return_sequences": 2}):
        out = model.generate(
            **inputs,
            generation_config=generation(model, ADASHIELD, max_new_tokens=3, **extra),
            return_dict_in_generate=True,
        )
        assert out.sequences.shape[0] == 4
        assert_same_tokens(
            out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(2, dim=0)
        )


def test_model_directory_with_vlm_safety_is_defended_by_default(vlm, red_image, tmp_path):
    model, processor = vlm
    model.generation_config = generation(model, ADASHIELD, max_new_tokens=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.generation_config.vlm_safety == vsp.load_config(ADASHIELD).to_dict()
    vsp.attach(loaded, loaded_processor)
    out = loaded.generate(**batch(loaded, loaded_processor, requests(red_image)), return_dict_in_generate=True)
    assert [report.defenses["adashield"].ran for report in out.safety] == [True, True]


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_sees_the_defended_generation(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    streamer = CollectingStreamer()
    out = model.generate(
        **inputs,
        generation_config=generation(model, ADASHIELD, max_new_tokens=4),
        streamer=streamer,
        return_dict_in_generate=True,
    )
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamer.ended and streamed == new_tokens(out.sequences, inputs)[0].tolist()


class Exploding(vsp.Defense):
    name = "exploding_test_defense"

    def transform_inputs(self, call):
        raise RuntimeError("calibration file is corrupt")


def test_failing_defense_refuses_by_default(vlm, red_image, register):
    model, processor = vlm
    reports = []
    register(Exploding, report_sink=reports)
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    config = {"defenses": {"adashield": {}, "exploding_test_defense": {}}, "refusal": "No, sorry."}
    streamer = CollectingStreamer()
    out = model.generate(
        **inputs, generation_config=generation(model, config, max_new_tokens=5), return_dict_in_generate=True
    )
    answers = processor.tokenizer.batch_decode(new_tokens(out.sequences, inputs), skip_special_tokens=True)
    assert [answer.strip() for answer in answers] == ["No, sorry.", "No, sorry."]
    assert all(report.decision == "refused" for report in out.safety)
    assert out.safety[0].error == "exploding_test_defense: RuntimeError: calibration file is corrupt"
    assert reports == out.safety  # the safety_report hook saw every row
    single = batch(model, processor, [("What is in the picture?", red_image)])
    model.generate(**single, generation_config=generation(model, config, max_new_tokens=5), streamer=streamer)
    streamed = processor.tokenizer.decode(streamer.chunks[1], skip_special_tokens=True)
    assert streamer.chunks[0] == single["input_ids"][0].tolist() and streamed.strip() == "No, sorry."


def test_failing_defense_raises_when_configured(vlm, red_image, register):
    model, processor = vlm
    register(Exploding)
    vsp.attach(model, processor)
    config = {"defenses": {"exploding_test_defense": {}}, "on_error": "raise"}
    with pytest.raises(RuntimeError, match="calibration file is corrupt"):
        model.generate(**batch(model, processor, requests(red_image)), generation_config=generation(model, config))


class NeedsImages(vsp.Defense):
    name = "needs_images_test_defense"

    def transform_inputs(self, call):
        for row, images in enumerate(call.images):
            call.record(self.name, row).details["sizes"] = [image.size for image in images]


def test_images_are_passed_rebuilt_or_reported_missing(vlm, family, red_image, register):
    model, processor = vlm
    register(NeedsImages)
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    config = {"defenses": {"needs_images_test_defense": {}}, "on_error": "raise"}
    gen = generation(model, config, max_new_tokens=2)
    given = model.generate(**inputs, images=[red_image, None], generation_config=gen, return_dict_in_generate=True)
    assert [r.defenses["needs_images_test_defense"].details["sizes"] for r in given.safety] == [[(48, 40)], []]
    with pytest.raises(vsp.DefenseError, match="2 rows"):
        model.generate(**inputs, images=[red_image], generation_config=gen)
    rebuilt = model.generate(**inputs, generation_config=gen, return_dict_in_generate=True)  # every family rebuilds
    sizes = [r.defenses["needs_images_test_defense"].details["sizes"] for r in rebuilt.safety]
    assert len(sizes[0]) == 1 and sizes[1] == []


def test_unflagged_prompt_without_chat_template_is_a_clear_error(vlm):
    model, processor = vlm
    vsp.attach(model, processor)
    raw = processor.tokenizer(["just some words"], return_tensors="pt")
    with pytest.raises(vsp.DefenseError, match="row 0: the prompt has no assistant-turn opener"):
        model.generate(**raw, generation_config=generation(model, {**ADASHIELD, "on_error": "raise"}))


def test_bad_flags_in_generation_config_name_the_key(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    bad = GenerationConfig(max_new_tokens=2, vlm_safety={"defenses": {"adashield": {"separater": " "}}})
    with pytest.raises(vsp.ConfigError, match=r"vlm_safety: defenses\.adashield\.separater: unknown key"):
        model.generate(**batch(model, processor, requests(red_image)), generation_config=bad)


def test_two_threads_with_different_flags_do_not_interfere(vlm, red_image):
    model, processor = vlm
    inputs = batch(model, processor, requests(red_image))
    vanilla = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vsp.attach(model, processor)
    defended_gen = generation(model, ADASHIELD, max_new_tokens=5, do_sample=False)
    defended = model.generate(**inputs, generation_config=defended_gen)
    assert not torch.equal(defended, vanilla)
    results = concurrent(
        {
            "plain": lambda: model.generate(**inputs, max_new_tokens=5, do_sample=False),
            "defended": lambda: model.generate(**inputs, generation_config=defended_gen),
        }
    )
    assert all(torch.equal(out, vanilla) for out in results["plain"])
    assert all(torch.equal(out, defended) for out in results["defended"])


class RecordsSettings(vsp.Defense):
    name = "records_settings_test_defense"
    seen = {}

    def transform_inputs(self, call):
        type(self).seen = {
            "eos": call.eos_token_ids(),
            "pad": call.pad_token_id(),
            "max": call.setting("max_new_tokens"),
        }


def test_a_callers_config_reads_its_unset_values_from_the_models_as_generate_does(vlm, red_image, register):
    model, processor = vlm
    register(RecordsSettings)
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    flags = {"defenses": {"records_settings_test_defense": {}}}
    model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=3, vlm_safety=flags))  # no eos, no pad
    expected_eos = model.generation_config.eos_token_id
    assert RecordsSettings.seen["eos"] == ([expected_eos] if isinstance(expected_eos, int) else list(expected_eos))
    assert RecordsSettings.seen["pad"] is not None and RecordsSettings.seen["max"] == 3
