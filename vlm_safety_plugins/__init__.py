"""vlm-safety-plugins: inference-time safety defenses for transformers vision-language models.

    import vlm_safety_plugins as vsp
    vsp.attach(model, processor)
    gen = vsp.load_config("configs/eta.yaml").to_generation_config(max_new_tokens=64,
                                                                   return_dict_in_generate=True)
    out = model.generate(**inputs, images=[image], generation_config=gen)
    out.sequences, out.safety

Names that need torch or transformers are imported on first use, so that the light parts
(configs, the plugin registry, ``vlm-safety --help``) start fast.
"""

import importlib

from .config import SafetyConfig, load_config
from .errors import AdapterError, ConfigError, DefenseError, ModelLoadError, VLMSafetyError
from .hookspecs import hookimpl
from .options import option
from .report import MODIFIED, PASS, REFUSED, DefenseRecord, SafetyReport

_LAZY = {
    "ModelAdapter": ".adapters",
    "Defense": ".defense",
    "Evaluator": ".evaluator",
    "ClipScorer": ".evaluators",
    "RewardScorer": ".evaluators",
    "AddVector": ".interventions",
    "Gate": ".interventions",
    "Intervention": ".interventions",
    "ProjectOut": ".interventions",
    "InterferencePrefixProcessor": ".processors",
    "SentenceBoundaryCriteria": ".processors",
    "GenerationCall": ".runtime",
    "attach": ".runtime",
    "detach": ".runtime",
    "get_attachment": ".runtime",
}

__all__ = [
    "AdapterError", "AddVector", "ClipScorer", "ConfigError", "Defense", "DefenseError", "DefenseRecord",
    "Evaluator", "Gate", "GenerationCall", "InterferencePrefixProcessor", "Intervention", "MODIFIED",
    "ModelAdapter", "ModelLoadError", "PASS", "ProjectOut", "REFUSED", "RewardScorer", "SafetyConfig",
    "SafetyReport", "SentenceBoundaryCriteria", "VLMSafetyError", "attach", "detach", "get_attachment",
    "hookimpl", "load_config", "option",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
