"""compare_runs: put several run folders side by side (a table and the trade-off plot)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .plots import tradeoff_plot
from .report import format_number, format_rate, markdown_table
from .samples import EvaluationError

COMPARISON_FILE = "comparison.md"
COMPARISON_PLOT = "tradeoff.png"


def load_summary(folder: str | Path) -> dict:
    """The ``summary.json`` of a run folder; a clear error if it is missing or unreadable."""
    from .run import SUMMARY_FILE

    path = Path(folder) / SUMMARY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(
            "not a finished run folder: no summary.json (run `vlm-safety eval` there first)", source=Path(folder)
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise EvaluationError(f"cannot read: {error}", source=path) from None


def compare_runs(run_dirs: Iterable[str | Path], out_dir: str | Path) -> list[dict]:
    """Write ``comparison.md`` and ``tradeoff.png`` (unsafe rate vs benign utility, one point
    per run) to ``out_dir``; returns the runs' summaries. Runs with the same label (defenses)
    are told apart by their folder names."""
    folders = [Path(folder) for folder in run_dirs]
    if not folders:
        raise EvaluationError("compare needs at least one run folder")
    summaries = [load_summary(folder) for folder in folders]
    labels = [summary["run"]["label"] for summary in summaries]
    for summary, folder in zip(summaries, folders):
        if labels.count(summary["run"]["label"]) > 1:
            summary["run"]["label"] = f"{summary['run']['label']} ({folder.name})"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = tradeoff_plot(summaries, out / COMPARISON_PLOT)
    rows = [
        [
            summary["run"]["label"],
            f"`{summary['run']['model']}`",
            f"`{summary['run']['benchmark']}`",
            summary["run"]["judge"].get("name", "?"),
            str(summary["samples"]),
            format_rate(summary["harmful_safety"]["unsafe"]),
            format_rate(summary["benign_accuracy"]),
            format_rate(summary["benign_safety"]["refusal"]),
            format_number((summary["latency_s"] or {}).get("mean")),
            format_number((summary["tokens"] or {}).get("mean")),
        ]
        for summary in summaries
    ]
    lines = ["# Comparison of runs", ""]
    lines += markdown_table(
        [
            "run",
            "model",
            "benchmark",
            "judge",
            "samples",
            "unsafe rate",
            "benign accuracy",
            "over-refusal",
            "latency (s)",
            "tokens",
        ],
        rows,
    )
    lines += [
        "",
        "Rates: count/total = percent [95% Wilson interval]. Runs: " + ", ".join(f"`{folder}`" for folder in folders),
        "",
    ]
    benchmarks = {summary["run"]["benchmark"] for summary in summaries}
    judges = {json.dumps(summary["run"]["judge"], sort_keys=True) for summary in summaries}
    if len(benchmarks) > 1 or len(judges) > 1:
        lines += ["**Caution:** the runs differ in benchmark or judge; their rates are not directly comparable.", ""]
    lines += [
        f"![unsafe rate vs benign utility]({COMPARISON_PLOT})"
        if plot
        else "Trade-off plot not drawn: every run needs harmful samples with a judge decision and benign samples."
    ]
    (out / COMPARISON_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summaries
