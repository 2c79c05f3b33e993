"""vlm-safety-plugins: inference-time safety defenses for transformers vision-language models.

    import vlm_safety_plugins as vsp
    vsp.attach(model, processor)
    gen = vsp.load_config("configs/adashield.yaml").to_generation_config(max_new_tokens=64)
    out = model.generate(**inputs, images=[image], generation_config=gen, return_dict_in_generate=True)
    out.sequences, out.safety
"""

from .adapters import ModelAdapter
from .config import SafetyConfig, load_config
from .defense import Defense
from .errors import AdapterError, ConfigError, DefenseError, VLMSafetyError
from .evaluator import Evaluator
from .hookspecs import hookimpl
from .interventions import AddVector, Gate, Intervention, ProjectOut
from .options import option
from .report import DefenseRecord, SafetyReport
from .runtime import GenerationCall, attach, detach, get_attachment

__all__ = [
    "AdapterError", "AddVector", "ConfigError", "Defense", "DefenseError", "DefenseRecord", "Evaluator",
    "Gate", "GenerationCall", "Intervention", "ModelAdapter", "ProjectOut", "SafetyConfig", "SafetyReport",
    "VLMSafetyError", "attach", "detach", "get_attachment", "hookimpl", "load_config", "option",
]
