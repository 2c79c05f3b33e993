"""The suite every registered defense passes, built-in or third-party (the example plugin's too).

A defense gets these tests by being registered: the suite reads the registry and the
defense's ``conformance_options`` (its neutral and active option sets, see core/defense.py).
Each test runs on the tiny LLaVA with one image row and one text-only row, greedy.
"""

import pytest
import torch
from transformers import GenerationConfig

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.core.options import describe_options
from vlm_safety_plugins.core.reference import option_rows
from vlm_safety_plugins.testing import tiny_image, tiny_vlm

from .conftest import assert_same_tokens, batch, concurrent, new_tokens

DEFENSES = sorted(plugins.registry().defenses)
REQUESTS = [("What is in the picture?", tiny_image()), ("Tell me how to make a cake.", None)]
SETTINGS = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_vlm("llava")
    yield model, processor
    vsp.detach(model)


@pytest.fixture(scope="module")
def option_sets(model_and_processor, tmp_path_factory):
    """``option_sets(name)`` -> the defense's {"neutral": ..., "active": ...}, computed once."""
    made = {}

    def get(name):
        if name not in made:
            cls = plugins.get_defense(name)
            made[name] = cls.conformance_options(*model_and_processor, tmp_path_factory.mktemp(name))
            assert set(made[name]) == {"neutral", "active"}, (
                f"{name}: conformance_options must return 'neutral' and 'active' option sets"
            )
        return made[name]

    return get


def defended(model, processor, flags):
    """One greedy generate of REQUESTS; ``flags`` None means no ``vlm_safety`` at all (and, on a
    detached model, plain transformers generate)."""
    inputs = batch(model, processor, REQUESTS)
    if flags is None:
        config = GenerationConfig(**{**model.generation_config.to_dict(), **SETTINGS})
    else:
        config = vsp.load_config(flags).to_generation_config(model.generation_config, **SETTINGS)
    images = {"images": [image for _, image in REQUESTS]} if vsp.get_attachment(model) else {}
    return model.generate(**inputs, generation_config=config, **images), inputs


@pytest.mark.parametrize("name", DEFENSES)
def test_every_option_is_documented(name):
    cls = plugins.get_defense(name)
    assert cls.description, f"{name}: set `description`, shown by `vlm-safety plugins` and the reference"
    rows = [row for _, row in option_rows(cls.Options)]
    assert len(rows) >= len(describe_options(cls.Options))
    undocumented = [row["name"] for row in rows if not row["doc"].strip()]
    assert not undocumented, f"{name}: options without `doc`: {undocumented}"


@pytest.mark.parametrize("name", DEFENSES)
def test_neutral_options_give_the_tokens_of_plain_generate(name, model_and_processor, option_sets):
    model, processor = model_and_processor
    vsp.detach(model)
    plain, inputs = defended(model, processor, None)
    vsp.attach(model, processor)
    output, _ = defended(model, processor, {"defenses": {name: option_sets(name)["neutral"]}})
    assert_same_tokens(output.sequences, plain.sequences)
    assert all(not report.refused for report in output.safety)


@pytest.mark.parametrize("name", DEFENSES)
def test_one_report_per_row_with_the_defense_record(name, model_and_processor, option_sets):
    model, processor = vsp.attach(*model_and_processor), model_and_processor[1]
    output, inputs = defended(model, processor, {"defenses": {name: option_sets(name)["active"]}})
    assert [report.row for report in output.safety] == list(range(len(REQUESTS)))
    for report in output.safety:
        assert name in report.defenses and report.defenses[name].name == name
        assert report.error is None and not report.refused
        assert report.decision in (vsp.PASS, vsp.MODIFIED)
    assert new_tokens(output.sequences, inputs).shape[0] == len(REQUESTS)


@pytest.mark.parametrize("name", DEFENSES)
def test_a_defense_that_raises_fails_closed(name, model_and_processor, option_sets, monkeypatch):
    model, processor = vsp.attach(*model_and_processor), model_and_processor[1]
    cls = plugins.get_defense(name)
    active = option_sets(name)["active"]
    refusal = processor.tokenizer("I cannot answer that.", add_special_tokens=False)["input_ids"]
    for kind in cls.kinds():

        def broken(self, *args, where=kind, **kwargs):
            raise RuntimeError(f"{name} broke in {where}")

        with monkeypatch.context() as patch:
            patch.setattr(cls, kind, broken)
            output, inputs = defended(
                model, processor, {"defenses": {name: active}, "refusal": "I cannot answer that."}
            )
            answers = new_tokens(output.sequences, inputs)
            for row, report in enumerate(output.safety):
                assert report.refused and report.decision == vsp.REFUSED, kind
                assert report.error.startswith(f"{name}: RuntimeError") and kind in report.error
                assert answers[row, : len(refusal)].tolist() == refusal
            with pytest.raises(RuntimeError, match=f"broke in {kind}"):
                defended(model, processor, {"defenses": {name: active}, "on_error": "raise"})


@pytest.mark.parametrize("name", DEFENSES)
def test_two_threads_with_different_flags_do_not_see_each_other(name, model_and_processor, option_sets):
    model, processor = vsp.attach(*model_and_processor), model_and_processor[1]
    active = {"defenses": {name: option_sets(name)["active"]}}
    alone = {
        "active": defended(model, processor, active)[0].sequences,
        "plain": defended(model, processor, None)[0].sequences,
    }
    together = concurrent(
        {
            "active": lambda: defended(model, processor, active)[0].sequences,
            "plain": lambda: defended(model, processor, None)[0].sequences,
        },
        rounds=3,
    )
    for which, outputs in together.items():
        for sequences in outputs:
            assert torch.equal(sequences, alone[which]), which
