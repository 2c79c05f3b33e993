"""ArmoRM without remote code, on a tiny checkpoint laid out like ``RLHFlow/ArmoRM-Llama3-8B-v0.1``.

The checkpoint is written by hand here, independently of ``scorers/armorm.py``: transformers'
``LlamaModel`` weights under ``model.``, then the head tensors under the published names.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel

from vlm_safety_plugins.scorers import ModelLoadError, armorm
from vlm_safety_plugins.scorers.reward import POST_EVAL_INSTRUCTION, RewardScorer
from vlm_safety_plugins.testing import tiny_reward_model

OBJECTIVES, WIDTH, TEMPERATURE, SCALE = 19, 16, 10.0, 2.5
# The published config.json's fields that shape the model (huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1).
PUBLISHED_CONFIG = dict(
    architectures=["LlamaForRewardModelWithGating"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128257, pad_token_id=128256,
    bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=False, torch_dtype="float32", num_objectives=19, gating_temperature=10,
    gating_hidden_dim=1024, gating_n_hidden=3,
)  # fmt: skip
RESPONSES = ["I can't help with that.", "Sure, step one: mix the two.", "No"]


def head_tensors(hidden: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The published head layout: regression (no bias), transform matrix, 3 hidden gate layers + output layer."""
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    transform = torch.eye(OBJECTIVES)
    transform[4] -= 0.5 * torch.rand(OBJECTIVES, generator=generator)  # like ArmoRM's verbosity penalty row
    return {
        "regression_layer.weight": randn(OBJECTIVES, hidden),
        "reward_transform_matrix": transform,
        "gating.logit_scale": torch.tensor([SCALE]),
        "gating.layers.0.weight": randn(WIDTH, hidden),
        "gating.layers.0.bias": randn(WIDTH),
        "gating.layers.1.weight": randn(WIDTH, WIDTH),
        "gating.layers.1.bias": randn(WIDTH),
        "gating.layers.2.weight": randn(WIDTH, WIDTH),
        "gating.layers.2.bias": randn(WIDTH),
        "gating.layers.3.weight": 3 * randn(OBJECTIVES, WIDTH),
        "gating.layers.3.bias": randn(OBJECTIVES),
    }


def write_checkpoint(folder, *, shards: int = 2, edit=None):
    """Write config.json, safetensors (``shards`` files + index when > 1) and the tokenizer; return the parts."""
    _, tokenizer = tiny_reward_model()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = LlamaModel(config).eval()
    tensors = {f"model.{name}": tensor for name, tensor in backbone.state_dict().items()}
    tensors |= head_tensors(32, torch.Generator().manual_seed(0))
    if edit:
        edit(tensors)
    names = list(tensors)
    parts = [names[i::shards] for i in range(shards)]
    files = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    for file, part in zip(files, parts):
        save_file({name: tensors[name].contiguous() for name in part}, str(folder / file))
    if shards > 1:
        weight_map = {name: file for file, part in zip(files, parts) for name in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fields = dict(
        architectures=["LlamaForRewardModelWithGating"], num_objectives=OBJECTIVES, gating_hidden_dim=WIDTH,
        gating_temperature=TEMPERATURE, gating_n_hidden=3, torch_dtype="float32",
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config.to_dict() | fields))
    tokenizer.save_pretrained(folder)
    return backbone, tensors, tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("armorm")
    return (folder, *write_checkpoint(folder))


@pytest.fixture(scope="module")
def scorer(checkpoint, offline):
    return RewardScorer.load(str(checkpoint[0]))


@pytest.mark.parametrize("shards", [1, 3])
def test_loads_without_remote_code_and_without_modeling_files(tmp_path, shards, offline):
    write_checkpoint(tmp_path, shards=shards)
    assert not list(tmp_path.glob("modeling_*.py")) and not list(tmp_path.glob("*.bin"))
    loaded = RewardScorer.load(str(tmp_path), device="cpu")
    assert isinstance(loaded.model, armorm.ArmoRM) and not loaded.model.training
    scores = loaded.score([POST_EVAL_INSTRUCTION] * 3, RESPONSES)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.unique().numel() == 3


def test_key_names_and_shapes_equal_the_published_layout(checkpoint):
    _, _, tensors, _ = checkpoint
    config = LlamaConfig.from_dict(json.loads((checkpoint[0] / "config.json").read_text()))
    assert armorm.expected_shapes(config) == {name: tuple(tensor.shape) for name, tensor in tensors.items()}

    published = armorm.expected_shapes(LlamaConfig.from_dict(PUBLISHED_CONFIG))
    head = {name: shape for name, shape in published.items() if not name.startswith("model.")}
    assert head == armorm.PUBLISHED_HEAD_SHAPES
    assert set(head) == {name for name in tensors if not name.startswith("model.")}
    assert len(published) - len(head) == 2 + 9 * 32  # embeddings, final norm, 9 tensors per decoder layer
    assert published["model.embed_tokens.weight"] == (128257, 4096)
    assert published["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert armorm.is_armorm_config(PUBLISHED_CONFIG) and not armorm.is_armorm_config({"architectures": ["Llama"]})


def test_score_is_the_gated_aggregate_computed_by_hand(checkpoint, scorer):
    _, backbone, tensors, tokenizer = checkpoint
    batch = scorer.tokenize([POST_EVAL_INSTRUCTION], [RESPONSES[1]])
    ids = batch["input_ids"][0].tolist()
    pattern = tokenizer.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    gate_at = max(j for j in range(len(ids)) if ids[j : j + len(pattern)] == pattern)
    assert ids.index(tokenizer.convert_tokens_to_ids("<|eot_id|>")) == gate_at  # the user turn's closing token

    with torch.no_grad():
        hidden = backbone(input_ids=batch["input_ids"]).last_hidden_state[0]
        rewards = hidden[-1] @ tensors["regression_layer.weight"].T
        x = hidden[gate_at]
        for i in range(3):
            x = torch.relu(x @ tensors[f"gating.layers.{i}.weight"].T + tensors[f"gating.layers.{i}.bias"])
        logits = x @ tensors["gating.layers.3.weight"].T + tensors["gating.layers.3.bias"]
        gate = torch.softmax(logits / TEMPERATURE, dim=-1) * SCALE
        expected = (gate * (rewards @ tensors["reward_transform_matrix"])).sum()
    assert gate.max() > 2 * gate.min()  # a gate far from uniform, so the weighting is tested
    torch.testing.assert_close(scorer.score([POST_EVAL_INSTRUCTION], [RESPONSES[1]]), expected.reshape(1))
    output = scorer.model(**batch)
    assert output.score.shape == (1,) and output.rewards.shape == output.gating_output.shape == (1, OBJECTIVES)
    torch.testing.assert_close(output.gating_output[0], gate)


def test_padded_batches_score_as_single_rows(scorer):
    instructions = [POST_EVAL_INSTRUCTION, "What is the capital of France?", POST_EVAL_INSTRUCTION]
    assert not scorer.tokenize(instructions, RESPONSES)["attention_mask"].all()  # right padding is exercised
    single = torch.cat([scorer.score([i], [r]) for i, r in zip(instructions, RESPONSES)])
    # float32 rounding differs between batch shapes by a few ulps (1.1e-5 of a 2.3 score seen on AMD EPYC);
    # padding leaking into a row moves a score by orders of magnitude more
    torch.testing.assert_close(scorer.score(instructions, RESPONSES), single, atol=1e-5, rtol=1e-5)


def test_the_gate_reads_the_prompt_only(scorer):
    batch = scorer.tokenize([POST_EVAL_INSTRUCTION] * 2 + ["Is it safe?"], RESPONSES[:2] + RESPONSES[:1])
    with torch.no_grad():
        output = scorer.model(**batch)
    torch.testing.assert_close(output.gating_output[0], output.gating_output[1])
    assert not torch.allclose(output.gating_output[0], output.gating_output[2])
    assert output.score[0] != output.score[1]
    with pytest.raises(ValueError, match="assistant header"):
        scorer.model(input_ids=batch["input_ids"][:, :20])  # truncated inside the user turn


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _reshape(name, shape):
    return lambda tensors: tensors.__setitem__(name, torch.zeros(shape))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("gating.logit_scale"), r"missing tensor\(s\) 'gating.logit_scale'"),
        (_drop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*'model.layers.1.mlp.up_proj.weight'"),
        (_reshape("reward_transform_matrix", (19, 18)), r"'reward_transform_matrix' has shape \(19, 18\), expected"),
        (_reshape("gating.layers.3.weight", (18, WIDTH)), r"'gating.layers.3.weight' has shape \(18, 16\)"),
        (_reshape("score.weight", (1, 32)), "unexpected tensor 'score.weight'"),
    ],
)
def test_a_missing_or_misshaped_tensor_is_a_clear_error(tmp_path, edit, message, offline):
    write_checkpoint(tmp_path, edit=edit)
    with pytest.raises(ModelLoadError, match=message):
        RewardScorer.load(str(tmp_path))


def test_weights_load_from_safetensors_only(tmp_path, monkeypatch, offline):
    write_checkpoint(tmp_path, shards=1)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        RewardScorer.load(str(tmp_path))


def test_a_modeling_file_in_the_folder_is_never_imported(tmp_path, offline):
    write_checkpoint(tmp_path)
    (tmp_path / "modeling_custom.py").write_text("raise RuntimeError('remote code was imported')\n")
    for trust_remote_code in (False, True):
        loaded = RewardScorer.load(str(tmp_path), trust_remote_code=trust_remote_code)
        assert isinstance(loaded.model, armorm.ArmoRM)
    assert not [name for name in sys.modules if "modeling_custom" in name]


def test_gating_ids_are_read_off_the_tokenizer(scorer, checkpoint):
    tokenizer = checkpoint[3]
    assert scorer.model.gating_ids == tokenizer.encode(armorm.GATING_TEXT, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(scorer.model.gating_ids)[:2] == ["<|eot_id|>", "<|start_header_id|>"]


def test_in_a_multi_turn_chat_the_gate_reads_the_last_user_turn(checkpoint, scorer):
    _, backbone, _, tokenizer = checkpoint
    chat = [("user", "Is it safe?"), ("assistant", "Yes."), ("user", POST_EVAL_INSTRUCTION), ("assistant", "No")]
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    closing = [j for j, token in enumerate(ids[0].tolist()) if token == eot]  # user, assistant, user, assistant
    with torch.no_grad():
        output = scorer.model(input_ids=ids)
        hidden = backbone(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(output.prompt_embedding[0], hidden[closing[2]])


def test_dtype_is_the_callers_else_the_configs(checkpoint, scorer, offline):
    assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}  # config.json: torch_dtype float32
    half = RewardScorer.load(str(checkpoint[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        half.score([POST_EVAL_INSTRUCTION], ["No"]), scorer.score([POST_EVAL_INSTRUCTION], ["No"]), atol=0.5, rtol=0.1
    )


def test_eta_loads_its_reward_model_in_the_dtype_its_options_name(register):
    import vlm_safety_plugins as vsp
    from vlm_safety_plugins.testing import tiny_image, tiny_vlm

    loaded = []

    class RecordingReward(RewardScorer):
        name = "recording_reward"

        @classmethod
        def load(cls, path, **settings):
            scorer = super().load(path, **settings)
            loaded.append((settings.get("dtype"), next(scorer.model.parameters()).dtype))
            return scorer

    register(evaluators=[RecordingReward])
    model, processor = tiny_vlm("llava")
    try:
        vsp.attach(model, processor)
        image = tiny_image()
        inputs = vsp.get_attachment(model).adapter.build_inputs([("What is in the picture?", image)])
        for dtype in ("bfloat16", "auto"):
            options = {"path": "tiny-reward-model", "evaluator": "recording_reward", "dtype": dtype}
            eta = {
                "pre_threshold": -1.0,
                "post_threshold": -1e3,
                "clip": {"model": "tiny-clip"},
                "reward_model": options,
            }
            config = vsp.load_config({"defenses": {"eta": eta}})
            model.generate(**inputs, images=[image], generation_config=config.to_generation_config(max_new_tokens=2))
    finally:
        vsp.detach(model)
    assert loaded == [(torch.bfloat16, torch.bfloat16), (None, torch.float32)]
