"""A vLLM request's safety flags, the operator's policy, and what of them the engine runs.

A request's own flags are the entry ``vlm_safety`` of ``SamplingParams.extra_args``: a JSON
string of a safety config (over HTTP, ``vllm_xargs`` takes scalar values only), or, in
process, the mapping itself. The operator's policy is the YAML file that the environment
variable ``VLM_SAFETY_POLICY`` names when the server starts (core/policy.py): with one,
every request runs it under its ``client_flags``; without one, a request that asks for
nothing is untouched, and one that asks may name no file (there are no operator artifacts
to name). Each defense says what of it runs in the engine (``Defense.engine_work``); one
that cannot run there is an error naming it, never a silently weaker answer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from ..core import plugins
from ..core.config import GENERATION_CONFIG_KEY, SafetyConfig, parse_json
from ..core.defense import EngineWork
from ..core.errors import ConfigError
from ..core.policy import Policy, load_policy
from ..steering.artifacts import ArtifactStore

EXTRA_ARGS_KEY = GENERATION_CONFIG_KEY
POLICY_ENV = "VLM_SAFETY_POLICY"
SOURCE = f"extra_args.{EXTRA_ARGS_KEY}"
NO_POLICY = Policy(SafetyConfig(), client_flags="any")
"""Without an operator policy a request's flags decide, and it may name no file."""


@functools.cache
def operator_policy() -> Policy | None:
    """The policy of the file ``VLM_SAFETY_POLICY`` names, read once per process; None without one."""
    path = os.environ.get(POLICY_ENV)
    return load_policy(path) if path else None


@functools.cache
def frontend_artifacts() -> ArtifactStore:
    """The artifacts the API server's process checks requests against (the worker checks its own)."""
    return ArtifactStore()


def request_flags(extra_args: Mapping[str, Any] | None) -> SafetyConfig | None:
    """The request's own flags (None: it sent none, or ``null``)."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if isinstance(raw, str):
        try:
            raw = parse_json(raw)
        except ValueError as error:
            raise ConfigError(f"not a JSON safety config: {error}", source=SOURCE) from None
    return None if raw is None else SafetyConfig.from_dict(raw, source=SOURCE)


def resolved_config(extra_args: Mapping[str, Any] | None) -> SafetyConfig:
    """The config a request runs: its flags under the operator's policy. Raises ConfigError."""
    return (operator_policy() or NO_POLICY).resolve(request_flags(extra_args))[0]


def engine_work(extra_args: Mapping[str, Any] | None, artifacts: ArtifactStore | None = None) -> EngineWork | None:
    """What the engine runs for a request: its flags under the operator's policy, each defense's
    engine part combined; None when no defense applies. Raises ConfigError."""
    return resolved_work(resolved_config(extra_args), artifacts)


def resolved_work(config: SafetyConfig, artifacts: ArtifactStore | None = None) -> EngineWork | None:
    """The engine part of a resolved config, its files from ``artifacts`` (default: the API
    server's store); None: nothing to do. ConfigError naming the key."""
    if not config.enabled:
        return None
    artifacts = artifacts or frontend_artifacts()
    works = []
    for name, options in config.defenses.items():
        try:
            works.append(plugins.get_defense(name).engine_work(options, artifacts))
        except ConfigError as error:
            raise ConfigError(error.reason, source=config.source, path=error.path) from None
    prefixes = [work.answer_prefix for work in works if work.answer_prefix is not None]
    if len(prefixes) > 1:
        raise ConfigError("more than one defense forces the answer's opening", source=config.source)
    steerings = [work.steering for work in works if work.steering is not None]
    return EngineWork(
        answer_prefix=prefixes[0] if prefixes else None,
        steering=(lambda row: [edit for steering in steerings for edit in steering(row)]) if steerings else None,
    )
