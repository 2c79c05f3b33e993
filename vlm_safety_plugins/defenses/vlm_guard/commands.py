"""``vlm-safety calibrate vlm-guard``: compute VLM-Guard's safety subspaces for one model."""

from __future__ import annotations

import functools

import click

from ...steering.commands import calibration_options, run_calibration


@click.command()
@calibration_options
@click.option(
    "--rank",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Directions m kept per layer (top right singular vectors).",
)
def calibrate_command(rank, **common):
    """VLM-Guard's safety subspaces, orientation and gate thresholds from harmful / harmless pairs."""
    from .anchors import vlm_guard_pairs
    from .calibration import calibrate_vlm_guard

    run_calibration("vlm_guard", vlm_guard_pairs, functools.partial(calibrate_vlm_guard, rank=rank), **common)
