"""Every registered defense, built-in or third-party (the example plugin's too), passes every
conformance check (vlm_safety_plugins/testing/conformance.py). A defense gets these tests by
being registered and declaring its ``conformance_options``."""

import pytest

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.testing import conformance

DEFENSES = sorted(plugins.registry().defenses)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """``subjects(name)`` -> the defense's conformance Subject, made once per module."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = conformance.Subject.make(name, tmp_path_factory.mktemp(name))
        return made[name]

    yield get
    for subject in made.values():
        vsp.detach(subject.model)


def test_the_builtin_defenses_and_the_example_plugin_take_part():
    from .test_entrypoints import require_example_plugin

    require_example_plugin()
    assert {"adashield", "cmrm", "eta", "keyword_refusal", "vlm_guard"} <= set(DEFENSES)


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", DEFENSES)
def test_defense_conforms(name, check, subjects):
    check(subjects(name))


def test_a_defense_without_conformance_options_is_told_to_declare_them(register, tmp_path):
    class Undeclared(vsp.Defense):
        name = "undeclared"
        description = "Declares no conformance options."

    register(Undeclared)
    with pytest.raises(AssertionError, match="undeclared: conformance_options must return"):
        conformance.Subject.make("undeclared", tmp_path)


def test_the_checks_catch_neutral_options_that_change_the_answer(register, tmp_path):
    class NotNeutral(vsp.Defense):
        """Changes every answer, whatever its options: its "neutral" set is a lie the suite must catch."""

        name = "not_neutral"
        description = "Bans the greedy choice at every step."

        @classmethod
        def conformance_options(cls, model, processor, workdir):
            return {"neutral": {}, "active": {}}

        def logits_processors(self, call):
            self.records(call)
            return [_BanFirstChoice()]

    register(NotNeutral)
    subject = conformance.Subject.make("not_neutral", tmp_path)
    try:
        with pytest.raises(AssertionError, match="not_neutral, neutral options"):
            conformance.check_neutral_is_plain_generate(subject)
        conformance.check_one_report_per_row(subject)  # the other checks hold for it
        conformance.check_fails_closed(subject)
    finally:
        vsp.detach(subject.model)


class _BanFirstChoice:
    """A logits processor that bans the greedy choice at every step (changes every answer)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores.scatter_(1, scores.argmax(dim=-1, keepdim=True), float("-inf"))
        return scores
