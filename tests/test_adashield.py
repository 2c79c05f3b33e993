"""AdaShield-S: its defense prompt inserted at the end of the user turn, the caller's prompt restored."""

import vlm_safety_plugins as vsp
from vlm_safety_plugins.defenses.adashield.defense import STATIC_DEFENSE_PROMPT

from .conftest import assert_same_tokens, batch, generation
from .test_runtime import ADASHIELD, requests


def test_adashield_inserts_its_prompt_at_the_end_of_the_user_turn(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    inputs = batch(model, processor, requests(red_image))
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        out = model.generate(
            **inputs, generation_config=generation(model, ADASHIELD, max_new_tokens=3), return_dict_in_generate=True
        )
    finally:
        hook.remove()
    prompt_ids = adapter.continuation_ids("\n" + STATIC_DEFENSE_PROMPT)
    defended = seen[0]
    assert defended.shape[1] == inputs["input_ids"].shape[1] + len(prompt_ids)
    ends = adapter.user_turn_end(defended)
    for row in range(2):
        end = int(ends[row])
        assert defended[row, end - len(prompt_ids) : end].tolist() == prompt_ids
        text = processor.tokenizer.decode(defended[row])
        assert (
            text.index("What is in the picture?" if row == 0 else "sea, please.")
            < text.index("examine the image carefully")
            < text.rindex(processor.tokenizer.decode(list(adapter.turn_suffix_ids)))
        )
    # the caller's prompt comes back, so slicing by its length keeps working
    assert_same_tokens(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert [report.defenses["adashield"].ran for report in out.safety] == [True, True]
    assert all(report.decision == "modified" and report.defenses["adashield"].time_s > 0 for report in out.safety)


def test_adashield_can_leave_text_only_rows_alone(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    config = {"defenses": {"adashield": {"text_only": False}}}
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        out = model.generate(
            **inputs, generation_config=generation(model, config, max_new_tokens=2), return_dict_in_generate=True
        )
    finally:
        hook.remove()
    ids, mask = seen[0]["input_ids"], seen[0]["attention_mask"]
    text_row = ids[1][mask[1].bool()]
    assert_same_tokens(text_row, inputs["input_ids"][1][inputs["attention_mask"][1].bool()])
    assert [report.defenses["adashield"].ran for report in out.safety] == [True, False]
    assert [report.decision for report in out.safety] == ["modified", "pass"]


def test_an_empty_prompt_modifies_nothing_and_says_so(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    config = generation(model, {"defenses": {"adashield": {"prompt": "", "separator": ""}}}, max_new_tokens=2)
    out = model.generate(**inputs, generation_config=config, return_dict_in_generate=True)
    assert [report.decision for report in out.safety] == ["pass", "pass"]
    assert all(report.defenses["adashield"].ran for report in out.safety)
