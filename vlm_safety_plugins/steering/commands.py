"""What every ``vlm-safety calibrate <defense>`` command shares: its options and its run.

A steering defense's ``commands.py`` declares one click command with
``@calibration_options`` plus its own options, and calls ``run_calibration`` with its
anchor reader and its calibrate function; its plugin module adds the command to the
``calibrate`` group in ``register_commands``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from .calibration import Progress


def calibration_options(command):
    """The options every ``calibrate`` subcommand shares."""
    options = [
        click.option(
            "--model",
            "model_name",
            default="tiny-llava",
            show_default=True,
            help="tiny-llava, tiny-qwen2-vl or tiny-gemma3, or a hub id / local directory (loaded as "
            "`vlm-safety generate` does). The artifact only fits this model.",
        ),
        click.option(
            "--anchors",
            "anchors_path",
            metavar="FILE|builtin:NAME",
            help="Anchor JSONL file (format: docs/anchors.md), or a set shipped with the defense, e.g. "
            "builtin:testbed_cmrm_anchors.jsonl; default: the general set shipped with the defense.",
        ),
        click.option(
            "--out",
            "out_path",
            type=click.Path(dir_okay=False),
            help="Where to write the artifact; default: artifacts/<model>.<defense>.safetensors.",
        ),
        click.option("--layers", "layers_text", help="Decoder layers, e.g. `0-31` or `10,12,14`; default: all."),
        click.option(
            "--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Anchors per forward pass."
        ),
        click.option("--device", default="cpu", show_default=True, help="torch device to run the model on."),
        click.option("--seed", default=0, show_default=True, help="Seed of the tiny models' weights (as in generate)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_calibration(
    kind: str,
    read_anchors: Callable,
    compute: Callable[..., object],
    *,
    model_name,
    anchors_path,
    out_path,
    layers_text,
    batch_size,
    device,
    seed,
) -> None:
    """Read the anchors (``read_anchors(source) -> (items, source name)``), load the model, run
    ``compute`` with a progress bar, save the artifact and print a summary."""
    import vlm_safety_plugins as vsp

    from ..cli import load_model

    layers = parse_layers(layers_text)
    try:  # cheap checks first, so bad anchors fail before a model loads
        count = len(read_anchors(anchors_path)[0])
    except vsp.ConfigError as error:
        raise click.BadParameter(str(error), param_hint="'--anchors'") from None
    out_path = out_path or f"artifacts/{model_name.rstrip('/').rsplit('/', 1)[-1]}.{kind}.safetensors"
    model, processor = load_model(model_name, seed)
    model.to(device)
    try:
        with click.progressbar(length=count, label=f"{kind}: {count} anchors", file=sys.stderr) as bar:
            progress: Progress = bar.update
            artifact = compute(
                model,
                processor,
                anchors_path,
                layers=layers,
                batch_size=batch_size,
                model_name=model_name,
                progress=progress,
            )
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    artifact.save(out_path)
    click.echo(
        f"wrote {out_path}: {kind} for {model_name} (config {artifact.model.config_hash}), "
        f"layers {artifact.layers}, {artifact.anchors} anchors, orientation check "
        f"{'passed' if artifact.orientation['passed'] else 'FAILED'}"
    )
    click.echo(f"  {artifact.summary()}")


def parse_layers(text: str | None) -> list[int] | None:
    """``0-3,8`` -> [0, 1, 2, 3, 8]; None stays None."""
    if text is None:
        return None
    layers = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            layers.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise click.BadParameter(
            f"expected layer indices like `0-31` or `10,12,14`, got {text!r}", param_hint="'--layers'"
        ) from None
    return layers
