"""The checks every defense passes, built-in or third-party: run them from a plugin's own tests.

A defense takes part by being registered and by declaring ``conformance_options`` (its
``neutral`` and ``active`` option sets; see ``Defense.conformance_options``). Each check
runs on a tiny offline VLM with one image row and one text-only row, greedy, and raises
``AssertionError`` with what went wrong::

    from vlm_safety_plugins.testing import conformance

    def test_my_defense_conforms(tmp_path):
        conformance.check_defense("my_defense", tmp_path)

This package's own suite (tests/test_conformance.py) runs every check on every registered
defense, the example third-party plugin's included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from ..core import plugins
from ..core.options import describe_options
from ..core.reference import option_rows
from ..core.report import MODIFIED, PASS, REFUSED
from ..core.runtime import attach, detach, get_attachment
from . import tiny_image, tiny_vlm

REQUESTS = (("What is in the picture?", tiny_image()), ("Tell me how to make a cake.", None))
"""The batch every check generates for: an image row and a text-only row."""
SETTINGS = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True}
REFUSAL = "I cannot answer that."


@dataclass
class Subject:
    """One defense under test: its class, a tiny model, and its declared option sets."""

    name: str
    cls: type
    model: Any
    processor: Any
    neutral: dict
    active: dict

    @classmethod
    def make(cls, name: str, workdir: str | Path, family: str = "llava") -> Subject:
        """The registered defense ``name`` on a fresh ``tiny_vlm(family)``, its option sets computed once."""
        defense = plugins.get_defense(name)
        model, processor = tiny_vlm(family)
        options = defense.conformance_options(model, processor, Path(workdir))
        assert set(options) == {"neutral", "active"}, (
            f"{name}: conformance_options must return the option sets 'neutral' and 'active', got {sorted(options)}"
        )
        return cls(name, defense, model, processor, options["neutral"], options["active"])

    def generate(self, flags: dict | None):
        """``(output, inputs)`` of one greedy generate of REQUESTS; ``flags`` None means no ``vlm_safety``
        flag (and plain transformers generate when the model is detached)."""
        adapter = get_attachment(self.model).adapter if get_attachment(self.model) else None
        if adapter is None:
            from ..core.adapters import find_adapter

            adapter = find_adapter(self.model, self.processor)
        inputs = adapter.build_inputs(list(REQUESTS))
        if flags is None:
            config = GenerationConfig(**{**self.model.generation_config.to_dict(), **SETTINGS})
        else:
            from ..core.config import SafetyConfig

            config = SafetyConfig.from_dict(flags).to_generation_config(self.model.generation_config, **SETTINGS)
        images = {"images": [image for _, image in REQUESTS]} if get_attachment(self.model) else {}
        return self.model.generate(**inputs, generation_config=config, **images), inputs

    def flags(self, which: str, **top_level) -> dict:
        return {"defenses": {self.name: getattr(self, which)}, **top_level}


def check_documented(subject: Subject) -> None:
    """The defense has a description, and every option (nested ones too) a ``doc``."""
    assert subject.cls.description, f"{subject.name}: set `description` (shown by `vlm-safety plugins`)"
    rows = [row for _, row in option_rows(subject.cls.Options)]
    assert len(rows) >= len(describe_options(subject.cls.Options))
    undocumented = [row["name"] for row in rows if not row["doc"].strip()]
    assert not undocumented, f"{subject.name}: options without `doc`: {undocumented}"


def check_neutral_is_plain_generate(subject: Subject) -> None:
    """Under its neutral options the defense gives exactly the tokens of plain transformers generate."""
    detach(subject.model)
    plain, _ = subject.generate(None)
    attach(subject.model, subject.processor)
    output, _ = subject.generate(subject.flags("neutral"))
    assert torch.equal(output.sequences, plain.sequences), (
        f"{subject.name}, neutral options: {output.sequences.tolist()} != plain {plain.sequences.tolist()}"
    )
    assert not any(report.refused for report in output.safety), f"{subject.name}: neutral options refused"


def check_one_report_per_row(subject: Subject) -> None:
    """Under its active options every row gets a report holding the defense's record, and no error."""
    attach(subject.model, subject.processor)
    output, _ = subject.generate(subject.flags("active"))
    assert [report.row for report in output.safety] == list(range(len(REQUESTS)))
    for report in output.safety:
        assert subject.name in report.defenses, f"{subject.name}: row {report.row} has no record of the defense"
        assert report.error is None and not report.refused, f"{subject.name}: row {report.row}: {report.error}"
        assert report.decision in (PASS, MODIFIED)


def check_fails_closed(subject: Subject) -> None:
    """A defense method that raises gives the refusal on every row (``on_error: refuse``, the
    default) or the error itself (``on_error: raise``), never the raw answer."""
    attach(subject.model, subject.processor)
    refusal = subject.processor.tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]
    for kind in subject.cls.kinds():
        original = subject.cls.__dict__.get(kind)

        def broken(self, *args, where=kind):
            raise RuntimeError(f"{subject.name} broke in {where}")

        setattr(subject.cls, kind, broken)
        try:
            output, inputs = subject.generate(subject.flags("active", refusal=REFUSAL))
            answers = output.sequences[:, inputs["input_ids"].shape[1] :]
            for row, report in enumerate(output.safety):
                assert report.refused and report.decision == REFUSED, f"{subject.name}.{kind}: row {row} not refused"
                assert report.error.startswith(f"{subject.name}: RuntimeError") and kind in report.error
                assert answers[row, : len(refusal)].tolist() == refusal, f"{subject.name}.{kind}: row {row}"
            try:
                subject.generate(subject.flags("active", on_error="raise"))
            except RuntimeError as error:
                assert f"broke in {kind}" in str(error)
            else:
                raise AssertionError(f"{subject.name}.{kind}: on_error: raise did not raise")
        finally:
            if original is None:
                delattr(subject.cls, kind)
            else:
                setattr(subject.cls, kind, original)


def check_threads_do_not_see_each_other(subject: Subject, rounds: int = 3) -> None:
    """A thread with the active options and a thread with no flags, on one model at once, each
    get what they get alone."""
    attach(subject.model, subject.processor)
    calls = {
        "active": lambda: subject.generate(subject.flags("active"))[0].sequences,
        "plain": lambda: subject.generate(None)[0].sequences,
    }
    alone = {which: call() for which, call in calls.items()}
    for which, outputs in run_concurrently(calls, rounds=rounds).items():
        for sequences in outputs:
            assert torch.equal(sequences, alone[which]), f"{subject.name}: the {which} thread saw the other's flags"


CHECKS: tuple[Callable[[Subject], None], ...] = (
    check_documented,
    check_neutral_is_plain_generate,
    check_one_report_per_row,
    check_fails_closed,
    check_threads_do_not_see_each_other,
)


def check_defense(name: str, workdir: str | Path, family: str = "llava") -> None:
    """Run every check on the registered defense ``name``; ``workdir`` holds its artifacts."""
    subject = Subject.make(name, workdir, family)
    try:
        for check in CHECKS:
            check(subject)
    finally:
        detach(subject.model)


def run_concurrently(calls: dict[str, Callable[[], Any]], rounds: int = 4) -> dict[str, list[Any]]:
    """Run each named zero-argument call ``rounds`` times in a thread of its own, all threads
    starting together; the outputs per name. A thread's exception is re-raised here."""
    start, outputs, errors = threading.Barrier(len(calls)), {name: [] for name in calls}, []

    def worker(name):
        try:
            start.wait()
            for _ in range(rounds):
                outputs[name].append(calls[name]())
        except Exception as error:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outputs
