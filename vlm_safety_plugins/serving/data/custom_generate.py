"""The generate of a model folder written by ``vlm-safety export``.

Loaded with ``trust_remote_code``, transformers binds this function as ``model.generate``.
It runs the defenses of the operator policy stored in this folder's generation_config.json
(``vlm_safety_policy``); a request's own generation config cannot lower them.
"""

from vlm_safety_plugins.serving.export import defended_generate


def generate(*args, model, **kwargs):
    """transformers' generate under this folder's policy (``model`` comes as a keyword from transformers)."""
    return defended_generate(model, *args, **kwargs)
