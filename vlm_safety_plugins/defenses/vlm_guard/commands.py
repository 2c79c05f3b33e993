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
@click.option(
    "--tau-from",
    type=click.Choice(["text", "image"]),
    default="text",
    show_default=True,
    help="The anchors the gate threshold τ separates: text only (the paper), or the pairs asked with a corrupted "
    "image, the view the gate meets on image requests (beyond the paper).",
)
def calibrate_command(rank, tau_from, **common):
    """VLM-Guard's safety subspaces, orientation and gate thresholds from harmful / harmless pairs."""
    from .anchors import vlm_guard_pairs
    from .calibration import calibrate_vlm_guard

    compute = functools.partial(calibrate_vlm_guard, rank=rank, tau_from=tau_from)
    run_calibration("vlm_guard", vlm_guard_pairs, compute, **common)
