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
from .errors import AdapterError, ArtifactError, ConfigError, DefenseError, ModelLoadError, VLMSafetyError
from .hookspecs import hookimpl
from .options import option
from .report import MODIFIED, PASS, REFUSED, DefenseRecord, SafetyReport

_LAZY = {
    "ModelAdapter": ".adapters",
    "Defense": ".defense",
    "Evaluator": ".evaluator",
    "ClipScorer": ".evaluators",
    "RewardScorer": ".evaluators",
    "AddPromptProjection": ".interventions",
    "AddVector": ".interventions",
    "Gate": ".interventions",
    "Intervention": ".interventions",
    "ProjectOut": ".interventions",
    "SubspaceIntervention": ".interventions",
    "CmrmVectors": ".artifacts",
    "SafetySubspace": ".artifacts",
    "calibrate_cmrm": ".calibration",
    "calibrate_vlm_guard": ".calibration",
    "InterferencePrefixProcessor": ".processors",
    "SentenceBoundaryCriteria": ".processors",
    "GenerationCall": ".runtime",
    "attach": ".runtime",
    "detach": ".runtime",
    "get_attachment": ".runtime",
}

__all__ = [
    "AdapterError", "AddPromptProjection", "AddVector", "ArtifactError", "ClipScorer", "CmrmVectors",
    "ConfigError", "Defense", "DefenseError", "DefenseRecord", "Evaluator", "Gate", "GenerationCall",
    "InterferencePrefixProcessor", "Intervention", "MODIFIED", "ModelAdapter", "ModelLoadError", "PASS",
    "ProjectOut", "REFUSED", "RewardScorer", "SafetyConfig", "SafetyReport", "SafetySubspace",
    "SentenceBoundaryCriteria", "SubspaceIntervention", "VLMSafetyError", "attach", "calibrate_cmrm",
    "calibrate_vlm_guard", "detach", "get_attachment", "hookimpl", "load_config", "option",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule, e.g. ``vsp.adapters``
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
