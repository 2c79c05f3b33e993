"""``vlm-safety eval``: evaluate a model and safety config on a benchmark, or compare finished runs.

A thin wrapper over :func:`run_eval` and :func:`compare_runs`; models load as in
``vlm-safety generate``. Bad input ends with a one-line error, never a traceback.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .. import cli as cli_options

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed_options(pairs: tuple[str, ...], target, hint: str) -> dict:
    """``KEY=VALUE`` pairs as keyword arguments of ``target``, each value converted to the
    type of that parameter's default (int, float, bool; otherwise the string)."""
    parameters = inspect.signature(target).parameters
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        key = key.strip()
        if not separator or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=hint)
        default = parameters[key].default if key in parameters else None
        try:
            if isinstance(default, bool):
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError
                options[key] = value.lower() in _TRUE
            elif isinstance(default, (int, float)):
                options[key] = type(default)(value)
            else:
                options[key] = value
        except ValueError:
            raise click.BadParameter(
                f"{key}: expected {type(default).__name__}, got {value!r}", param_hint=hint
            ) from None
    return options


def evaluation_options(command):
    """The options of a command that answers a benchmark with a model (``eval``, ``tune``)."""
    options = [
        click.option(
            "--model",
            "model_name",
            help="tiny-llava, tiny-qwen2-vl, tiny-gemma3 (or another offline model "
            "name), or a hub id / local directory, loaded as `vlm-safety generate` does.",
        ),
        click.option(
            "--benchmark",
            "benchmark_spec",
            metavar="NAME:PATH|PATH",
            help="mm-safetybench:DIR, figstep-safebench:CSV|DIR, spa-vl:PARQUET|DIR, vlsafe:JSONL, "
            "advbench:CSV, jsonl:FILE, testbed[:SPLIT], figstep:SPEC (SPEC rendered FigStep-style), "
            "or a bare path whose format is recognised.",
        ),
        click.option(
            "-O",
            "--benchmark-option",
            "benchmark_options",
            multiple=True,
            metavar="KEY=VALUE",
            help="Loader option, repeatable: e.g. variant=SD_TYPO, scenarios=01-Illegal_Activitiy, "
            "images=DIR, label=benign, n=200, seed=1.",
        ),
        click.option("--limit", type=click.IntRange(min=0), help="Only the first K samples."),
        click.option(
            "--batch-size", default=1, show_default=True, type=click.IntRange(min=1), help="Samples per generate call."
        ),
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option(
            "--judge",
            "judge_name",
            default="refusal",
            show_default=True,
            help="Registered judge: refusal (string matcher), llama_guard (needs -J model=...), or a plugin's.",
        ),
        click.option(
            "-J",
            "--judge-option",
            "judge_options",
            multiple=True,
            metavar="KEY=VALUE",
            help="Judge option, repeatable: e.g. model=meta-llama/Llama-Guard-3-8B, window=300.",
        ),
        click.option(
            "--seed", default=0, show_default=True, help="Seed for sampling and for the tiny models' weights."
        ),
        click.option("--device", default="cpu", show_default=True, help="torch device to run the model on."),
        cli_options.trust_remote_code_option,
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


@dataclass
class Evaluation:
    """What ``evaluation_options`` load: the model, the samples, the judge's options, the run's label."""

    model: Any
    processor: Any
    samples: list
    judge_options: dict
    label: str


def load_evaluation(model_name, benchmark_spec, benchmark_options, judge_name, judge_options, out_dir, seed, device):
    """The model and samples of ``evaluation_options``; a ClickException for bad input."""
    import vlm_safety_plugins as vsp

    from .. import cli
    from ..core import plugins
    from . import benchmarks

    if not model_name or not benchmark_spec:
        raise click.UsageError("--model and --benchmark are required")
    try:
        _, loader, _ = benchmarks.resolve(benchmark_spec)
        loader_options = _typed_options(benchmark_options, loader, "'-O' / '--benchmark-option'")
        samples = benchmarks.load_benchmark(
            benchmark_spec, figstep_dir=Path(out_dir) / "figstep_images", **loader_options
        )
        judge_cls = plugins.get_judge(judge_name)
        judge_kwargs = _typed_options(judge_options, judge_cls, "'-J' / '--judge-option'")
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    model, processor = cli.load_model(model_name, seed)
    model.to(device)
    return Evaluation(model, processor, samples, judge_kwargs, " ".join([benchmark_spec, *sorted(benchmark_options)]))


@click.command("eval")
@click.argument("runs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@evaluation_options
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Safety config (YAML). Without it the model is evaluated undefended (vanilla).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder (created; an unfinished run there resumes). With --compare: where the comparison goes.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Compare the finished run folders given as arguments: writes comparison.md and tradeoff.png to --out.",
)
def eval_command(
    runs,
    model_name,
    config_path,
    benchmark_spec,
    benchmark_options,
    out_dir,
    limit,
    batch_size,
    max_new_tokens,
    judge_name,
    judge_options,
    seed,
    device,
    trust_remote_code,
    compare,
):
    """Evaluate a model with a safety config on a benchmark: responses, judge verdicts, metrics, report, plots.

    \b
    vlm-safety eval --model tiny-llava --config configs/eta.yaml --benchmark testbed:test --out runs/eta
    vlm-safety eval --compare runs/vanilla runs/eta --out runs/comparison
    """
    import vlm_safety_plugins as vsp

    if compare or runs:
        if not compare:
            raise click.UsageError("run folders as arguments are only for --compare")
        if not runs:
            raise click.UsageError("--compare needs the run folders to compare")
        _compare(runs, out_dir)
        return
    from .. import cli
    from .run import run_eval

    config = cli.read_config(config_path)
    loaded = load_evaluation(
        model_name, benchmark_spec, benchmark_options, judge_name, judge_options, out_dir, seed, device
    )
    samples = loaded.samples
    total = len(samples) if limit is None else min(limit, len(samples))
    try:
        with click.progressbar(length=total, label=f"eval: {total} samples", file=sys.stderr) as bar:
            summary = run_eval(
                loaded.model,
                loaded.processor,
                config,
                samples,
                out_dir,
                judge=judge_name,
                judge_options=loaded.judge_options,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                limit=limit,
                seed=seed,
                model_name=model_name,
                benchmark=loaded.label,
                progress=bar.update,
                trust_remote_code=trust_remote_code,
            )
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    from .report import format_rate

    click.echo(
        f"wrote {Path(out_dir) / 'report.md'}: {summary['samples']} samples; unsafe rate "
        f"{format_rate(summary['harmful_safety']['unsafe'])}; benign accuracy "
        f"{format_rate(summary['benign_accuracy'])}"
    )


def _compare(runs, out_dir) -> None:
    import vlm_safety_plugins as vsp

    from .compare import COMPARISON_FILE, compare_runs
    from .report import format_rate

    try:
        summaries = compare_runs(runs, out_dir)
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    for summary in summaries:
        click.echo(
            f"{summary['run']['label']}: unsafe rate {format_rate(summary['harmful_safety']['unsafe'])}; "
            f"benign accuracy {format_rate(summary['benign_accuracy'])}"
        )
    click.echo(f"wrote {Path(out_dir) / COMPARISON_FILE}")
