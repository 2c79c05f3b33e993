"""Policy: the operator's floor of defenses, which no request can lower.

A policy is a safety config plus one setting, ``client_flags``, that says what a request's
own ``vlm_safety`` flags may do:

- ``none`` (default): a request carrying flags is refused with a clear error; every call
  runs the operator's defenses.
- ``add``: a request may add defenses the policy lacks, and nothing else (naming one of the
  operator's defenses, or ``on_error`` / ``refusal``, is an error).
- ``any``: the request's flags replace the policy's (development only; each report says so).

A request without flags, with ``null``, or with exactly the operator's own flags (a copy of
the model's generation config, as servers make) runs the operator's defenses. The YAML form
is a safety config with two top-level keys of its own, ``client_flags`` and ``artifacts``::

    client_flags: add
    artifacts:                 # names a request may use for files (names_file options)
      llava-cmrm: artifacts/llava-1.5-7b-hf.cmrm.safetensors
    defenses:
      eta: {...}

A request never makes the process read a path: an option that names a file or a model
(``option(names_file=True)``: an artifact, a CLIP or reward checkpoint) in a request's flags
must be the option's default or a name of the policy's ``artifacts``, which the policy
replaces with the operator's path.

Set with ``attach(model, processor, policy=...)`` (a Policy, a YAML path or a mapping).
Without a policy, code that calls generate is its own operator: the call's flags decide.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .config import SafetyConfig, read_yaml_file
from .errors import ConfigError
from .options import quote

CLIENT_FLAGS = ("none", "add", "any")
OPERATOR, REQUEST = "operator", "request"


@dataclass(frozen=True)
class Policy:
    """The operator's SafetyConfig and what request flags may do (``client_flags``)."""

    config: SafetyConfig
    client_flags: Literal["none", "add", "any"] = "none"
    artifacts: dict[str, str] = field(default_factory=dict)
    """Names a request may give for files, each the operator's path."""
    origins: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.client_flags not in CLIENT_FLAGS:
            raise ConfigError(
                f"expected one of {', '.join(map(repr, CLIENT_FLAGS))}, got {quote(self.client_flags)}",
                source=self.config.source,
                path="client_flags",
            )
        if not isinstance(self.artifacts, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) and value for key, value in self.artifacts.items()
        ):
            raise ConfigError("expected a mapping of names to file paths", source=self.config.source, path="artifacts")
        object.__setattr__(self, "origins", dict.fromkeys(self.config.defenses, OPERATOR))

    def resolve(self, request: SafetyConfig | None) -> tuple[SafetyConfig, dict[str, str]]:
        """(the config a call runs, each defense's origin) for a request's flags (None: it sent none)."""
        if request is None or request == self.config:
            return self.config, self.origins
        if self.client_flags == "none":
            raise ConfigError(
                "this model's operator policy does not accept flags from requests (client_flags: none); "
                "send the request without `vlm_safety`",
                source=request.source,
            )
        request = self._with_operator_files(request)
        if self.client_flags == "any":
            return request, dict.fromkeys(request.defenses, f"{REQUEST} (client_flags: any)")
        taken = [name for name in request.defenses if name in self.config.defenses]
        if taken:
            raise ConfigError(
                f"defense {taken[0]!r} is set by the operator's policy; a request may only add others "
                "(client_flags: add)",
                source=request.source,
                path=f"defenses.{taken[0]}",
            )
        for key in ("on_error", "refusal"):
            if getattr(request, key) != getattr(SafetyConfig(), key) and getattr(request, key) != getattr(
                self.config, key
            ):
                raise ConfigError(
                    "set by the operator's policy; a request may only add defenses (client_flags: add)",
                    source=request.source,
                    path=key,
                )
        merged = SafetyConfig(
            defenses={**self.config.defenses, **request.defenses},
            on_error=self.config.on_error,
            refusal=self.config.refusal,
            source=self.config.source,
        )
        return merged, {**self.origins, **dict.fromkeys(request.defenses, REQUEST)}

    def _with_operator_files(self, request: SafetyConfig) -> SafetyConfig:
        """The request's flags with every file it names replaced by the operator's path for that name."""
        defenses = {
            name: self._operator_files(options, f"defenses.{name}", request.source)
            for name, options in request.defenses.items()
        }
        return dataclasses.replace(request, defenses=defenses)

    def _operator_files(self, options, path: str, source: str | None):
        if not dataclasses.is_dataclass(options):
            return options
        changes = {}
        for f in dataclasses.fields(options):
            value, key_path = getattr(options, f.name), f"{path}.{f.name}"
            if dataclasses.is_dataclass(value):
                changes[f.name] = self._operator_files(value, key_path, source)
            elif f.metadata.get("names_file") and value != f.default:
                if value not in self.artifacts:
                    names = ", ".join(map(repr, sorted(self.artifacts))) or "none: the policy lists no `artifacts`"
                    raise ConfigError(
                        f"a request names files only by the operator's artifact names ({names}), got {quote(value)}",
                        source=source,
                        path=key_path,
                    )
                changes[f.name] = self.artifacts[value]
        return dataclasses.replace(options, **changes) if changes else options


def load_policy(source: str | os.PathLike | Mapping | Policy | SafetyConfig) -> Policy:
    """A Policy from a YAML path or a mapping (a safety config plus ``client_flags``), a
    SafetyConfig (``client_flags: none``), or a Policy (returned as is)."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, SafetyConfig):
        return Policy(source)
    name = "<dict>"
    if not isinstance(source, Mapping):
        name, source = str(source), read_yaml_file(source)
    if not isinstance(source, Mapping):
        raise ConfigError("a policy is a mapping: a safety config with `client_flags`", source=name)
    data = dict(source)
    client_flags, artifacts = data.pop("client_flags", "none"), data.pop("artifacts", None) or {}
    return Policy(SafetyConfig.from_dict(data, source=name), client_flags, artifacts)
