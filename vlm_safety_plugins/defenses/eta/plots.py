"""The CLIP pre-score histogram of an eval run (the paper's Fig. 2), added to ``report.md``
through the ``evaluation_plots`` hook."""

from __future__ import annotations

from pathlib import Path

from ...evaluation.plots import new_figure, save_figure

NAME = "eta"
PRE_SCORES_PLOT = "plots/pre_scores.png"


def pre_score_plot(summary: dict, records: list[dict], folder: Path) -> tuple[str, str | None, str]:
    """(title, file, why not drawn) of the run's pre-score histogram, drawn when any row has a pre score."""
    options = ((summary["run"].get("config") or {}).get("defenses") or {}).get(NAME) or {}
    drawn = pre_score_histogram(records, options.get("pre_threshold"), Path(folder) / PRE_SCORES_PLOT)
    title = "CLIP pre-scores of safe and unsafe images (ETA Fig. 2)"
    if drawn:
        return title, PRE_SCORES_PLOT, ""
    return title, None, "no ETA pre scores: ETA did not run or no sample had an image"


def pre_scores(records: list[dict], defense: str = NAME) -> dict[str, list[float]]:
    """The ``scores["pre"]`` of ``defense`` per label (``harmful`` / ``benign``), from rows where it ran."""
    scores: dict[str, list[float]] = {"harmful": [], "benign": []}
    for record in records:
        entry = ((record.get("safety") or {}).get("defenses") or {}).get(defense) or {}
        value = (entry.get("scores") or {}).get("pre")
        if value is not None:
            scores[record["label"]].append(float(value))
    return scores


def pre_score_histogram(
    records: list[dict], threshold: float | None, path: str | Path, defense: str = NAME
) -> Path | None:
    """ETA's Fig. 2: histograms of the CLIP pre-scores of unsafe (harmful samples') and safe
    (benign samples') images, the ``pre_threshold`` as a vertical line. Returns None, writing
    nothing, when no row has a pre score (ETA did not run, or no row had an image)."""
    scores = pre_scores(records, defense)
    values = scores["harmful"] + scores["benign"]
    if not values:
        return None
    figure, axes = new_figure()
    low, high = min(values + ([threshold] if threshold is not None else [])), max(values)
    bins = [low + (high - low) * step / 30 for step in range(31)] if high > low else 10
    for label, colour, name in (
        ("benign", "tab:blue", "safe (benign samples)"),
        ("harmful", "tab:red", "unsafe (harmful samples)"),
    ):
        if scores[label]:
            axes.hist(scores[label], bins=bins, alpha=0.6, color=colour, label=f"{name}, n={len(scores[label])}")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"pre_threshold = {threshold:g}")
    axes.set_xlabel("CLIP pre-score (cosine with the unsafe-content prompt)")
    axes.set_ylabel("images")
    axes.set_title("ETA pre-generation evaluator: image scores")
    axes.legend()
    return save_figure(figure, path)
