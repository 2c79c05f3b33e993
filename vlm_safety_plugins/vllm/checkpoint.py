"""A LLaVA folder in the key layout vLLM loads.

transformers 5 ``save_pretrained`` writes a LLaVA's vision tower under ``vision_tower.*``;
vLLM (0.32) loads llava-hf checkpoints, whose vision keys are ``vision_tower.vision_model.*``.
Renaming the keys gives a folder both load, transformers bit-identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.errors import ConfigError

VISION_PREFIX, LLAVA_HF_VISION_PREFIX = "vision_tower.", "vision_tower.vision_model."


def write_vllm_folder(source: str | Path, out: str | Path) -> Path:
    """Copy the LLaVA folder ``source`` to ``out`` with its weights in llava-hf's key layout."""
    from safetensors.torch import load_file, save_file

    source, out = Path(source), Path(out)
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ConfigError(f"only LLaVA folders need their keys renamed for vLLM; {source} is {model_type!r}")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copyfile(path, out / path.name)
    for weights in source.glob("*.safetensors"):
        tensors = load_file(weights)
        renamed = {_llava_hf_key(key): tensor for key, tensor in tensors.items()}
        save_file(renamed, out / weights.name, metadata={"format": "pt"})
    for index in out.glob("*.safetensors.index.json"):  # a sharded checkpoint's map names keys too
        data = json.loads(index.read_text())
        data["weight_map"] = {_llava_hf_key(key): shard for key, shard in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return out


def _llava_hf_key(key: str) -> str:
    if key.startswith(VISION_PREFIX) and not key.startswith(LLAVA_HF_VISION_PREFIX):
        return LLAVA_HF_VISION_PREFIX + key[len(VISION_PREFIX) :]
    return key
