"""Qwen2-VL under ETA: per-call M-RoPE offsets (batches, threads) and images rebuilt from flattened patches."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

import vlm_safety_plugins as vsp
from vlm_safety_plugins.testing import FAMILIES, tiny_vlm
from vlm_safety_plugins.testing.conformance import run_concurrently

from .conftest import new_tokens
from .test_eta import eta

# Non-square images of different sizes: different image grids, so different M-RoPE offsets per row.
SIZES = [(48, 40), (16, 64), (64, 16)]
MAX_NEW_TOKENS = 8
ROUNDS = 12  # per thread; 4 threads


def picture(size, color=None, seed=0):
    """A solid image of ``size``, or fixed random noise when ``color`` is None."""
    if color is not None:
        return Image.new("RGB", size, color)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def attached(family="qwen2_vl"):
    model, processor = tiny_vlm(family)
    vsp.attach(model, processor)
    return model, vsp.get_attachment(model).adapter


def shallow(model, **options):
    """ETA aligning every image row with the prefix alone, greedy: deterministic, comparable token for token."""
    return eta(alignment="shallow_only", **options).to_generation_config(
        model.generation_config, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True
    )


def answers(out, inputs, pad):
    """Each row's answer tokens, right padding removed."""
    rows = new_tokens(out.sequences, inputs).tolist()
    return [row[: max((i + 1 for i, token in enumerate(row) if token != pad), default=0)] for row in rows]


# -- finding 6: each call (and each row) keeps its own M-RoPE offsets -----------------------------


def test_batched_eta_rows_with_different_image_sizes_match_each_row_alone():
    model, adapter = attached()
    requests = [(f"What is in picture {i}?", picture(size, color=(40 * i, 200, 30))) for i, size in enumerate(SIZES)]
    inputs = adapter.build_inputs(requests)
    assert len({tuple(grid) for grid in inputs["image_grid_thw"].tolist()}) == len(SIZES)
    gen, pad = shallow(model), adapter.tokenizer.pad_token_id
    out = model.generate(**inputs, images=[image for _, image in requests], generation_config=gen)
    assert all(report.defenses["eta"].details["aligned"] for report in out.safety)
    for row, request in enumerate(requests):
        alone_inputs = adapter.build_inputs([request])
        alone = model.generate(**alone_inputs, images=[request[1]], generation_config=gen)
        assert answers(out, inputs, pad)[row] == answers(alone, alone_inputs, pad)[0], f"row {row}"


@pytest.mark.parametrize("family", FAMILIES)
def test_threaded_eta_calls_match_the_same_call_run_alone(family):
    model, adapter = attached(family)
    gen = shallow(model)
    one, two, three = (picture(size, color=None, seed=i) for i, size in enumerate(SIZES))
    requests = {
        "single": [("What is in the picture?", one)],
        "batch": [("Describe it.", two), ("Tell me about this.", three)],
        "mixed": [("And this one?", three), ("Describe a cat.", None)],
    }
    inputs = {name: adapter.build_inputs(rows) for name, rows in requests.items()}

    def defended(name):
        return lambda: model.generate(
            **inputs[name], images=[[image] if image else [] for _, image in requests[name]], generation_config=gen
        )

    calls = {name: defended(name) for name in requests}
    calls["plain"] = lambda: model.generate(**inputs["batch"], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = {name: call() for name, call in calls.items()}
    assert all(report.defenses["eta"].details["aligned"] for report in expected["single"].safety)
    results = run_concurrently(calls, rounds=ROUNDS)
    sequences = {name: out if name == "plain" else out.sequences for name, out in expected.items()}
    outputs = [(name, out if name == "plain" else out.sequences) for name, outs in results.items() for out in outs]
    mismatches = sum(not torch.equal(out, sequences[name]) for name, out in outputs)
    assert mismatches == 0, f"{family}: {mismatches} of {len(outputs)} threaded calls differ from the call run alone"


# -- finding 7: raw images rebuilt from flattened patches -----------------------------------------


@pytest.mark.parametrize("size", [*SIZES, (56, 56), (100, 60)])
def test_rebuild_images_is_what_the_processor_saw(size):
    """The rebuilt image has the processor's resized size; processed at that size it gives back the same patches."""
    model, adapter = attached()
    image = picture(size, color=None)
    inputs = adapter.build_inputs([("What?", image), ("Text only.", None)])
    rebuilt = adapter.rebuild_images(inputs)
    assert [len(row) for row in rebuilt] == [1, 0]
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    patch = adapter.processor.image_processor.patch_size
    assert rebuilt[0][0].size == (grid_w * patch, grid_h * patch)
    # the tiny processor pins min_pixels == max_pixels, so a resized non-square image may resize again: pin its area
    area = grid_w * grid_h * patch * patch
    again = adapter.processor.image_processor(
        images=rebuilt[0], size={"shortest_edge": area, "longest_edge": area}, return_tensors="pt"
    )
    assert torch.equal(again["image_grid_thw"], inputs["image_grid_thw"])
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"], atol=1e-6, rtol=0)


def test_rebuild_images_round_trips_through_the_default_qwen2_vl_processor():
    """With Qwen2-VL's own pixel budget (56² to 28²·1280), the rebuilt images go through the processor unchanged."""
    model, adapter = attached()
    adapter.processor.image_processor = Qwen2VLImageProcessor()
    images = [picture(size, color=None, seed=i) for i, size in enumerate(SIZES)]
    texts = ["What?", "Text only.", "And?", "Or?"]
    inputs = adapter.build_inputs(list(zip(texts, [images[0], None, images[1], images[2]])))
    rebuilt = adapter.rebuild_images(inputs)
    assert [len(row) for row in rebuilt] == [1, 0, 1, 1]
    again = adapter.build_inputs([(text, row[0] if row else None) for text, row in zip(texts, rebuilt)])
    assert torch.equal(again["image_grid_thw"], inputs["image_grid_thw"])
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"], atol=1e-6, rtol=0)


def test_eta_without_images_rebuilds_them_and_scores_what_the_processor_saw():
    model, adapter = attached()
    gen = shallow(model)
    textured, solid = picture((48, 40), color=None), picture((48, 40), color=(220, 30, 30))
    inputs = adapter.build_inputs([("What is in the picture?", textured), ("And here?", solid)])
    rebuilt = adapter.rebuild_images(inputs)

    def pre(out):
        assert not any(report.refused for report in out.safety), out.safety[0].error
        return [report.defenses["eta"].scores["pre"] for report in out.safety]

    without = model.generate(**inputs, generation_config=gen)
    given_rebuilt = model.generate(**inputs, images=rebuilt, generation_config=gen)
    given_original = model.generate(**inputs, images=[textured, solid], generation_config=gen)
    # the rebuilt image is exactly what the processor saw: the same pre-score, decisions and tokens as passing it
    assert pre(without) == pre(given_rebuilt)
    assert torch.equal(without.sequences, given_rebuilt.sequences)
    # against the caller's original, only resizing differs: nothing for a solid image, which resizing leaves as is
    assert pre(without)[1] == pytest.approx(pre(given_original)[1], abs=1e-6)
    assert all(report.defenses["eta"].details["aligned"] for report in without.safety)
