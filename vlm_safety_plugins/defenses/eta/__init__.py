"""ETA: evaluate (CLIP pre-check, reward post-check), then align (docs/defenses/eta.md).

- ``defense.py``: the defense, its options, the candidate score rule;
- ``best_of_n.py``: sentence-level best-of-N from one shared KV cache;
- ``processors.py``: the interference prefix (a LogitsProcessor) and sentence boundaries
  (a StoppingCriteria), usable without ``attach``;
- ``plots.py``: the pre-score histogram of ``vlm-safety eval`` runs.

This module is the plugin the registry loads; it imports the rest only when called.
"""

from ...core.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    from .defense import Eta

    register(Eta)


@hookimpl
def evaluation_plots(summary, records, folder):
    from .plots import pre_score_plot

    return [pre_score_plot(summary, records, folder)]
