"""The residual-stream core: exact edits at exact layers, positions and rows, per call."""

import contextlib

import pytest
import torch

import vlm_safety_plugins as vsp
from vlm_safety_plugins.steering.interventions import InterventionHooks

from .conftest import assert_same_tokens, batch, capture, concurrent, generation

STEERED = (1, 2)


def prefill_states(model, inputs, layers, hooks=None, interventions=()):
    activation = (
        hooks.activate(
            interventions, prompt_length=inputs["input_ids"].shape[1], batch_size=inputs["input_ids"].shape[0]
        )
        if hooks
        else contextlib.nullcontext()
    )
    with torch.no_grad(), capture(layers) as outputs, activation:
        model(**inputs)
    return {index: states[0] for index, states in outputs.items()}


@pytest.fixture
def attached(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    attachment = vsp.get_attachment(model)
    layers = attachment.adapter.decoder_layers()
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    return model, attachment, layers, inputs


def test_add_vector_moves_exactly_the_scoped_positions_of_the_steered_layers(attached):
    model, attachment, layers, inputs = attached
    torch.manual_seed(0)
    vector = torch.randn(attachment.adapter.hidden_size())
    vanilla = prefill_states(model, inputs, layers)
    steered = prefill_states(
        model, inputs, layers, attachment.hooks, [vsp.AddVector({layer: vector for layer in STEERED}, alpha=0.5)]
    )
    last = inputs["input_ids"].shape[1] - 1
    assert torch.equal(steered[0], vanilla[0])  # below the first steered layer: untouched
    for layer in range(len(layers)):
        assert torch.equal(steered[layer][:, :last], vanilla[layer][:, :last])  # earlier positions: untouched
    # the first steered layer's input is unchanged, so its output moved by exactly α·v ...
    torch.testing.assert_close(steered[1][:, last] - vanilla[1][:, last], 0.5 * vector.expand(2, -1))
    # ... and the shift propagates to the layers above
    assert not torch.allclose(steered[len(layers) - 1][:, last], vanilla[len(layers) - 1][:, last])


def test_scope_all_edits_every_position(attached):
    model, attachment, layers, inputs = attached
    vector = torch.linspace(-1, 1, attachment.adapter.hidden_size())
    vanilla = prefill_states(model, inputs, layers)
    steered = prefill_states(
        model, inputs, layers, attachment.hooks, [vsp.AddVector({0: vector}, alpha=2.0, scope="all")]
    )
    torch.testing.assert_close(steered[0] - vanilla[0], (2.0 * vector).expand_as(vanilla[0]))


def test_last_prompt_scope_edits_the_last_prompt_token_and_no_generated_one(attached):
    model, attachment, layers, inputs = attached
    vector = torch.ones(attachment.adapter.hidden_size()) * 3
    prompt_length = inputs["input_ids"].shape[1]

    def run(interventions):
        with attachment.hooks.activate(interventions, prompt_length=prompt_length, batch_size=2):
            return model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
            )

    vanilla = run([])
    steered = run([vsp.AddVector({0: vector}, scope="last_prompt")])
    prefill, vanilla_prefill = steered.hidden_states[0][1], vanilla.hidden_states[0][1]  # layer 0's output
    assert torch.equal(prefill[:, :-1], vanilla_prefill[:, :-1])
    torch.testing.assert_close(prefill[:, -1] - vanilla_prefill[:, -1], vector.expand(2, -1))
    # the first generated token sees the same edited prompt under both scopes; only the wider one edits it
    wider = run([vsp.AddVector({0: vector}, scope="last_prompt_and_generated")])
    assert torch.equal(wider.sequences[:, : prompt_length + 1], steered.sequences[:, : prompt_length + 1])
    torch.testing.assert_close(wider.hidden_states[1][1] - steered.hidden_states[1][1], vector.expand(2, 1, -1))


def test_generated_scope_leaves_the_prefill_alone(attached):
    model, attachment, layers, inputs = attached
    vector = torch.ones(attachment.adapter.hidden_size()) * 3

    def run(interventions):
        with attachment.hooks.activate(interventions, prompt_length=inputs["input_ids"].shape[1], batch_size=2):
            return model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
            )

    vanilla = run([])
    steered = run([vsp.AddVector({1: vector}, scope="generated")])
    for layer_state, vanilla_state in zip(steered.hidden_states[0], vanilla.hidden_states[0]):
        assert torch.equal(layer_state, vanilla_state)  # prefill step: identical everywhere
    # first generated token: same input, so layer 1's output moved by exactly v (hidden_states[1][0] = embeddings)
    torch.testing.assert_close(steered.hidden_states[1][2] - vanilla.hidden_states[1][2], vector.expand(2, 1, -1))


def test_rows_mask_steers_only_the_chosen_rows(attached):
    model, attachment, layers, inputs = attached
    vector = torch.ones(attachment.adapter.hidden_size())
    vanilla = prefill_states(model, inputs, layers)
    steered = prefill_states(model, inputs, layers, attachment.hooks, [vsp.AddVector({1: vector}, rows=[False, True])])
    for layer in range(len(layers)):
        assert torch.equal(steered[layer][0], vanilla[layer][0])
    assert not torch.equal(steered[1][1], vanilla[1][1])


def test_project_out_removes_the_subspace(attached):
    model, attachment, layers, inputs = attached
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(attachment.adapter.hidden_size(), 3)).Q.T  # 3 orthonormal rows
    vanilla = prefill_states(model, inputs, layers)
    steered = prefill_states(model, inputs, layers, attachment.hooks, [vsp.ProjectOut({2: basis})])
    last = inputs["input_ids"].shape[1] - 1
    assert (vanilla[2][:, last] @ basis.T).abs().max() > 1e-2
    assert (steered[2][:, last] @ basis.T).abs().max() < 1e-5
    torch.testing.assert_close(steered[2][:, last] + (vanilla[2][:, last] @ basis.T) @ basis, vanilla[2][:, last])


def test_gate_decides_per_row_on_the_last_prompt_state(attached):
    model, attachment, layers, inputs = attached
    seen = []

    def decide(state):
        seen.append(state.clone())
        return torch.tensor([True, False])

    vector = torch.ones(attachment.adapter.hidden_size()) * 5
    gated = vsp.AddVector({1: vector, 2: vector}, gate=vsp.Gate(1, decide))
    prompt_length = inputs["input_ids"].shape[1]
    with attachment.hooks.activate([], prompt_length=prompt_length, batch_size=2):
        vanilla = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), capture(layers) as outputs:
        model(**inputs)
    with attachment.hooks.activate([gated], prompt_length=prompt_length, batch_size=2) as active:
        steered = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], outputs[1][0][:, -1])
    assert active.gate_fired(gated).tolist() == [True, False]
    assert_same_tokens(steered[1], vanilla[1])
    assert not torch.equal(steered[0], vanilla[0])


def test_per_row_vectors_follow_rows_through_beam_expansion(attached):
    model, attachment, layers, inputs = attached
    vectors = torch.zeros(2, attachment.adapter.hidden_size())
    vectors[1] = 4.0
    settings = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    vanilla = model.generate(**inputs, **settings)
    with attachment.hooks.activate(
        [vsp.AddVector({1: vectors})], prompt_length=inputs["input_ids"].shape[1], batch_size=2
    ):
        steered = model.generate(**inputs, **settings)
    assert_same_tokens(steered[:2], vanilla[:2])
    assert not torch.equal(steered[2:], vanilla[2:])


class SteerAllLayers(vsp.Defense):
    name = "steer_test_defense"

    def interventions(self, call):
        size = call.adapter.hidden_size()
        return [vsp.AddVector({layer: torch.full((size,), 3.0) for layer in range(len(call.adapter.decoder_layers()))})]


def test_concurrent_calls_see_only_their_own_interventions(vlm, red_image, register):
    model, processor = vlm
    register(SteerAllLayers)
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    vanilla = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vsp.attach(model, processor)
    steer = generation(
        model, {"defenses": {"steer_test_defense": {}}, "on_error": "raise"}, max_new_tokens=5, do_sample=False
    )
    steered = model.generate(**inputs, generation_config=steer)
    assert not torch.equal(steered, vanilla)
    outputs = concurrent(
        {
            "plain": lambda: model.generate(**inputs, max_new_tokens=5, do_sample=False),
            "steered": lambda: model.generate(**inputs, generation_config=steer),
        },
        rounds=6,
    )
    assert all(torch.equal(out, vanilla) for out in outputs["plain"])
    assert all(torch.equal(out, steered) for out in outputs["steered"])


def test_hooks_are_inert_outside_a_call(attached):
    model, attachment, layers, inputs = attached
    from vlm_safety_plugins.steering.interventions import _ACTIVE

    before = prefill_states(model, inputs, layers)
    with pytest.raises(KeyError):
        with attachment.hooks.activate(
            [vsp.AddVector({1: torch.ones(attachment.adapter.hidden_size())})],
            prompt_length=inputs["input_ids"].shape[1],
            batch_size=2,
        ):
            raise KeyError("interrupted mid-call")
    assert _ACTIVE.get() is None
    after = prefill_states(model, inputs, layers)
    assert all(torch.equal(before[layer], after[layer]) for layer in before)
    assert all(len(layer._forward_hooks) == 1 for layer in layers)


@pytest.mark.parametrize(
    "intervention, message",
    [
        (lambda d: vsp.AddVector({1: torch.ones(d + 1)}), r"layer 1 vector has shape \((\d+),\), expected"),
        (lambda d: vsp.AddVector({1: torch.ones(3, d)}), r"shape \(3, \d+\), expected .* or \(2, \d+\)"),
        (lambda d: vsp.AddVector({99: torch.ones(d)}), "targets layer 99, but the model has decoder layers 0..3"),
        (lambda d: vsp.ProjectOut({1: torch.ones(d)}), r"basis has shape \(\d+,\), expected \(m, \d+\)"),
        (lambda d: vsp.AddVector({1: torch.ones(d)}, rows=[True]), r"rows mask has shape \(1,\), expected \(2,\)"),
    ],
)
def test_mismatched_shapes_are_clear_errors_before_any_forward(attached, intervention, message):
    model, attachment, layers, inputs = attached
    with pytest.raises(ValueError, match=message):
        with attachment.hooks.activate([intervention(attachment.adapter.hidden_size())], prompt_length=5, batch_size=2):
            pass


def test_bad_scope_is_rejected():
    with pytest.raises(ValueError, match="scope must be one of"):
        vsp.AddVector({0: torch.ones(4)}, scope="prompt")


class TupleLayer(torch.nn.Module):
    """A decoder layer in the older style: returns (hidden_states, attention weights)."""

    def forward(self, hidden):
        return hidden * 1.0, "weights"


def test_layers_returning_tuples_are_edited_in_their_first_element():
    layers = torch.nn.ModuleList([TupleLayer(), TupleLayer()])
    hooks = InterventionHooks(layers, hidden_size=4)
    hidden = torch.zeros(1, 3, 4)
    with hooks.activate([vsp.AddVector({1: torch.ones(4)}, scope="all")], prompt_length=3, batch_size=1):
        first, second = layers[0](hidden), layers[1](hidden)
    assert torch.equal(first[0], hidden) and second[1] == "weights"
    assert torch.equal(second[0], torch.ones(1, 3, 4))
    hooks.remove()
    assert not layers[1]._forward_hooks


def test_continuation_rows_steer_each_generated_row_as_the_call_row_it_continues(attached):
    model, attachment, layers, inputs = attached
    hidden = attachment.adapter.hidden_size()
    per_row = torch.stack([torch.full((hidden,), 1.0), torch.full((hidden,), -2.0)])
    intervention = vsp.AddVector({0: per_row}, scope="all", rows=[False, True])
    # row 1 is text-only: its per-position inputs are all it needs
    three_of_row_1 = {
        name: value[[1, 1, 1]] for name, value in inputs.items() if value.shape[:2] == inputs["input_ids"].shape
    }
    vanilla = prefill_states(model, three_of_row_1, layers)
    with (
        torch.no_grad(),
        capture(layers) as outputs,
        attachment.hooks.activate(
            [intervention], prompt_length=inputs["input_ids"].shape[1], batch_size=2, rows=[1, 1, 1]
        ),
    ):
        model(**three_of_row_1)
    # row 1's own vector (and its rows-mask entry) apply to all three copies
    torch.testing.assert_close(outputs[0][0] - vanilla[0], per_row[1].expand_as(vanilla[0]))


def orthonormal_rows(count, size, seed):
    torch.manual_seed(seed)
    return torch.linalg.qr(torch.randn(size, count)).Q.T


def test_add_prompt_projection_pushes_following_positions_by_the_prompts_part(attached):
    model, attachment, layers, inputs = attached
    basis = orthonormal_rows(2, attachment.adapter.hidden_size(), seed=2)
    prompt_length = inputs["input_ids"].shape[1]

    def run(interventions):
        with (
            torch.no_grad(),
            capture(layers) as outputs,
            attachment.hooks.activate(interventions, prompt_length=prompt_length, batch_size=2) as active,
        ):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        return outputs, active

    vanilla, _ = run([])
    steered, active = run([vsp.AddPromptProjection({1: basis}, alpha=3.0, scope="generated")])
    prompt_state = vanilla[1][0][:, -1]
    assert torch.equal(steered[1][0], vanilla[1][0])  # prefill untouched (scope: generated) ...
    torch.testing.assert_close(active.prompt_states[1], prompt_state)  # ... but read
    # first generated token: same input as vanilla, so layer 1 moved by exactly α·(p·Vᵀ)·V
    torch.testing.assert_close(steered[1][1][:, 0] - vanilla[1][1][:, 0], 3.0 * (prompt_state @ basis.T) @ basis)


def test_gates_and_prompt_reads_see_the_layer_output_before_other_edits(attached):
    model, attachment, layers, inputs = attached
    basis = orthonormal_rows(3, attachment.adapter.hidden_size(), seed=3)
    seen = []

    def decide(state):
        seen.append(state.clone())
        return torch.ones(state.shape[0], dtype=torch.bool)

    both = [vsp.ProjectOut({1: basis}), vsp.AddPromptProjection({1: basis}, alpha=2.0, gate=vsp.Gate(1, decide))]
    vanilla = prefill_states(model, inputs, layers)
    steered = prefill_states(model, inputs, layers, attachment.hooks, both)
    last = vanilla[1][:, -1]
    torch.testing.assert_close(seen[0], last)  # the gate saw the state before ProjectOut ran
    # project out, then add α·(p·Vᵀ)·V from the unedited p: the subspace part is exactly α·p·Vᵀ
    torch.testing.assert_close(steered[1][:, -1] @ basis.T, 2.0 * last @ basis.T, atol=1e-4, rtol=1e-4)


def test_read_records_last_prompt_states_without_editing(attached):
    model, attachment, layers, inputs = attached
    prompt_length = inputs["input_ids"].shape[1]
    with (
        torch.no_grad(),
        capture(layers) as outputs,
        attachment.hooks.activate([], prompt_length=prompt_length, batch_size=2, read=[0, 3]) as active,
    ):
        model(**inputs)
    assert sorted(active.prompt_states) == [0, 3]
    for layer in (0, 3):
        assert torch.equal(active.prompt_states[layer], outputs[layer][0][:, -1])
    with pytest.raises(ValueError, match="read targets layer 7"):
        with attachment.hooks.activate([], prompt_length=prompt_length, batch_size=2, read=[7]):
            pass


def test_prompt_derived_edits_wait_for_the_prompt():
    """A generate continuing from a cache never sees the prompt's last token there: it does not edit."""
    layers = torch.nn.ModuleList([torch.nn.Identity()])
    hooks = InterventionHooks(layers, hidden_size=2)
    basis = torch.tensor([[1.0, 0.0]])
    push = [vsp.AddPromptProjection({0: basis}, alpha=2.0, scope="all")]
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [7.0, 9.0]]])  # prompt of 2 tokens, then 1 generated
    with hooks.activate(push, prompt_length=2, batch_size=1, start_position=2):
        assert torch.equal(layers[0](hidden[:, 2:]), hidden[:, 2:])
    with hooks.activate(push, prompt_length=2, batch_size=1):
        edited = layers[0](hidden)
    # every position gets α·(p·Vᵀ)·V with p = the last prompt state [3, 5]: +[6, 0]
    assert torch.equal(edited, hidden + torch.tensor([6.0, 0.0]))
