"""PNG plots of runs, drawn with matplotlib's object API on the Agg canvas (no display, no
pyplot global state): the unsafe-rate / benign-utility trade-off of several runs, and the
figure helpers that defenses' own plots (``evaluation_plots`` hook) use."""

from __future__ import annotations

from pathlib import Path


def new_figure(width: float = 6.4, height: float = 4.2):
    """(figure, axes) of a new constrained-layout figure, not attached to pyplot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def save_figure(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def tradeoff_points(summaries: list[dict]) -> tuple[list[dict], str] | None:
    """(points, y-axis name) for :func:`tradeoff_plot`: benign accuracy where every run has it,
    else benign compliance (1 − over-refusal); None if a run has neither or no unsafe rate."""
    use_accuracy = all(summary["benign_accuracy"]["total"] for summary in summaries)
    points = []
    for summary in summaries:
        unsafe = summary["harmful_safety"]["unsafe"]
        refusal = summary["benign_safety"]["refusal"]
        if not unsafe["total"] or not (use_accuracy or refusal["total"]):
            return None
        if use_accuracy:
            utility = summary["benign_accuracy"]
        else:  # complement of the over-refusal rate, interval mirrored
            utility = {"rate": 1 - refusal["rate"], "low": 1 - refusal["high"], "high": 1 - refusal["low"]}
        points.append({"label": summary["run"]["label"], "unsafe": unsafe, "utility": utility})
    return points, ("benign accuracy" if use_accuracy else "benign compliance (1 − over-refusal)")


def tradeoff_plot(summaries: list[dict], path: str | Path) -> Path | None:
    """Unsafe rate (x, lower is better) against benign utility (y, higher is better), one
    point per run with 95% Wilson intervals as error bars. None if :func:`tradeoff_points` is."""
    found = tradeoff_points(summaries)
    if found is None:
        return None
    points, utility_name = found
    figure, axes = new_figure()
    for point in points:
        x, y = 100 * point["unsafe"]["rate"], 100 * point["utility"]["rate"]
        axes.errorbar(
            x,
            y,
            fmt="o",
            capsize=3,
            xerr=[[x - 100 * point["unsafe"]["low"]], [100 * point["unsafe"]["high"] - x]],
            yerr=[[y - 100 * point["utility"]["low"]], [100 * point["utility"]["high"] - y]],
        )
        axes.annotate(point["label"], (x, y), textcoords="offset points", xytext=(6, 6))
    axes.set_xlim(-5, 105)
    axes.set_ylim(-5, 105)
    axes.set_xlabel("unsafe rate on harmful samples (%)  ← safer")
    axes.set_ylabel(f"{utility_name} (%)  ↑ more useful")
    axes.set_title("Safety / utility per run (95% Wilson intervals)")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)
