"""``vlm-safety tune``: a defense's strength chosen on the user's own validation samples (tuning/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..evaluation.command import evaluation_options, load_evaluation


def parse_values(pairs: tuple[str, ...]) -> dict[str, list]:
    """``OPTION=V1,V2,...`` pairs as ``{option: [values]}``, each value read as YAML (0.3, true, both)."""
    import yaml

    values = {}
    for pair in pairs:
        option, separator, listed = pair.partition("=")
        if not separator or not option.strip() or not listed.strip():
            raise click.BadParameter(f"expected OPTION=V1,V2,..., got {pair!r}", param_hint="'--values'")
        try:
            values[option.strip()] = [yaml.safe_load(item) for item in listed.split(",")]
        except yaml.YAMLError:
            raise click.BadParameter(f"{option}: cannot read the values {listed!r}", param_hint="'--values'") from None
    return values


@click.command("tune")
@click.argument("defense")
@evaluation_options
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Base safety config (YAML): the defense's other options (its artifacts) and any other defense, kept.",
)
@click.option(
    "--budget",
    default=0.95,
    show_default=True,
    type=float,
    help="The benign accuracy to keep, as a fraction of the undefended model's on the same samples.",
)
@click.option(
    "--values",
    "value_pairs",
    multiple=True,
    metavar="OPTION=V1,V2,...",
    help="Values to try for an option (repeatable): replaces the defense's declared ones, or adds an option "
    "(e.g. tau=0.1,0.2,0.3; nested: best_of_n.n=3,5).",
)
@click.option(
    "--refinements",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Bisections of each sharp numeric option between the strongest value within budget and the next.",
)
@click.option(
    "--objective",
    type=click.Choice(["image", "all"]),
    default="image",
    show_default=True,
    help="The unsafe rate to lower: of harmful requests with an image, or of every harmful request.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Tuning folder: chosen.yaml, sweep.jsonl, sweep.png, points/ (a rerun resumes).",
)
def tune_command(
    defense,
    model_name,
    benchmark_spec,
    benchmark_options,
    limit,
    batch_size,
    max_new_tokens,
    judge_name,
    judge_options,
    seed,
    device,
    trust_remote_code,
    config_path,
    budget,
    value_pairs,
    refinements,
    objective,
    out_dir,
):
    """Choose DEFENSE's strength on validation samples: the lowest unsafe rate within a benign-accuracy budget.

    \b
    vlm-safety tune cmrm --model testbed --config configs/cmrm-testbed.yaml \\
        --benchmark testbed:train -O n=200 --judge testbed --budget 0.95 --out runs/tune-cmrm
    """
    import vlm_safety_plugins as vsp

    from .run import CHOSEN_FILE, PLOT_FILE, tune

    values = parse_values(value_pairs)
    loaded = load_evaluation(
        model_name, benchmark_spec, benchmark_options, judge_name, judge_options, out_dir, seed, device
    )
    samples = loaded.samples[:limit] if limit is not None else loaded.samples

    def progress(label, total):
        return click.progressbar(length=total, label=f"tune {defense}: {label}", file=sys.stderr)

    try:
        result = tune(
            loaded.model,
            loaded.processor,
            defense,
            config_path,
            samples,
            out_dir,
            budget=budget,
            values=values,
            refinements=refinements,
            objective=objective,
            progress=progress,
            trust_remote_code=trust_remote_code,
            judge=judge_name,
            judge_options=loaded.judge_options,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            model_name=model_name,
            benchmark=loaded.label,
        )
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    chosen, vanilla = result.chosen, result.vanilla
    click.echo(
        f"chose {chosen.label()}: unsafe {chosen.unsafe:.3f} (vanilla {vanilla.unsafe:.3f}), benign accuracy "
        f"{chosen.benign:.3f} (floor {result.floor:.3f}); {len(result.points)} settings evaluated; wrote "
        f"{Path(out_dir) / CHOSEN_FILE} and {Path(out_dir) / PLOT_FILE}"
    )
