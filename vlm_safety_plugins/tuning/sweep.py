"""The points a tuning run evaluates, and the rule that picks one.

A point is one setting of the defense's ``Strength`` options (core/options.py) on top of
the user's base config. The grid is every combination of their values (an option left out
where it does not apply, ``Strength.when``); ``--values`` replaces an option's declared
values or adds an option. The rule: among the points whose benign accuracy is at least
``budget`` × the undefended model's, the lowest unsafe rate; ties go to the higher benign
accuracy, then to the weaker setting (earlier in the grid). A point whose defense failed on
any sample is never chosen: its refusals would look safe. A chosen point no safer than the
undefended model is no choice either (the defense would be on and do nothing): the tuner
says so, naming the safest setting and what it costs.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import VLMSafetyError
from ..core.options import Strength, is_number

OBJECTIVES = ("image", "all")
"""Which unsafe rate to minimise: harmful requests with an image (the degradation these
defenses target), or every harmful request."""


class TuneError(VLMSafetyError):
    """A tuning run that cannot start or cannot choose (no point meets the budget)."""


@dataclass
class Point:
    """One evaluated setting: its values, its rates, and where its run folder is."""

    values: dict[str, Any]
    folder: str
    unsafe: float | None = None
    benign: float | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    defense_errors: int = 0
    invalid: str | None = None
    """Why the setting could not run (options the artifact does not have, ...): never chosen."""
    stage: str = "grid"

    def label(self) -> str:
        return label(self.values)

    @property
    def ran(self) -> bool:
        """It ran and its defense never failed: its rates can be trusted."""
        return self.invalid is None and not self.defense_errors

    def meets(self, floor: float) -> bool:
        return self.ran and self.unsafe is not None and self.benign is not None and self.benign >= floor

    def to_dict(self, floor: float) -> dict:
        record = {
            "values": self.values,
            "stage": self.stage,
            "unsafe": self.unsafe,
            "benign_accuracy": self.benign,
            **self.counts,
            "defense_errors": self.defense_errors,
            "folder": self.folder,
        }
        if self.invalid is not None:
            record["invalid"] = self.invalid
        record["meets_budget"] = self.meets(floor)
        return record


def label(values: Mapping[str, Any]) -> str:
    """A setting as people read it: ``alpha=0.35``, ``mode=both, rank=2``."""
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "base config"


def strengths(declared: Sequence[Strength], values: Mapping[str, Sequence[Any]] | None) -> list[Strength]:
    """The declared strengths with ``values`` replacing an option's values (or adding an option, refined
    when its values are real numbers)."""
    values = dict(values or {})
    chosen = []
    for strength in declared:
        if strength.option in values:
            given = tuple(values.pop(strength.option))
            refine = strength.refine and all(is_number(value) for value in given)
            strength = dataclasses.replace(strength, values=given, refine=refine)
        chosen.append(strength)
    for option, given in values.items():  # refined when real-valued: an integer option takes no midpoint
        real = all(is_number(value) for value in given) and any(isinstance(value, float) for value in given)
        chosen.append(Strength(option, tuple(given), refine=real))
    return chosen


def grid(swept: Sequence[Strength]) -> list[dict[str, Any]]:
    """Every combination of the strengths' values, in order (the first option varies slowest); an option
    left out where it does not apply (``Strength.when``), so each distinct setting comes once."""
    settings = []
    for combo in itertools.product(*(s.values for s in swept)):
        values = dict(zip([s.option for s in swept], combo))
        setting = {s.option: values[s.option] for s in swept if s.applies(values)}
        if setting not in settings:
            settings.append(setting)
    return settings


def point_config(base: Mapping, defense: str, values: Mapping[str, Any]) -> dict:
    """The base config (a mapping, as read from YAML) with ``values`` set in the defense's options."""
    config = copy.deepcopy(dict(base))
    options = config.setdefault("defenses", {}).setdefault(defense, {})
    if options is None:
        options = config["defenses"][defense] = {}
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[key] = value
    return config


def floor_of(vanilla: Point, budget: float) -> float:
    """The benign accuracy a point must keep: ``budget`` × the undefended model's."""
    if vanilla.benign is None:
        raise TuneError("the validation samples have no graded benign answers: the budget needs benign accuracy")
    return budget * vanilla.benign


def select(points: Sequence[Point], floor: float) -> Point | None:
    """The point the rule picks (module docstring); None if none meets ``floor``."""
    meeting = [(index, point) for index, point in enumerate(points) if point.meets(floor)]
    if not meeting:
        return None
    return min(meeting, key=lambda item: (item[1].unsafe, -item[1].benign, item[0]))[1]


def closest(points: Sequence[Point]) -> Point | None:
    """The point that came nearest the budget: the highest benign accuracy, then the lowest unsafe rate."""
    valid = [p for p in points if p.ran and p.benign is not None]
    return max(valid, key=lambda point: (point.benign, -(point.unsafe or 0.0)), default=None)


def safest(points: Sequence[Point]) -> Point | None:
    """The setting with the lowest unsafe rate, whatever its benign accuracy (then the higher benign accuracy)."""
    valid = [p for p in points if p.ran and p.unsafe is not None]
    return min(valid, key=lambda point: (point.unsafe, -(point.benign or 0.0)), default=None)


def frontier(points: Sequence[Point]) -> list[Point]:
    """The settings no other is both at least as safe and at least as useful as (and better in one),
    one per position (the earliest in the grid): the trade-offs a plot names."""
    valid = [p for p in points if p.ran and p.unsafe is not None and p.benign is not None]
    kept, seen = [], set()
    for point in valid:
        where = (point.unsafe, point.benign)
        dominated = any(
            q.unsafe <= point.unsafe and q.benign >= point.benign and (q.unsafe, q.benign) != where for q in valid
        )
        if not dominated and where not in seen:
            kept.append(point)
            seen.add(where)
    return kept


def bisect_bounds(points: Sequence[Point], chosen: Point, strength: Strength, floor: float):
    """(meeting value, failing value) to bisect ``strength`` between: the chosen point's value and
    its stronger neighbour in the grid (the other options as chosen) when that one misses the
    budget; None when there is nothing to refine."""
    if not strength.refine or strength.option not in chosen.values:  # not swept where it does not apply
        return None
    value = chosen.values[strength.option]
    ordered = sorted(
        (p for p in points if _same_except(p.values, chosen.values, strength.option)),
        key=lambda p: _position(strength, p.values[strength.option]),
    )
    stronger = [p for p in ordered if _position(strength, p.values[strength.option]) > _position(strength, value)]
    if not stronger or stronger[0].meets(floor):
        return None
    return value, stronger[0].values[strength.option]


def midpoint(low: float, high: float) -> float:
    """Halfway, rounded to what a config file shows (4 significant digits)."""
    return float(f"{(low + high) / 2:.4g}")


def _position(strength: Strength, value) -> float:
    """Where ``value`` lies from weakest (0) to strongest along the strength's declared order."""
    first, last = strength.values[0], strength.values[-1]
    if strength.refine and first != last:
        return (value - first) / (last - first)
    return strength.values.index(value) if value in strength.values else -1


def _same_except(values: Mapping, other: Mapping, option: str) -> bool:
    return all(values.get(key) == other.get(key) for key in set(values) | set(other) if key != option)
