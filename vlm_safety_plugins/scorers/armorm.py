"""ArmoRM (``RLHFlow/ArmoRM-Llama3-8B-v0.1``, ETA's reward model) without its remote code.

The published ``modeling_custom.py`` imports ``LLAMA_INPUTS_DOCSTRING``, which transformers 5
no longer has, so ``trust_remote_code=True`` cannot load it. This module implements the same
architecture on transformers' own ``LlamaModel`` and reads the checkpoint's safetensors (never
a pickle) by the published tensor names. For a token sequence with final hidden states ``H``:

- ``rewards = regression_layer(H[last])``: one value per objective (19), no bias; ``last`` is
  the last non-pad token (the reference reads the token before the first pad, the same place
  under right padding).
- ``prompt = H[p]``, where ``p`` starts the last occurrence of the token pattern
  ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``: the ``<|eot_id|>`` that
  closes the last user turn of the Llama-3 chat template (ids 128009, 128006, 78191, 128007,
  271 in Llama-3's vocabulary; read off the tokenizer at load time). Under causal attention
  the gate therefore sees the prompt only, never the response.
- ``gate = softmax(MLP(prompt) / gating_temperature) * logit_scale``: ``gating_n_hidden``
  linear layers of width ``gating_hidden_dim``, each with a bias and a ReLU, then a linear layer
  (with bias) to one logit per objective; ``logit_scale`` is a stored 1-element tensor.
- ``score = sum(gate * (rewards @ reward_transform_matrix))``: the gated aggregate, shape
  (batch,), with no further shift or scale. ``logits`` is the same tensor, as in the reference.

Config fields read besides the Llama ones (defaults as in the reference): ``num_objectives``
(19), ``gating_temperature`` (10), ``gating_hidden_dim`` (1024), ``gating_n_hidden`` (3).
:data:`PUBLISHED_HEAD_SHAPES` lists the non-backbone tensors of the published checkpoint; the
backbone's are transformers' ``LlamaModel`` names under ``model.``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..core.errors import ModelLoadError

ARCHITECTURE = "LlamaForRewardModelWithGating"
"""The ``architectures`` entry of an ArmoRM ``config.json``."""

GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
"""The text whose tokens (last occurrence) mark the position the gate reads."""

REFERENCE_GATING_IDS = (128009, 128006, 78191, 128007, 271)
""":data:`GATING_TEXT` in Llama-3's vocabulary, as the published code hard-codes it."""

PUBLISHED_HEAD_SHAPES = {
    "regression_layer.weight": (19, 4096),
    "reward_transform_matrix": (19, 19),
    "gating.logit_scale": (1,),
    "gating.layers.0.weight": (1024, 4096),
    "gating.layers.0.bias": (1024,),
    "gating.layers.1.weight": (1024, 1024),
    "gating.layers.1.bias": (1024,),
    "gating.layers.2.weight": (1024, 1024),
    "gating.layers.2.bias": (1024,),
    "gating.layers.3.weight": (19, 1024),
    "gating.layers.3.bias": (19,),
}
"""Non-backbone tensors of ``RLHFlow/ArmoRM-Llama3-8B-v0.1`` (hidden 4096, 19 objectives, gate 3 x 1024)."""


@dataclass
class ArmoRMOutput(ModelOutput):
    """``score`` (batch,) is the gated aggregate; ``rewards`` and ``gating_output`` are (batch, objectives)."""

    score: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    gating_output: torch.Tensor | None = None
    prompt_embedding: torch.Tensor | None = None


class GatingNetwork(nn.Module):
    """ReLU MLP over the prompt embedding; a tempered softmax over objectives, times ``logit_scale``."""

    def __init__(self, hidden_size: int, objectives: int, *, temperature: float, width: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        sizes = [hidden_size] + [width] * n_hidden
        self.layers = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])] + [nn.Linear(sizes[-1], objectives)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return F.softmax(self.layers[-1](x) / self.temperature, dim=-1) * self.logit_scale[0]


class ArmoRM(nn.Module):
    """ArmoRM's forward on a ``LlamaConfig`` carrying the ArmoRM fields; see the module docstring."""

    def __init__(self, config, gating_ids: Sequence[int] = REFERENCE_GATING_IDS):
        from transformers import LlamaModel

        super().__init__()
        self.config = config
        self.gating_ids = list(gating_ids)
        objectives = getattr(config, "num_objectives", 19)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, objectives, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(objectives), requires_grad=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            objectives,
            temperature=getattr(config, "gating_temperature", 10),
            width=getattr(config, "gating_hidden_dim", 1024),
            n_hidden=getattr(config, "gating_n_hidden", 3),
        )

    def gate_position(self, ids: list[int]) -> int:
        """Start of the last occurrence of the gating pattern in ``ids``; ValueError if absent."""
        n = len(self.gating_ids)
        for start in range(len(ids) - n, -1, -1):
            if ids[start : start + n] == self.gating_ids:
                return start
        raise ValueError(f"ArmoRM: no assistant header {GATING_TEXT!r} after a user turn (truncated input?)")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ArmoRMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(len(input_ids), device=hidden.device)
        last = (input_ids.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)).to(hidden.device)
        gate_at = [self.gate_position(ids[: end + 1]) for ids, end in zip(input_ids.tolist(), last.tolist())]
        prompt = hidden[rows, gate_at]
        rewards = self.regression_layer(hidden[rows, last])
        gate = self.gating(prompt)
        score = (gate * (rewards @ self.reward_transform_matrix)).sum(-1)
        return ArmoRMOutput(score=score, logits=score, rewards=rewards, gating_output=gate, prompt_embedding=prompt)


def is_armorm_config(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) describes an ArmoRM checkpoint."""
    return ARCHITECTURE in (config.get("architectures") or [])


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold for ``config``, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = ArmoRM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelLoadError(f"ArmoRM checkpoint {folder}: no model.safetensors or model.safetensors.index.json")


def load(path: str, *, dtype=None, device=None):
    """``(model, tokenizer)`` of an ArmoRM checkpoint (a local folder or hub id); no remote code, no pickle.

    ``dtype`` defaults to the config's (``torch_dtype``), else float32. Raises ModelLoadError
    naming the tensor when one is missing, unexpected or misshaped.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig

    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        files = [
            "config.json",
            "*.safetensors",
            "model.safetensors.index.json",
            "tokenizer*",
            "special_tokens_map.json",
        ]
        folder = Path(snapshot_download(path, allow_patterns=files))
    config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device or "cpu")
    expected = expected_shapes(config)
    state = {}
    for shard in _shards(folder):
        with safe_open(str(shard), framework="pt", device="cpu") as file:
            for name in file.keys():
                if name not in expected:
                    raise ModelLoadError(f"ArmoRM checkpoint {folder}: unexpected tensor {name!r} in {shard.name}")
                shape = tuple(file.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ModelLoadError(
                        f"ArmoRM checkpoint {folder}: tensor {name!r} has shape {shape}, expected {expected[name]}"
                    )
                state[name] = file.get_tensor(name).to(device=device, dtype=dtype)
    missing = [name for name in expected if name not in state]
    if missing:
        raise ModelLoadError(f"ArmoRM checkpoint {folder}: missing tensor(s) {', '.join(map(repr, missing[:5]))}")
    with torch.device("meta"):
        model = ArmoRM(config, tokenizer.encode(GATING_TEXT, add_special_tokens=False))
    model.load_state_dict(state, assign=True)
    # Rotary frequencies are buffers, not checkpoint tensors: rebuild them off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    if any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()]):
        raise ModelLoadError(f"ArmoRM checkpoint {folder}: some model tensors were left unloaded")
    return model.requires_grad_(False).eval(), tokenizer
