"""``vlm-safety calibrate cmrm``: compute CMRM's dataset-level shift vectors for one model."""

from __future__ import annotations

import functools

import click

from ...steering.commands import calibration_options, run_calibration


@click.command()
@calibration_options
@click.option(
    "--corrupt",
    type=click.Choice(["blank", "noise"]),
    default="blank",
    show_default=True,
    help="The content-free image of the corrupted view: constant grey or random pixels.",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Layer by layer, each vector measured with the layers below already steered (beyond the paper: "
    "one-shot vectors overshoot when every layer is steered).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, max=100, min_open=True),
    default=1.0,
    show_default=True,
    help="With --sequential: the α the layers below are steered at while a layer is measured (the α to deploy).",
)
def calibrate_command(corrupt, sequential, alpha, **common):
    """CMRM's dataset-level shift vectors: mean of h(text-only) − h(corrupted image) per layer."""
    from .anchors import cmrm_anchors
    from .calibration import calibrate_cmrm

    compute = functools.partial(calibrate_cmrm, corrupt=corrupt, sequential=sequential, alpha=alpha)
    run_calibration("cmrm", cmrm_anchors, compute, **common)
