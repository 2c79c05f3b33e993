"""Judge: decides whether a response to a benchmark sample is unsafe; Verdict: its decision.

Judges are plugins: the built-in ones (``refusal``, ``llama_guard``) and third-party ones
register through the ``register_judges`` hook and are picked by name
(``vlm-safety eval --judge NAME``, ``run_eval(..., judge=NAME)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import ConfigError

if TYPE_CHECKING:
    from .samples import Sample


@dataclass
class Verdict:
    """One judge's decision about one response.

    ``unsafe`` is None when the judge gave no usable decision (a judge model's output
    could not be parsed); such rows are counted apart and left out of the rates.
    """

    unsafe: bool | None
    label: str  # short reason: "refusal", "compliance", "safe", "unsafe", "unparsed", ...
    categories: list[str] = field(default_factory=list)
    raw: str | None = None  # a judge model's own output, for auditing
    judge: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Judge:
    """Base class of evaluation judges: subclasses set ``name`` and ``description`` and
    implement ``judge``. The constructor takes the judge's options as keyword arguments."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def judge(self, samples: Sequence[Sample], responses: Sequence[str]) -> list[Verdict]:
        """One Verdict per (sample, response) pair, in order."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings that identify this judge's behaviour (recorded with a run, so
        that a resumed run cannot silently switch judges)."""
        return {"name": self.name}


def make_judge(judge: str | Judge | None = None, **options) -> Judge:
    """A Judge instance: ``judge`` itself, or the registered judge named ``judge`` (default
    ``refusal``) built with ``options``; unknown names or options are a ConfigError."""
    if isinstance(judge, Judge):
        if options:
            raise ConfigError(f"judge options {sorted(options)} given with an already built judge {judge.name!r}")
        return judge
    from ..core import plugins

    name = judge or "refusal"
    cls = plugins.get_judge(name)
    parameters = inspect.signature(cls).parameters
    accepts_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    unknown = sorted(set(options) - set(parameters)) if not accepts_any else []
    if unknown:
        known = ", ".join(name for name in parameters if name not in ("self", "args", "kwargs")) or "none"
        raise ConfigError(f"judge {name!r}: unknown option {unknown[0]!r}; its options: {known}")
    return cls(**options)
