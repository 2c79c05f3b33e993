"""An example vlm-safety plugin: one defense, one evaluator and an audit-log hook.

It is an ordinary module of its own distribution, found through the entry point
``[project.entry-points.vlm_safety_plugins] example = "vlm_safety_example.plugin"``;
pluggy calls the ``@hookimpl`` functions below by their names.
"""

from __future__ import annotations

import collections
import json
import os

from vlm_safety_plugins import hookimpl

AUDIT_ENV = "VLM_SAFETY_EXAMPLE_AUDIT"

REPORTS: collections.deque = collections.deque(maxlen=1000)
"""The latest SafetyReports seen by ``safety_report``, as dicts (bounded: oldest dropped first)."""


@hookimpl
def register_defenses(register):
    from .components import KeywordRefusal

    register(KeywordRefusal)


@hookimpl
def register_evaluators(register):
    from .components import LengthEvaluator

    register(LengthEvaluator)


@hookimpl
def safety_report(report):
    """Keep the report in ``REPORTS``; append it as a JSON line to ``$VLM_SAFETY_EXAMPLE_AUDIT`` if set."""
    entry = report.to_dict()
    REPORTS.append(entry)
    path = os.environ.get(AUDIT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry, default=str) + "\n")
