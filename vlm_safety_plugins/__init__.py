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

from .core.config import SafetyConfig, load_config
from .core.errors import AdapterError, ArtifactError, ConfigError, DefenseError, ModelLoadError, VLMSafetyError
from .core.hookspecs import hookimpl
from .core.lazy import lazy_exports
from .core.options import Strength, option
from .core.report import MODIFIED, PASS, REFUSED, DefenseRecord, SafetyReport

_LAZY = {
    "ModelAdapter": ".core.adapters",
    "Defense": ".core.defense",
    "DefenseCall": ".core.defense",
    "Evaluator": ".scorers.base",
    "ClipScorer": ".scorers",
    "RewardScorer": ".scorers",
    "AddPromptProjection": ".steering.interventions",
    "AddVector": ".steering.interventions",
    "Gate": ".steering.interventions",
    "Intervention": ".steering.interventions",
    "ProjectOut": ".steering.interventions",
    "SubspaceIntervention": ".steering.interventions",
    "CmrmVectors": ".defenses.cmrm.artifact",
    "SafetySubspace": ".defenses.vlm_guard.artifact",
    "calibrate_cmrm": ".defenses.cmrm.calibration",
    "calibrate_vlm_guard": ".defenses.vlm_guard.calibration",
    "InterferencePrefixProcessor": ".defenses.eta.processors",
    "SentenceBoundaryCriteria": ".defenses.eta.processors",
    "GenerationCall": ".core.runtime",
    "attach": ".core.runtime",
    "detach": ".core.runtime",
    "get_attachment": ".core.runtime",
    "TuneError": ".tuning.sweep",
    "TuneResult": ".tuning.run",
    "tune": ".tuning.run",
}

__all__ = [
    "AdapterError",
    "AddPromptProjection",
    "AddVector",
    "ArtifactError",
    "ClipScorer",
    "CmrmVectors",
    "ConfigError",
    "Defense",
    "DefenseCall",
    "DefenseError",
    "DefenseRecord",
    "Evaluator",
    "Gate",
    "GenerationCall",
    "InterferencePrefixProcessor",
    "Intervention",
    "MODIFIED",
    "ModelAdapter",
    "ModelLoadError",
    "PASS",
    "ProjectOut",
    "REFUSED",
    "RewardScorer",
    "SafetyConfig",
    "SafetyReport",
    "SafetySubspace",
    "SentenceBoundaryCriteria",
    "Strength",
    "SubspaceIntervention",
    "TuneError",
    "TuneResult",
    "VLMSafetyError",
    "attach",
    "calibrate_cmrm",
    "calibrate_vlm_guard",
    "detach",
    "get_attachment",
    "hookimpl",
    "load_config",
    "option",
    "tune",
]


_lazy_getattr, _ = lazy_exports(__name__, _LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return _lazy_getattr(name)
    try:  # a subpackage, e.g. ``vsp.core``
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
