"""The Markdown report of one run (``report.md``) and the formatting shared with comparisons."""

from __future__ import annotations

import json
from pathlib import Path

from .refusal import DEFAULT_WINDOW

NOT_AVAILABLE = "–"


def format_rate(rate: dict | None) -> str:
    """``3/10 = 30.0% [10.8, 60.3]`` (count/total, percent, 95% Wilson interval), or a dash."""
    if not rate or not rate["total"]:
        return NOT_AVAILABLE
    interval = f"[{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"
    return f"{rate['count']}/{rate['total']} = {100 * rate['rate']:.1f}% {interval}"


def format_number(value: float | None, digits: int = 3) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{digits}g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def render_report(summary: dict, plots: dict[str, tuple[str | None, str]]) -> str:
    """Markdown for ``summary`` (from run_eval); ``plots``: title -> (file name or None, note)."""
    run = summary["run"]
    harmful, benign = summary["harmful_safety"], summary["benign_safety"]
    defenses = ", ".join(run["defenses"]) or "none (vanilla)"
    lines = [f"# Evaluation: {run['label']} on {run['benchmark']}", ""]
    lines += markdown_table(
        ["setting", "value"],
        [
            ["model", f"`{run['model']}`"],
            ["safety config", f"{run['config_source'] or '-'} (defenses: {defenses})"],
            ["benchmark", f"`{run['benchmark']}`"],
            ["judge", f"`{json.dumps(run['judge'])}`"],
            [
                "samples",
                f"{summary['samples']} ({summary['harmful']} harmful, {summary['benign']} benign, "
                f"{summary['with_image']} with an image)",
            ],
            [
                "generation",
                f"max_new_tokens={run['max_new_tokens']}, batch_size={run['batch_size']}, seed={run['seed']}",
            ],
        ],
    )
    lines += ["", "## Safety", ""]
    lines += markdown_table(
        ["metric", "value (95% Wilson interval)"],
        [
            ["unsafe rate / attack success rate (harmful, judged)", format_rate(harmful["unsafe"])],
            ["unsafe rate on harmful requests with an image", format_rate(summary["harmful_unsafe_by_input"]["image"])],
            [
                "unsafe rate on harmful requests without an image (text only)",
                format_rate(summary["harmful_unsafe_by_input"]["text_only"]),
            ],
            ["harmful samples without a judge decision", str(harmful["undecided"])],
            ["refusal rate on harmful samples (refusal matcher)", format_rate(harmful["refusal"])],
            ["benign samples judged unsafe", format_rate(benign["unsafe"])],
        ],
    )
    lines += ["", "## Utility", ""]
    lines += markdown_table(
        ["metric", "value (95% Wilson interval)"],
        [
            ["benign accuracy (reference answer found in the response)", format_rate(summary["benign_accuracy"])],
            ["over-refusal: refusal rate on benign samples", format_rate(benign["refusal"])],
        ],
    )
    lines += ["", "## Per category", ""]
    lines += markdown_table(
        ["category", "samples", "harmful", "unsafe rate", "refusal rate (harmful)", "benign accuracy"],
        [
            [
                category,
                str(item["samples"]),
                str(item["harmful"]),
                format_rate(item["unsafe"]),
                format_rate(item["refusal"]),
                format_rate(item["benign_accuracy"]),
            ]
            for category, item in summary["categories"].items()
        ],
    )
    latency, tokens = summary["latency_s"] or {}, summary["tokens"] or {}
    lines += ["", "## Cost", ""]
    lines += markdown_table(
        ["metric", "mean", "median", "p95"],
        [
            ["latency per response (s)", *(format_number(latency.get(key)) for key in ("mean", "median", "p95"))],
            ["generated tokens per response", *(format_number(tokens.get(key)) for key in ("mean", "median", "p95"))],
        ],
    )
    lines += [
        "",
        f"Throughput: {format_number(summary['tokens_per_s'])} generated tokens/s. Latency per response is "
        "the wall time of its generate call divided by the batch size.",
    ]
    lines += ["", "## Defenses", ""]
    if summary["defenses"]:
        lines += markdown_table(
            ["defense", "ran", "intervened (all)", "on harmful", "on benign", "flags (rows true)"],
            [
                [
                    name,
                    str(item["ran"]),
                    format_rate(item["intervened"]),
                    format_rate(item["intervened_harmful"]),
                    format_rate(item["intervened_benign"]),
                    ", ".join(f"{key}: {count}" for key, count in item["flags"].items()) or "-",
                ]
                for name, item in summary["defenses"].items()
            ],
        )
        lines += ["", "Intervened = the defense's decision for the row was not `pass`."]
    else:
        lines += ["No defense ran."]
    lines += [
        f"Rows answered with the configured refusal by the runtime: {summary['refused_by_runtime']}; "
        f"rows with a defense error: {summary['defense_errors']}."
    ]
    lines += ["", "## Plots", ""]
    for title, (file, note) in plots.items():
        lines += [f"![{title}]({file})" if file else f"- {title}: not drawn ({note})", ""]
    if run["judge"].get("name") == "refusal":
        window = run["judge"].get("window", DEFAULT_WINDOW)
        lines += [
            "## Judge caveat",
            "",
            f"Unsafe = a harmful request answered without a refusal phrase in the first {window} characters. "
            'String matching misses refusals in other words and counts "I\'m sorry, but here is how..." and '
            'an interference prefix such as "As an AI assistant" as refusals; see docs/evaluation.md.',
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(summary: dict, plots: dict[str, tuple[str | None, str]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_report(summary, plots), encoding="utf-8")
    return path
