"""Steering (CMRM, VLM-Guard) inside vLLM's worker: one forward hook per decoder layer,
each request's edits routed to its own tokens.

vLLM runs every scheduled request's tokens as one flat batch. The logits processor
(``processor.py``) sees each request's sampling params as it joins the worker's persistent
batch and builds its interventions (``Defense.engine_work``) into ``EngineSteering.rows``,
keyed by batch row. In a forward pass the hook finds each row's tokens from the attention
metadata of vLLM's forward context (``query_start_loc``) and its first position from
``seq_lens``, and edits that slice with the same ``steering/`` code as the transformers
path, one ``ActiveInterventions`` per request. A vLLM decoder layer returns
``(hidden, residual)`` whose sum is the residual stream the transformers layer returns;
an edited layer returns ``(edited stream, 0)``, which the next layer's fused add-norm and the
final norm read exactly as the unedited pair.

The hooks come in through vLLM's ``vllm.general_plugins`` entry point (``register``): when
the operator's policy enables steering (a steering defense, or a steering artifact among
its ``artifacts``), the supported architectures are registered as subclasses whose
constructor installs the hooks, in every vLLM process; the logits processor registers them
again when the worker builds it, before the model loads. A worker extension
(``--worker-extension-cls``) cannot do this: vLLM 0.32 lets one add methods only, reachable
through ``collective_rpc``, which ``vllm serve`` does not expose.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping

import torch

from ..core.errors import ArtifactError, ConfigError
from ..steering.artifacts import ArtifactStore, ModelIdentity, config_hash
from ..steering.interventions import ActiveInterventions
from . import requests

STEERABLE = {  # vLLM architecture name -> the module of vLLM's class for it
    "LlavaForConditionalGeneration": "vllm.model_executor.models.llava",
    "Qwen2VLForConditionalGeneration": "vllm.model_executor.models.qwen2_vl",
    "Gemma3ForConditionalGeneration": "vllm.model_executor.models.gemma3_mm",
}
_ENGINES: dict[str, EngineSteering] = {}  # model path -> its engine's steering, in this process
MAX_PLANS = 256  # steering configurations an engine keeps built


def steering_enabled() -> bool:
    """Whether the operator's policy can steer: a steering defense of its own, or a steering artifact
    among the names a request may use."""
    policy = requests.operator_policy()
    if policy is None:
        return False
    if artifact_paths(policy):
        return True
    work = requests.resolved_work(policy.config)
    return work is not None and work.steering is not None


def artifact_paths(policy) -> list[str]:
    """The files of the policy's ``artifacts`` that are steering artifacts (others name models, e.g.
    a CLIP checkpoint for a gateway in front)."""
    paths = []
    for path in policy.artifacts.values():
        try:
            requests.frontend_artifacts().load(path)
        except ArtifactError:
            continue
        paths.append(path)
    return paths


def register() -> None:
    """The ``vllm.general_plugins`` entry point: replace the supported architectures with steerable
    subclasses, when the operator's policy enables steering (otherwise nothing is registered)."""
    if not steering_enabled():
        return
    from vllm import ModelRegistry

    for architecture, module in STEERABLE.items():
        model_class = steerable(getattr(importlib.import_module(module), architecture))
        if getattr(ModelRegistry.models.get(architecture), "model_cls", None) is not model_class:  # once a process
            ModelRegistry.register_model(architecture, model_class)


@functools.cache
def steerable(base: type) -> type:
    """A subclass of vLLM's model class ``base`` whose constructor installs the steering hooks."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        EngineSteering.install(self, vllm_config)

    namespace = {"__init__": __init__, "__module__": __name__, "__qualname__": f"steerable.{base.__name__}"}
    return type(base.__name__, (base,), namespace)


def check_engine(vllm_config) -> None:
    """At the worker's start: ConfigError when the policy enables steering this engine cannot run."""
    if not steering_enabled():
        return
    architectures = vllm_config.model_config.architectures or []
    if not any(architecture in STEERABLE for architecture in architectures):
        raise ConfigError(
            f"the operator's policy ({requests.POLICY_ENV}) enables steering, but this model's architecture "
            f"({', '.join(architectures) or 'unknown'}) is not one vlm-safety-plugins steers inside vLLM "
            f"({', '.join(STEERABLE)})"
        )
    if not vllm_config.model_config.enforce_eager:
        raise ConfigError(
            f"the operator's policy ({requests.POLICY_ENV}) enables steering, which needs vLLM's eager mode: "
            "start it with --enforce-eager (forward hooks do not run inside compiled graphs)"
        )
    register()  # the worker builds its logits processors before it loads the model: hooked even where
    # VLLM_PLUGINS leaves the general plugin out


def engine(vllm_config) -> EngineSteering | None:
    """The steering of the engine of this config's model, in this process (None: not installed).

    Keyed by the model's path: vLLM hands the model and the logits processors copies of the
    config (each copy a new ``instance_id``), and a process runs one engine per model."""
    return _ENGINES.get(str(vllm_config.model_config.model))


class EngineSteering:
    """One engine's steering hooks and the interventions of the requests in its batch."""

    def __init__(self, layers, identity: ModelIdentity, image_token: int, device, dtype: torch.dtype):
        self.artifacts = ArtifactStore(identity, read=requests.frontend_artifacts().load)  # each file read once
        self.image_token, self.device, self.dtype = image_token, device, dtype
        self.rows: Mapping[int, ActiveInterventions] = {}  # persistent batch row -> its request's edits
        self._placed: dict[tuple, dict[int, torch.Tensor]] = {}
        self._plans: dict[tuple[str, bool], tuple] = {}  # (steering configuration, has image) -> interventions
        self._spans: tuple[object, list[tuple[int, int, int, int]]] | None = None
        for index, layer in enumerate(layers):
            layer.register_forward_hook(functools.partial(self._hook, index))

    @classmethod
    def install(cls, model: torch.nn.Module, vllm_config) -> None:
        """Hook the decoder layers of ``model`` and load the operator's artifacts, checked against it."""
        layers = model.language_model.model.layers
        hf_config = vllm_config.model_config.hf_config
        identity = ModelIdentity(
            name=str(vllm_config.model_config.model),
            model_type=str(getattr(hf_config, "model_type", "")),
            config_hash=config_hash(hf_config),
            hidden_size=hf_config.get_text_config().hidden_size,
            num_layers=len(layers),
        )
        image_token = getattr(hf_config, "image_token_index", None)
        image_token = getattr(hf_config, "image_token_id", None) if image_token is None else image_token
        if image_token is None:  # without it no request would count as an image request, and go unsteered
            raise ConfigError(f"the model config of {identity.name} names no image token id; cannot steer it")
        device = next(model.language_model.parameters()).device
        steering = cls(layers, identity, image_token, device, vllm_config.model_config.dtype)
        policy = requests.operator_policy()
        if policy is not None:
            for path in artifact_paths(policy):
                steering.artifacts.load(path)
            requests.resolved_work(policy.config, steering.artifacts)  # the policy's own artifacts, checked
        _ENGINES[str(vllm_config.model_config.model)] = steering

    def row(self, prompt_ids, steering, key: str) -> ActiveInterventions | None:
        """The edits of a request joining the batch (None: it has none). Requests whose steering
        configurations (``key``) and image-ness match share one plan of interventions, so their
        generated tokens are edited together."""
        has_image = self.image_token in prompt_ids
        if (key, has_image) not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key, has_image] = tuple(steering(_Row(self, has_image)))
        plan = self._plans[key, has_image]
        return ActiveInterventions(self, plan, prompt_length=len(prompt_ids), batch_size=1) if plan else None

    def place(self, artifact, layers, rows) -> dict[int, torch.Tensor]:
        key = (artifact.path, tuple(layers), rows)
        if key not in self._placed:
            self._placed[key] = artifact.place(layers, rows=rows, device=self.device, dtype=self.dtype)
        return self._placed[key]

    def _hook(self, index, module, args, output):
        """Edit each steered row's tokens in place: ``hidden ← edited stream``, ``residual ← 0``.

        Both are this layer's own output buffers (vLLM's fused add-norms update them in place
        too), so only the edited rows are written; nothing of the batch is copied."""
        if not self.rows:
            return None
        hidden, residual = output
        generated: dict[int, tuple[list[int], list[ActiveInterventions]]] = {}  # plan -> its decoding rows
        for row, first, end, start in self._row_spans():
            state = self.rows.get(row)
            if state is None or index not in state.layers:
                continue
            if end - first == 1 and start >= state.prompt_length:  # one generated token: with its plan's others
                tokens, states = generated.setdefault(id(state.interventions[0]), ([], []))
                tokens.append(first)
                states.append(state)
                continue
            skip = max(0, state.first_position[index] - start)  # a prompt's tokens before any edit or read
            if first + skip >= end:
                continue
            where = slice(first + skip, end)
            span = _stream(hidden, residual, where).unsqueeze(0)
            edited = state(index, span, start=start + skip)
            if edited is not span:
                _write(hidden, residual, where, edited[0])
        for tokens, states in generated.values():
            where = torch.tensor(tokens, device=hidden.device)
            span = _stream(hidden, residual, where).unsqueeze(1)
            edited = ActiveInterventions.step_together(states, index, span)
            if edited is not span:
                _write(hidden, residual, where, edited[:, 0])
        return None

    def _row_spans(self) -> list[tuple[int, int, int, int]]:
        """(row, first token, end token, first position) of each row in this forward pass; [] outside one."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return []
        context = get_forward_context()
        if self._spans is not None and self._spans[0] is context:
            return self._spans[1]
        metadata = context.attn_metadata
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        spans = []
        if metadata is not None and not isinstance(metadata, list):
            starts = _cpu_list(getattr(metadata, "query_start_loc_cpu", metadata.query_start_loc))
            lengths = _cpu_list(getattr(metadata, "seq_lens_cpu", metadata.seq_lens))
            for row, length in enumerate(lengths):
                first, end = starts[row], starts[row + 1]
                if end > first:
                    spans.append((row, first, end, length - (end - first)))
        self._spans = (context, spans)
        return spans


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None, where) -> torch.Tensor:
    """The residual stream (what the transformers layer returns) at the tokens ``where``."""
    return hidden[where] if residual is None else hidden[where] + residual[where]


def _write(hidden: torch.Tensor, residual: torch.Tensor | None, where, stream: torch.Tensor) -> None:
    """Set the stream at ``where``: all of it in ``hidden``, none in ``residual``."""
    hidden[where] = stream
    if residual is not None:
        residual[where] = 0


class _Row:
    """A request as its steering is built (core.defense.EngineRow)."""

    def __init__(self, engine: EngineSteering, has_image: bool):
        self._engine, self.has_image = engine, has_image

    def place(self, artifact, layers, *, rows=None):
        return self._engine.place(artifact, layers, rows)


def _cpu_list(tensor) -> list[int]:
    return tensor.tolist() if isinstance(tensor, torch.Tensor) else list(tensor)
