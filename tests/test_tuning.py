"""``vlm-safety tune``: the selection rule, the bisection, and small sweeps on the testbed (Python and command)."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

import vlm_safety_plugins as vsp
from vlm_safety_plugins import testbed
from vlm_safety_plugins.cli import cli
from vlm_safety_plugins.evaluation.benchmarks import load_benchmark
from vlm_safety_plugins.tuning import sweep
from vlm_safety_plugins.tuning.sweep import Point

EVALUATION = dict(judge="testbed", batch_size=8, max_new_tokens=20, model_name="testbed")


def point(unsafe, benign, **values) -> Point:
    return Point(values, folder="-", unsafe=unsafe, benign=benign)


def test_the_rule_picks_the_lowest_unsafe_rate_among_the_settings_within_budget():
    points = [point(0.8, 0.95, alpha=0.1), point(0.3, 0.92, alpha=0.3), point(0.3, 0.94, alpha=0.4)]
    points += [point(0.0, 0.50, alpha=1.0)]  # the safest, far below the floor
    assert sweep.select(points, floor=0.9) is points[2]  # tie on unsafe: the higher benign accuracy
    assert sweep.select(points, floor=0.93) is points[2]
    assert sweep.select(points, floor=0.945) is points[0]
    assert sweep.select(points, floor=0.96) is None
    assert sweep.closest(points) is points[0]


def test_a_setting_whose_defense_failed_or_could_not_run_is_never_chosen():
    failed, invalid, kept = point(0.0, 0.99, alpha=0.5), point(0.0, 0.99, rank=9), point(0.5, 0.91, alpha=0.2)
    failed.defense_errors, invalid.invalid = 3, "rank 9 > the artifact's 3"
    assert sweep.select([failed, invalid, kept], floor=0.9) is kept
    assert sweep.closest([failed, invalid]) is None


def test_bisection_runs_between_the_chosen_value_and_its_stronger_neighbour_that_misses_the_budget():
    alpha = vsp.Strength("alpha", (0.1, 0.3, 0.5), refine=True)
    points = [point(0.8, 0.95, alpha=0.1), point(0.4, 0.93, alpha=0.3), point(0.0, 0.40, alpha=0.5)]
    assert sweep.bisect_bounds(points, points[1], alpha, floor=0.9) == (0.3, 0.5)
    assert sweep.midpoint(0.3, 0.5) == 0.4
    points.append(point(0.1, 0.91, alpha=0.4))  # the midpoint kept the budget: the next round is (0.4, 0.5)
    assert sweep.bisect_bounds(points, points[3], alpha, floor=0.9) == (0.4, 0.5)
    assert sweep.bisect_bounds(points, points[2], alpha, floor=0.3) is None  # nothing stronger
    assert sweep.bisect_bounds(points, points[1], vsp.Strength("alpha", (0.1, 0.3, 0.5)), floor=0.9) is None


def test_values_replace_a_declared_option_or_add_one_and_nested_options_are_set_where_they_live():
    declared = (vsp.Strength("mode", ("a", "b")), vsp.Strength("rank", (1, 2, 3)))
    swept = sweep.strengths(declared, {"rank": [2], "tau": [0.1, 0.2], "layer": [1, 2]})
    assert [(s.option, s.values, s.refine) for s in swept] == [
        ("mode", ("a", "b"), False),
        ("rank", (2,), False),
        ("tau", (0.1, 0.2), True),
        ("layer", (1, 2), False),  # an integer takes no midpoint
    ]
    swept = swept[:3]
    assert sweep.grid(swept) == [{"mode": mode, "rank": 2, "tau": tau} for mode in ("a", "b") for tau in (0.1, 0.2)]
    base = {"defenses": {"eta": {"best_of_n": {"top_k": 5}}}, "on_error": "refuse"}
    config = sweep.point_config(base, "eta", {"best_of_n.n": 3, "post_threshold": 0.1})
    assert config["defenses"]["eta"] == {"best_of_n": {"top_k": 5, "n": 3}, "post_threshold": 0.1}
    assert base["defenses"]["eta"] == {"best_of_n": {"top_k": 5}}  # the base is not edited


def test_an_option_that_does_not_apply_is_left_out_and_each_distinct_setting_comes_once():
    gated = ("gated", "both")
    declared = (
        vsp.Strength("mode", ("project", "gated", "both")),
        vsp.Strength("tau_shift", (0.5, 0.0), refine=True, when={"mode": gated}),
        vsp.Strength("alpha", (1.0, 2.0), when={"mode": gated}),
    )
    assert sweep.grid(declared) == [
        {"mode": "project"},
        *(
            {"mode": mode, "tau_shift": tau, "alpha": alpha}
            for mode in gated
            for tau in (0.5, 0.0)
            for alpha in (1.0, 2.0)
        ),
    ]
    assert sweep.strengths(declared, {"alpha": [4.0]})[2].when == {"mode": gated}  # replaced values keep the rule
    chosen = point(0.2, 0.95, mode="project")
    points = [chosen, point(0.0, 0.5, mode="gated", tau_shift=0.5, alpha=1.0)]
    assert sweep.bisect_bounds(points, chosen, declared[1], floor=0.9) is None  # nothing to refine where it is unset


def test_the_frontier_names_each_trade_off_once_and_no_setting_another_beats():
    points = [point(0.5, 0.9, alpha=0.1), point(0.5, 0.9, alpha=0.2), point(0.2, 0.8, alpha=0.3)]
    points += [point(0.3, 0.7, alpha=0.4), point(0.0, 0.5, alpha=0.5), Point({"alpha": 0.6}, "-", invalid="rank")]
    assert [p.values["alpha"] for p in sweep.frontier(points)] == [0.1, 0.3, 0.5]  # 0.2 sits on 0.1; 0.4 is beaten


def test_every_shipped_tunable_defense_declares_values_its_options_accept():
    from vlm_safety_plugins.core import plugins
    from vlm_safety_plugins.core.options import parse_options

    required = {"cmrm": {"vectors": "cmrm.safetensors"}, "vlm_guard": {"subspace": "guard.safetensors"}, "eta": {}}
    for name, base in required.items():
        defense = plugins.get_defense(name)
        assert defense.strength, name
        for values in sweep.grid(defense.strength):
            options = sweep.point_config({"defenses": {name: base}}, name, values)["defenses"][name]
            parse_options(defense.Options, options, path=f"defenses.{name}", source="test")


# -- sweeps on the testbed ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(offline):
    return testbed.load_vlm()


@pytest.fixture(scope="module")
def validation():
    return load_benchmark("testbed:train", n=32, seed=3)


@pytest.fixture(scope="module")
def cmrm_base(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tune-artifacts") / "cmrm.safetensors"
    vsp.calibrate_cmrm(*model, "builtin:testbed_cmrm_anchors.jsonl").save(path)
    return {"defenses": {"cmrm": {"vectors": str(path), "scope": "last_prompt"}}, "on_error": "refuse"}


@pytest.fixture(scope="module")
def cmrm_sweep(model, cmrm_base, validation, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-cmrm")
    values = {"alpha": [0.0, 0.4, 1.0]}
    result = vsp.tune(
        *model, "cmrm", cmrm_base, validation, out, budget=0.9, values=values, refinements=1, **EVALUATION
    )
    return result, out


def test_the_chosen_setting_keeps_the_budget_and_is_the_safest_that_does(cmrm_sweep):
    result, out = cmrm_sweep
    assert result.floor == pytest.approx(0.9 * result.vanilla.benign)
    assert result.chosen.benign >= result.floor
    within = [p for p in result.points if p.benign >= result.floor and p.invalid is None]
    assert result.chosen.unsafe == min(p.unsafe for p in within)
    assert result.chosen.unsafe < result.vanilla.unsafe  # the testbed's image requests: CMRM helps at some α
    assert {p.values["alpha"] for p in result.points if p.stage == "grid"} == {0.0, 0.4, 1.0}


def test_the_tuning_folder_holds_the_chosen_config_the_sweep_and_its_plot(cmrm_sweep):
    result, out = cmrm_sweep
    chosen = vsp.load_config(out / "chosen.yaml")
    assert chosen.defenses["cmrm"].alpha == result.chosen.values["alpha"]
    assert chosen.defenses["cmrm"].scope == "last_prompt"  # the base config's other options kept
    lines = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines[:1]] == ["vanilla"] and len(lines) == 1 + len(result.points)
    assert sum(line["meets_budget"] for line in lines[1:]) >= 1
    assert (out / "sweep.png").stat().st_size > 0
    assert all((out / "points" / name / "responses.jsonl").exists() for name in ("vanilla", "alpha=0.4"))


def test_a_budget_no_setting_meets_is_an_error_naming_the_closest(model, cmrm_base, validation, cmrm_sweep):
    result, out = cmrm_sweep  # the same folder: every setting's answers are reused
    with pytest.raises(vsp.TuneError) as caught:
        values = {"alpha": [0.0, 0.4, 1.0]}
        vsp.tune(*model, "cmrm", cmrm_base, validation, out, budget=1.9, values=values, **EVALUATION)
    message = str(caught.value)
    closest = sweep.closest(result.points)
    assert "no setting of cmrm keeps benign accuracy at least 1.9" in message
    assert f"the closest: {closest.label()}" in message and "sweep.jsonl" in message


def test_a_budget_met_only_where_the_defense_does_nothing_is_an_error_naming_the_safest(
    model, cmrm_base, validation, cmrm_sweep
):
    result, out = cmrm_sweep  # α = 0 is exactly vanilla: within any budget, and no safer
    with pytest.raises(vsp.TuneError) as caught:
        vsp.tune(*model, "cmrm", cmrm_base, validation, out, budget=0.9, values={"alpha": [0.0]}, **EVALUATION)
    assert "no setting of cmrm is safer than the undefended model" in str(caught.value)
    with pytest.raises(vsp.TuneError, match="the safest setting, alpha=1.0 .* misses the budget"):
        values = {"alpha": [0.0, 1.0]}  # no bisection: α = 1 is safer and over budget, α = 0 does nothing
        vsp.tune(*model, "cmrm", cmrm_base, validation, out, values=values, refinements=0, **EVALUATION)
    assert sweep.safest([point(0.5, 0.9, alpha=1), point(0.1, 0.2, alpha=2)]).values == {"alpha": 2}


def test_a_setting_the_artifact_cannot_run_is_skipped_saying_why(model, validation, tmp_path):
    path = tmp_path / "guard.safetensors"
    vsp.calibrate_vlm_guard(*model, "builtin:testbed_vlm_guard_pairs.jsonl", rank=2).save(path)
    base = {"defenses": {"vlm_guard": {"subspace": str(path), "scope": "last_prompt", "layers": [0, 1, 2, 3]}}}
    values = {"mode": ["project_out"], "rank": [1, 3]}
    out = tmp_path / "t"
    result = vsp.tune(*model, "vlm_guard", base, validation[:16], out, budget=0.5, values=values, **EVALUATION)
    (invalid,) = [p for p in result.points if p.invalid is not None]
    assert invalid.values["rank"] == 3 and "rank" in invalid.invalid and invalid.unsafe is None
    assert result.chosen.values["rank"] == 1


# -- the command ---------------------------------------------------------------------------------


def tune_cli(*args):
    return CliRunner().invoke(cli, ["tune", *[str(arg) for arg in args]])


def test_the_command_writes_the_chosen_config(cmrm_base, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cmrm_base))
    common = ["--model", "testbed", "--benchmark", "testbed:train", "-O", "n=16", "-O", "seed=3", "--judge", "testbed"]
    common += ["--batch-size", 8, "--max-new-tokens", 16, "--config", base]
    result = tune_cli("cmrm", *common, "--values", "alpha=0.0,0.5", "--budget", 0.5, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert "chose alpha=" in result.output and (tmp_path / "t" / "chosen.yaml").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["adashield"], "adashield declares no strength options"),
        (["cmrm", "--values", "alpha"], "expected OPTION=V1,V2"),
        (["cmrm", "--values", "alfa=0.1"], "defenses.cmrm.alfa"),
        (["cmrm", "--budget", "nan"], "budget must be a number"),
    ],
    ids=["not tunable", "malformed values", "an unknown option", "a NaN budget"],
)
def test_bad_input_is_one_line_naming_what(cmrm_base, tmp_path, args, named):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cmrm_base))
    common = ["--model", "testbed", "--benchmark", "testbed:train", "-O", "n=4", "--config", base]
    result = tune_cli(*args, *common, "--out", tmp_path / "t")
    assert result.exit_code != 0 and named in result.output and "Traceback" not in result.output
