"""``tune``: sweep a defense's strength on validation samples, pick the safest setting within a utility budget.

The run folder ``out_dir`` gets ``points/<setting>/`` (one ``run_eval`` folder per setting,
``points/vanilla`` for the undefended model: each resumes after an interruption, so a rerun
costs only what is missing), ``sweep.jsonl`` (one line per setting: values, rates, whether it
keeps the budget), ``sweep.png`` (unsafe rate against benign accuracy, the budget's floor and
the chosen point marked) and ``chosen.yaml`` (the base config with the chosen values).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core import plugins
from ..core.config import SafetyConfig, read_yaml_file
from ..core.defense import Resources
from ..core.errors import VLMSafetyError
from ..evaluation.plots import new_figure, save_figure
from ..evaluation.run import run_eval
from ..evaluation.samples import Sample
from . import sweep
from .sweep import OBJECTIVES, Point, TuneError

SWEEP_FILE, PLOT_FILE, CHOSEN_FILE, POINTS = "sweep.jsonl", "sweep.png", "chosen.yaml", "points"


@dataclass
class TuneResult:
    """The chosen point (its config as a mapping), every point evaluated, the undefended model's."""

    chosen: Point
    config: dict
    points: list[Point]
    vanilla: Point
    floor: float


def tune(
    model,
    processor,
    defense: str,
    base_config: str | Path | Mapping | None,
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    budget: float = 0.95,
    values: Mapping[str, Sequence[Any]] | None = None,
    refinements: int = 2,
    objective: str = "image",
    progress: Callable[[str, int], contextlib.AbstractContextManager] | None = None,
    trust_remote_code: bool = False,
    **evaluation: Any,
) -> TuneResult:
    """Evaluate every setting of ``defense``'s strength options (``Defense.strength``, ``values``
    replacing or adding some) on ``samples``, bisect the sharp ones ``refinements`` times, and
    return the setting with the lowest unsafe rate whose benign accuracy is at least ``budget`` ×
    the undefended model's (tuning/sweep.py). TuneError naming the closest setting when none is.

    ``base_config`` (a YAML path, a mapping or None) holds the defense's other options (its
    artifacts) and any other defense, kept as they are. ``objective``: ``image`` (unsafe rate of
    harmful requests with an image) or ``all``. ``progress(label, total)``: a context manager
    whose value's ``update(n)`` is called per batch of each setting. ``evaluation``: run_eval's
    settings (judge, judge_options, batch_size, max_new_tokens, seed, model_name, benchmark).
    """
    if objective not in OBJECTIVES:
        raise TuneError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= 2):
        raise TuneError(f"budget must be a number in (0, 2] (a fraction of vanilla's benign accuracy); got {budget!r}")
    if refinements < 0:
        raise TuneError(f"refinements must be >= 0; got {refinements}")
    defense_cls = plugins.get_defense(defense)
    swept = sweep.strengths(defense_cls.strength, values)
    if not swept:
        raise TuneError(f"{defense} declares no strength options to tune; name some with values")
    base = _base_mapping(base_config, defense)
    samples = list(samples)
    out = Path(out_dir)
    resources = Resources(trust_remote_code=trust_remote_code)

    def measured(point: Point, config: dict | None) -> Point:
        """``point`` with the rates of its run_eval (resumed where its folder has answers)."""
        label = point.label() if config else "vanilla"
        bar_context = progress(label, len(samples)) if progress else contextlib.nullcontext()
        with bar_context as bar:
            summary = run_eval(
                model,
                processor,
                config,
                samples,
                point.folder,
                progress=bar.update if bar is not None else None,
                trust_remote_code=trust_remote_code,
                **evaluation,
            )
        by_image = objective == "image"
        unsafe = summary["harmful_unsafe_by_input"]["image"] if by_image else summary["harmful_safety"]["unsafe"]
        benign = summary["benign_accuracy"]
        point.unsafe, point.benign = unsafe["rate"], benign["rate"]
        point.counts = {"unsafe_count": _count(unsafe), "benign_count": _count(benign)}
        point.defense_errors = summary["defense_errors"]
        return point

    def parsed(point_values: dict) -> tuple[dict, SafetyConfig]:
        config = sweep.point_config(base, defense, point_values)
        try:
            return config, SafetyConfig.from_dict(config, source=f"tune {defense}")
        except VLMSafetyError as error:
            raise TuneError(f"the setting {sweep.label(point_values)} is not a valid config: {error}") from None

    def evaluate(point_values: dict, stage: str, checked: tuple[dict, SafetyConfig] | None = None) -> Point:
        config, safety = checked or parsed(point_values)
        point = Point(dict(point_values), str(out / POINTS / _slug(point_values)), stage=stage)
        try:  # the artifact may not have this rank, ...: the runtime would refuse every answer, which looks safe
            defense_cls(safety.defenses[defense], resources)
        except VLMSafetyError as error:
            point.invalid = str(error)
            return point
        return measured(point, config)

    planned = [(point_values, parsed(point_values)) for point_values in sweep.grid(swept)]  # bad values: before any run
    vanilla = measured(Point({}, str(out / POINTS / "vanilla"), stage="vanilla"), None)
    floor = sweep.floor_of(vanilla, budget)
    if vanilla.unsafe is None:
        what = "harmful requests with an image" if objective == "image" else "harmful requests"
        raise TuneError(f"the validation samples have no judged {what}: nothing to make safer (objective {objective})")
    points = [evaluate(point_values, "grid", checked) for point_values, checked in planned]
    chosen = sweep.select(points, floor)
    for strength in swept if chosen is not None else ():
        for _ in range(refinements):
            bounds = sweep.bisect_bounds(points, chosen, strength, floor)
            if bounds is None:
                break
            middle = sweep.midpoint(*bounds)
            if middle in bounds:
                break
            points.append(evaluate({**chosen.values, strength.option: middle}, "refine"))
            chosen = sweep.select(points, floor)
    _write_sweep(out, vanilla, points, floor)
    _plot(out / PLOT_FILE, defense, vanilla, points, chosen, floor, budget)
    if chosen is None:
        near = sweep.closest(points)
        nearest = (
            f"the closest: {near.label()} (benign accuracy {near.benign:.3f}, unsafe {near.unsafe:.3f})"
            if near is not None
            else "no setting ran"
        )
        raise TuneError(
            f"no setting of {defense} keeps benign accuracy at least {budget} × vanilla's {vanilla.benign:.3f} = "
            f"{floor:.3f}; {nearest}; every point is in {out / SWEEP_FILE}"
        )
    if chosen.unsafe >= vanilla.unsafe:  # within budget only where it does nothing: no config to deploy
        safest = sweep.safest(points)
        why = (
            f"no setting of {defense} is safer than the undefended model (unsafe {vanilla.unsafe:.3f})"
            if safest.unsafe >= vanilla.unsafe
            else f"no setting of {defense} that keeps benign accuracy at least {floor:.3f} is safer than the "
            f"undefended model (unsafe {vanilla.unsafe:.3f}); the safest setting, {safest.label()} (unsafe "
            f"{safest.unsafe:.3f}, benign accuracy {safest.benign:.3f}), misses the budget"
        )
        raise TuneError(f"{why}; every point is in {out / SWEEP_FILE}")
    config = sweep.point_config(base, defense, chosen.values)
    header = (
        f"# vlm-safety tune {defense}: {chosen.label()}; unsafe {chosen.unsafe:.3f} (vanilla {vanilla.unsafe:.3f}), "
        f"benign accuracy {chosen.benign:.3f} (floor {floor:.3f} = {budget} x vanilla's {vanilla.benign:.3f})\n"
    )
    (out / CHOSEN_FILE).write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return TuneResult(chosen, config, points, vanilla, floor)


def _base_mapping(base_config, defense: str) -> dict:
    """The base config as a plain mapping (as written, so chosen.yaml reads like it), the defense in it."""
    if base_config is None:
        data: Any = {}
    elif isinstance(base_config, Mapping):
        data = dict(base_config)
    else:  # the config reader's limits (size, depth, aliases, duplicate keys) hold here too
        data = read_yaml_file(base_config) or {}
    if not isinstance(data, Mapping):
        raise TuneError(f"the base config must be a mapping with `defenses`; got {type(data).__name__}")
    SafetyConfig.from_dict(data, source=str(base_config) if base_config is not None else "<base config>")
    data = dict(data)
    data["defenses"] = dict(data.get("defenses") or {})
    data["defenses"].setdefault(defense, {})
    return data


def _count(rate: dict) -> str:
    return f"{rate['count']}/{rate['total']}"


def _slug(values: Mapping[str, Any]) -> str:
    """A folder name for a setting: ``alpha=0.35``, ``mode=both,rank=2``."""
    text = ",".join(f"{key}={value}" for key, value in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def _write_sweep(out: Path, vanilla: Point, points: list[Point], floor: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(point.to_dict(floor)) for point in [vanilla, *points]]
    (out / SWEEP_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(path: Path, defense: str, vanilla: Point, points: list[Point], chosen, floor: float, budget: float) -> None:
    figure, axes = new_figure(7.0, 4.6)
    shown = [point for point in points if point.unsafe is not None and point.benign is not None]
    for stage, marker in (("grid", "o"), ("refine", "D")):
        group = [point for point in shown if point.stage == stage]
        if group:
            axes.scatter(
                [100 * p.unsafe for p in group], [100 * p.benign for p in group], marker=marker, label=stage, zorder=2
            )
    for point in sweep.frontier(shown):  # every label would overlap on a large grid: the trade-offs only
        axes.annotate(point.label(), (100 * point.unsafe, 100 * point.benign), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")  # fmt: skip
    if vanilla.unsafe is not None and vanilla.benign is not None:
        axes.scatter([100 * vanilla.unsafe], [100 * vanilla.benign], marker="s", color="grey", label="vanilla")
    axes.axhline(100 * floor, color="grey", linestyle="--", linewidth=1, label=f"budget: {budget} × vanilla")
    if chosen is not None:
        axes.scatter([100 * chosen.unsafe], [100 * chosen.benign], marker="*", s=260, color="red", zorder=3,
                     label=f"chosen: {chosen.label()}")  # fmt: skip
    axes.set_xlabel("unsafe rate (%)  ← safer")
    axes.set_ylabel("benign accuracy (%)  ↑ more useful")
    axes.set_title(f"vlm-safety tune {defense}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    save_figure(figure, path)
