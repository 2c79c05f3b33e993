"""What every steering calibration needs: the model's adapter, layer choice, batches, progress.

A calibration runs forward passes over anchor requests and reads the residual stream at
the last prompt token (``readout.last_prompt_states``), in batches, so memory grows with
anchors × layers × hidden size, never with sequence length. The defenses' own
calibrations (``defenses/cmrm/calibration.py``, ``defenses/vlm_guard/calibration.py``)
are built from these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..core.errors import ConfigError

Progress = Callable[[int], None]
"""Called with the number of anchors just processed (a progress bar's ``update``)."""


def adapter_of(model, processor):
    """The attached model's adapter, else the one found for ``model``."""
    from ..core.adapters import find_adapter
    from ..core.runtime import get_attachment

    attachment = get_attachment(model)
    return attachment.adapter if attachment is not None else find_adapter(model, processor)


def layer_indices(layers: Sequence[int] | None, adapter) -> list[int]:
    """``layers`` sorted and checked against the model's decoder layers; None means all of them."""
    count = len(adapter.decoder_layers())
    if layers is None:
        return list(range(count))
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < count]
    if not chosen or bad:
        raise ConfigError(f"layers must be decoder layer indices in 0..{count - 1}; got {list(layers)}")
    return chosen


def on_model(adapter, inputs):
    """``inputs`` on the model's device, floating-point tensors in its dtype."""
    model = adapter.base_model
    return {
        name: value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)
        for name, value in inputs.items()
    }


def batches(items: Sequence, size: int):
    """``items`` in consecutive chunks of ``size``."""
    if size < 1:
        raise ConfigError(f"batch size must be at least 1; got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def advance(progress: Progress | None, count: int) -> None:
    """Report ``count`` processed anchors, if anyone listens."""
    if progress is not None:
        progress(count)


def passes(progress: Progress | None, count: int) -> Progress | None:
    """``progress`` for a calibration that goes over its anchors ``count`` times: each pass moves the
    bar by its share, so the whole run fills it once."""
    if progress is None or count == 1:
        return progress
    done = reported = 0.0

    def share(anchors: int) -> None:
        nonlocal done, reported
        done += anchors / count
        progress(int(done) - int(reported))
        reported = done

    return share
