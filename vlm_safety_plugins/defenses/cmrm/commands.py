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
def calibrate_command(corrupt, **common):
    """CMRM's dataset-level shift vectors: mean of h(text-only) − h(corrupted image) per layer."""
    from .anchors import cmrm_anchors
    from .calibration import calibrate_cmrm

    run_calibration("cmrm", cmrm_anchors, functools.partial(calibrate_cmrm, corrupt=corrupt), **common)
