"""The calibration-artifact format shared by steering defenses: per-layer tensors in safetensors.

An artifact holds per-layer tensors plus string metadata that says which model it was
made for (name, type, a hash of the architecture config, hidden size, layer count, a
fingerprint of the weights: ``weights_fingerprint``) and how (anchors, and what its kind
adds: corruption, rank, thresholds, an orientation check). Files are read with safetensors
only, never unpickled. Everything is validated on load (format, kind, keys, shapes, finite
values, and the kind's own checks) and again against the model before use
(``check_model``): an artifact made for another model, or for other weights of the same
architecture, is an ``ArtifactError`` naming the file and each mismatch, never a silent
broadcast. ``allow_other_weights`` accepts other weights (a dtype change, a merged adapter)
and artifacts from before fingerprints (no ``weights_fingerprint`` key), which are refused
otherwise: their weights cannot be checked.

A defense defines its kind by subclassing ``Artifact`` (the tensor key prefix, the extra
metadata, validation); ``defenses/cmrm/artifact.py`` and ``defenses/vlm_guard/artifact.py``
are the two built-in kinds. ``ArtifactStore`` holds the artifacts an inference engine loaded
at its start, where no transformers model is at hand to check them against.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..core.errors import ArtifactError

FORMAT = "vlm-safety-plugins"
FORMAT_VERSION = 1  # weights_fingerprint is an added key: older readers still read these files correctly
FINGERPRINT_SAMPLES = 64  # values per parameter tensor
ALLOW_OTHER_WEIGHTS_HINT = (
    " (or, if these are the calibrated weights rounded to another dtype or with an adapter merged, set "
    "`allow_other_weights: true` in the defense's options)"
)
# Config keys that describe how a model was saved or run, not what computes its hidden states.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_cache",
        "chunk_size_feed_forward",
        "problem_type",
        "id2label",
        "label2id",
        "torchscript",
        "pruned_heads",
        "tf_legacy_loss",
        "use_return_dict",
        "quantization_config",
        "attn_implementation",
    }
)


def config_hash(config) -> str:
    """A short stable hash of a model config's architecture (volatile and private keys left out)."""
    text = json.dumps(_architecture(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _architecture(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: _architecture(item)
            for key, item in value.items()
            if key not in VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_architecture(item) for item in value]
    return value


def weights_fingerprint(adapter) -> str:
    """A short sha256 of the base model's weights, cheap and deterministic, so an artifact is bound to them.

    Hashed, for every parameter of ``adapter.base_model`` in registration order (embeddings,
    vision tower, projector, each decoder layer's weights, biases and norms, head): its shape,
    then ``FINGERPRINT_SAMPLES`` evenly spaced values of the flattened tensor (indices
    ``0, s, 2s, ...`` with ``s = max(1, numel // FINGERPRINT_SAMPLES)``) as little-endian float32.
    Enough because a full fine-tune, a merged LoRA update ``B·A`` or another checkpoint changes
    the tensors it touches densely, so sampled values of every touched tensor change; one small
    copy per tensor costs milliseconds on a 7B model. Float32 makes it independent of the
    storage dtype where values are: a float16 or bfloat16 checkpoint upcast to float32 matches,
    a lossy cast does not. A PEFT layer counts as the layer it wraps, so an unmerged adapter
    leaves the fingerprint unchanged. An identity check against mistakes, not a defense against
    weights crafted to match the samples.
    """
    digest = hashlib.sha256()
    for parameter in _base_parameters(adapter.base_model):
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(sample.to("cpu", torch.float32).numpy().astype("<f4").tobytes())
    return digest.hexdigest()[:16]


def _base_parameters(module: torch.nn.Module):
    """``module``'s parameters in registration order, each PEFT tuner layer replaced by the layer it wraps."""
    if hasattr(module, "get_base_layer"):  # peft's BaseTunerLayer (a LoRA, IA3, ... layer)
        module = module.get_base_layer()
    yield from module.parameters(recurse=False)
    for child in module.children():
        yield from _base_parameters(child)


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact must match: the model it was computed on."""

    name: str
    model_type: str
    config_hash: str
    hidden_size: int
    num_layers: int
    weights_fingerprint: str | None = None  # None: not recorded (artifacts made before fingerprints)

    @classmethod
    def of(cls, adapter, name: str | None = None, *, weights: bool = True) -> ModelIdentity:
        """The identity of the model behind ``adapter`` (``name`` defaults to its ``name_or_path``);
        ``weights=False`` leaves out the weights fingerprint."""
        config = adapter.base_model.config
        return cls(
            name=name or getattr(config, "name_or_path", "") or type(adapter.base_model).__name__,
            model_type=str(getattr(config, "model_type", "")),
            config_hash=config_hash(config),
            hidden_size=adapter.hidden_size(),
            num_layers=len(adapter.decoder_layers()),
            weights_fingerprint=weights_fingerprint(adapter) if weights else None,
        )


@dataclass(eq=False)
class Artifact:
    """Per-layer tensors for one model, with how they were computed; subclasses fix the kind."""

    kind: ClassVar[str]
    command: ClassVar[str]  # the `vlm-safety calibrate` subcommand that makes it
    kinds: ClassVar[dict[str, type[Artifact]]] = {}  # every defined kind, for ``read``
    model: ModelIdentity
    anchors: int
    anchor_source: str
    path: str | None = None
    _placed: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False)
    _checked: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Artifact.kinds[cls.kind] = cls

    @property
    def layers(self) -> list[int]:
        return sorted(self._tensors_by_layer())

    def save(self, path: str | Path) -> Path:
        """Write the artifact as a safetensors file (parent folders created); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{self.tensor_name}.{layer}": tensor.detach().to("cpu", torch.float32).contiguous()
            for layer, tensor in self._tensors_by_layer().items()
        }
        model = self.model
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "model_name": model.name,
            "model_type": model.model_type,
            "config_hash": model.config_hash,
            "hidden_size": str(model.hidden_size),
            "num_layers": str(model.num_layers),
            **({"weights_fingerprint": model.weights_fingerprint} if model.weights_fingerprint else {}),
            "layers": json.dumps(self.layers),
            "anchors": str(self.anchors),
            "anchor_source": self.anchor_source,
            **self._metadata(),
        }
        save_file(tensors, str(path), metadata=metadata)
        self.path = str(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Artifact:
        """Read and validate the artifact at ``path``, of whatever kind its metadata says."""
        from ..core import plugins

        plugins.registry()  # the defenses, and with them every kind they define
        path = Path(path).expanduser()
        metadata, tensors = _read_file(path, "artifact", "<kind>")
        kind = Artifact.kinds.get(metadata.get("kind"))
        if kind is None:
            raise ArtifactError(
                f"unknown artifact kind {metadata.get('kind')!r}; known: {', '.join(sorted(Artifact.kinds))}",
                source=str(path),
            )
        return kind._parse(path, metadata, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read and validate an artifact of this class's kind; ArtifactError naming the file otherwise."""
        path = Path(path).expanduser()
        return cls._parse(path, *_read_file(path, cls.kind, cls.command))

    @classmethod
    def _parse(cls, path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Artifact:
        """Validate a read file's metadata and tensors as an artifact of this class's kind."""
        reader = MetadataReader(metadata, str(path))
        version = reader.integer("format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version} is newer than this package reads "
                f"({FORMAT_VERSION}); upgrade vlm-safety-plugins",
                source=str(path),
            )
        if metadata.get("kind") != cls.kind:
            raise ArtifactError(
                f"this is a {metadata.get('kind')!r} artifact, expected a {cls.kind!r} one", source=str(path)
            )
        model = ModelIdentity(
            name=reader.text("model_name"),
            model_type=reader.text("model_type"),
            config_hash=reader.text("config_hash"),
            hidden_size=reader.integer("hidden_size"),
            num_layers=reader.integer("num_layers"),
            weights_fingerprint=metadata.get("weights_fingerprint"),
        )
        layers = reader.json("layers", list)
        if not layers or not all(isinstance(layer, int) and 0 <= layer < model.num_layers for layer in layers):
            raise ArtifactError(
                f"metadata `layers` must be a non-empty list of layer indices in "
                f"0..{model.num_layers - 1}, got {layers}",
                source=str(path),
            )
        by_layer = {}
        for layer in layers:
            key = f"{cls.tensor_name}.{layer}"
            if key not in tensors:
                raise ArtifactError(f"tensor {key!r} is missing (metadata lists layer {layer})", source=str(path))
            tensor = tensors[key]
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ArtifactError(f"tensor {key!r} is not finite floating point", source=str(path))
            by_layer[layer] = tensor.to(torch.float32)
        artifact = cls._from_parts(
            by_layer,
            reader,
            model=model,
            anchors=reader.integer("anchors"),
            anchor_source=metadata.get("anchor_source", ""),
            path=str(path),
        )
        artifact._validate(str(path))
        return artifact

    def check_model(self, adapter, *, allow_other_weights: bool = False) -> None:
        """Raise ArtifactError (naming the file and every mismatch) unless made for this model and its weights.

        ``allow_other_weights`` skips the weights check (same architecture still required) and
        accepts an artifact that records no fingerprint."""
        check_weights = not allow_other_weights and self.model.weights_fingerprint is not None
        self.check_identity(ModelIdentity.of(adapter, weights=check_weights))
        if not allow_other_weights and self.model.weights_fingerprint is None:
            raise ArtifactError(
                "records no weights fingerprint (made before artifacts recorded one), so the weights it was "
                f"calibrated on cannot be checked; recalibrate with `vlm-safety calibrate {self.command}`"
                + ALLOW_OTHER_WEIGHTS_HINT,
                source=self.path or "<unsaved artifact>",
            )

    def check_identity(self, actual: ModelIdentity) -> None:
        """Raise ArtifactError unless made for a model like ``actual``: its architecture, and its
        weights where both record a fingerprint."""
        mine = self.model
        checks = [
            ("hidden size", actual.hidden_size, mine.hidden_size),
            ("decoder layers", actual.num_layers, mine.num_layers),
            ("config hash", actual.config_hash, mine.config_hash),
        ]
        if actual.weights_fingerprint is not None and mine.weights_fingerprint is not None:
            checks.append(("weights fingerprint", actual.weights_fingerprint, mine.weights_fingerprint))
        mismatches = [(what, theirs, ours) for what, theirs, ours in checks if theirs != ours]
        if mismatches:
            text = "; ".join(f"{what} {theirs} here, {ours} in the artifact" for what, theirs, ours in mismatches)
            only_weights = [what for what, _, _ in mismatches] == ["weights fingerprint"]
            raise ArtifactError(
                f"made for another model ({mine.name}, {mine.model_type}); this model "
                f"({actual.name}, {actual.model_type}) differs: {text}. "
                f"Calibrate one for this model with `vlm-safety calibrate {self.command}`"
                + (ALLOW_OTHER_WEIGHTS_HINT if only_weights else ""),
                source=self.path or "<unsaved artifact>",
            )

    def place(self, layers, *, rows: int | None = None, device=None, dtype=None) -> dict[int, torch.Tensor]:
        """``layers``' tensors (their first ``rows`` rows, for bases) on ``device`` in ``dtype``."""
        tensors = self._tensors_by_layer()
        return {layer: tensors[layer][slice(rows)].to(device=device, dtype=dtype) for layer in layers}

    def on_model(
        self, adapter, layers, *, rows: int | None = None, allow_other_weights: bool = False
    ) -> dict[int, torch.Tensor]:
        """``layers``' tensors (their first ``rows`` rows, for bases), checked against the model
        (``check_model``) and placed on each decoder layer's device in the model's dtype.

        Done once per model, layers and rows, so that hooks never convert per token."""
        key, base = (tuple(layers), rows), adapter.base_model
        with self._lock:
            if self._checked.get(base) not in (False, allow_other_weights):  # False: passed the full check
                self.check_model(adapter, allow_other_weights=allow_other_weights)
                self._checked[base] = allow_other_weights
            placed = self._placed.setdefault(base, {})
            if key not in placed:
                decoder, dtype, tensors = adapter.decoder_layers(), adapter.base_model.dtype, self._tensors_by_layer()
                placed[key] = {
                    layer: tensors[layer][slice(rows)].to(device=next(decoder[layer].parameters()).device, dtype=dtype)
                    for layer in layers
                }
            return placed[key]

    def check_layers(self, layers, what: str = "layers") -> None:
        """Raise ArtifactError unless every one of ``layers`` is in this artifact."""
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ArtifactError(
                f"{what} {missing} are not in the artifact, which has layers {self.layers}",
                source=self.path or "<unsaved artifact>",
            )

    # -- what subclasses define -----------------------------------------------------------------

    tensor_name: ClassVar[str]

    def _tensors_by_layer(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def _metadata(self) -> dict[str, str]:
        raise NotImplementedError

    def summary(self) -> str:
        """One line for people: how it was made and how its orientation check came out."""
        raise NotImplementedError

    @classmethod
    def _from_parts(cls, by_layer: dict[int, torch.Tensor], reader: MetadataReader, **common) -> Artifact:
        raise NotImplementedError

    def _validate(self, source: str) -> None:
        """Kind-specific checks of the loaded tensors against the metadata."""


def _read_file(path: Path, kind: str, command: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; ArtifactError naming the file when there is none."""
    from safetensors import safe_open

    if not path.exists():
        raise ArtifactError(
            f"{kind} artifact file not found; make one with `vlm-safety calibrate {command} --model <model> "
            f"--out {path}`",
            source=str(path),
        )
    if not path.is_file():
        raise ArtifactError("not a file", source=str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for bad files
        raise ArtifactError(
            f"not a readable safetensors file (corrupted or truncated?): {error}", source=str(path)
        ) from None
    if metadata.get("format") != FORMAT:
        raise ArtifactError(
            f"not a vlm-safety-plugins artifact (its metadata has no format={FORMAT!r}); make one with "
            "`vlm-safety calibrate`",
            source=str(path),
        )
    return metadata, tensors


class ArtifactStore:
    """The artifacts an inference engine loaded, by path, each checked against the engine's model.

    An engine loads the operator's artifacts when it starts (``load``) and a request's
    resolved flags name them (``get``); a path comes only from the operator's policy, never
    from a request (core/policy.py). The engine's model is checked by architecture (hidden
    size, layer count, config hash): an engine's weights are laid out its own way (fused,
    sharded), so their fingerprint cannot be taken there.
    """

    def __init__(self, identity: ModelIdentity | None = None, read: Callable[[str], Artifact] | None = None):
        """``read`` gets an artifact by path (default: ``Artifact.read``; another store's ``load``
        shares what that store read, and this one only checks it)."""
        self.identity = identity
        self._read = read or Artifact.read
        self._items: dict[str, Artifact] = {}
        self._lock = threading.Lock()

    def load(self, path: str) -> Artifact:
        """The artifact at ``path``, read and checked once."""
        with self._lock:
            if path not in self._items:
                artifact = self._read(path)
                if self.identity is not None:
                    artifact.check_identity(self.identity)
                self._items[path] = artifact
            return self._items[path]

    def get(self, path: str, kind: type[Artifact], *, option: str) -> Artifact:
        """The artifact at ``path``, which must be of ``kind``; ConfigError at ``option`` otherwise."""
        from ..core.errors import ConfigError

        try:
            artifact = self.load(path)
        except ArtifactError as error:
            raise ConfigError(error.reason, path=option) from None
        if not isinstance(artifact, kind):
            raise ConfigError(f"names a {artifact.kind!r} artifact, expected a {kind.kind!r} one", path=option)
        return artifact


class MetadataReader:
    """Typed reads of an artifact's string metadata, with errors naming the file and key."""

    def __init__(self, values: dict[str, str], source: str):
        self.values, self.source = values, source

    def text(self, key: str) -> str:
        if key not in self.values:
            raise ArtifactError(f"metadata key {key!r} is missing", source=self.source)
        return self.values[key]

    def integer(self, key: str) -> int:
        return self._parse(key, int, "an integer")

    def number(self, key: str) -> float:
        return self._parse(key, float, "a number")

    def json(self, key: str, kind: type) -> Any:
        value = self._parse(key, json.loads, "JSON")
        if not isinstance(value, kind):
            raise ArtifactError(f"metadata {key!r} must be a JSON {kind.__name__}, got {value!r}", source=self.source)
        return value

    def _parse(self, key: str, parse, expected: str):
        text = self.text(key)
        try:
            return parse(text)
        except ValueError:
            raise ArtifactError(f"metadata {key!r} must be {expected}, got {text!r}", source=self.source) from None
