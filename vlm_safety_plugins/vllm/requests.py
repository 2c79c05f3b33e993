"""A vLLM request's safety flags, the operator's policy, and what of them the engine runs.

A request's own flags are the entry ``vlm_safety`` of ``SamplingParams.extra_args``: a JSON
string of a safety config (over HTTP, ``vllm_xargs`` takes scalar values only), or, in
process, the mapping itself. The operator's policy is the YAML file that the environment
variable ``VLM_SAFETY_POLICY`` names when the server starts (core/policy.py): with one,
every request runs it under its ``client_flags``; without one, a request that asks for
nothing is untouched. Each defense says what of it runs in the engine
(``Defense.engine_work``); one that cannot run there is an error naming it, never a
silently weaker answer.
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

EXTRA_ARGS_KEY = GENERATION_CONFIG_KEY
POLICY_ENV = "VLM_SAFETY_POLICY"
SOURCE = f"extra_args.{EXTRA_ARGS_KEY}"


@functools.cache
def operator_policy() -> Policy | None:
    """The policy of the file ``VLM_SAFETY_POLICY`` names, read once per process; None without one."""
    path = os.environ.get(POLICY_ENV)
    return load_policy(path) if path else None


def request_flags(extra_args: Mapping[str, Any] | None) -> SafetyConfig | None:
    """The request's own flags (None: it sent none, or ``null``)."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if isinstance(raw, str):
        try:
            raw = parse_json(raw)
        except ValueError as error:
            raise ConfigError(f"not a JSON safety config: {error}", source=SOURCE) from None
    return None if raw is None else SafetyConfig.from_dict(raw, source=SOURCE)


def engine_work(extra_args: Mapping[str, Any] | None) -> EngineWork | None:
    """What the engine runs for a request: its flags under the operator's policy, each
    defense's engine part combined; None when no defense applies. Raises ConfigError."""
    flags, policy = request_flags(extra_args), operator_policy()
    config = policy.resolve(flags)[0] if policy is not None else flags
    if config is None or not config.enabled:
        return None
    prefixes = []
    for name, options in config.defenses.items():
        try:
            work = plugins.get_defense(name).engine_work(options)
        except ConfigError as error:
            raise ConfigError(error.reason, source=config.source, path=error.path) from None
        if work.answer_prefix is not None:
            prefixes.append(work.answer_prefix)
    if len(prefixes) > 1:
        raise ConfigError("more than one defense forces the answer's opening", source=config.source)
    return EngineWork(answer_prefix=prefixes[0] if prefixes else None)
