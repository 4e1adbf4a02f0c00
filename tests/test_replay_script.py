"""``scripts/replay_issue16.py``, the scripted replay of issue #16's session, on its synthetic fixtures
(no real models), with the CLI run in-process: every point that a fixture can show runs through the
CLI and gets its verdict, so the script cannot rot. The input-handling cases of the issue
(``--preprocess`` values, image folders, ``--help``, ``exclude=`` names, ``inspect --nodes``, global
flags after the subcommand) must be FIXED.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers.runs import load_script

pytest.importorskip("PIL")

replay = load_script("replay_issue16")
harness = sys.modules["replay_harness"]

#: Points not fixed yet: their checks must run (FIXED or NOT FIXED with what was observed), not fail.
NOT_FIXED_YET: set[str] = set()
#: Points that check plots: skipped without the ``plot`` extra (CI installs ``test`` only).
NEEDS_PLOTS = {"report-pareto-axis", "report-sens-label", "report-html"}
INPUT_HANDLING = {"preprocess-mean", "preprocess-keys", "folder-hint", "preprocess-help", "exclude-unknown",
                  "inspect-nodes", "quiet-after"}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """Every point on the synthetic fixtures: ``({key: outcome}, printed text)``."""
    lines: list[str] = []
    r = replay.make_replay(tmp_path_factory.mktemp("replay16"), synthetic=True, inprocess=True, write=lines.append)
    results = harness.run_points(r, replay.POINTS, replay.GROUPS)
    return {p.key: o for p, o in results}, "\n".join(lines), results


def test_every_point_has_a_verdict(replayed):
    outcomes, _, _ = replayed
    assert list(outcomes) == [p.key for p in replay.POINTS]
    for p in replay.POINTS:
        o = outcomes[p.key]
        if p.real_only:
            assert o.verdict == harness.SKIPPED and "pip install --no-deps" in o.observed, p.key
        elif p.key in NEEDS_PLOTS and importlib.util.find_spec("matplotlib") is None:
            assert o.verdict == harness.SKIPPED and "matplotlib" in o.observed, p.key
        elif p.key in NOT_FIXED_YET:
            assert o.verdict in (harness.FIXED, harness.NOT_FIXED), p.key
            assert not o.observed.startswith("check could not run"), f"{p.key}: {o.observed}"
        else:
            assert o.verdict == harness.FIXED, f"{p.key}: {o.observed}"


@pytest.mark.parametrize("key", sorted(INPUT_HANDLING))
def test_input_handling_cases_are_fixed(replayed, key):
    outcomes, _, _ = replayed
    assert outcomes[key].verdict == harness.FIXED, outcomes[key].observed


def test_the_output_shows_commands_exit_codes_and_verdicts(replayed):
    _, text, results = replayed
    assert "=== Bad input reached an internal error ===" in text
    assert "$ onnxcompress compare conv_net.onnx conv_net.onnx --data images --preprocess size=48x64,mean=1/2" in text
    assert "    exit 2 (" in text and "| error: preprocess: mean has 2 values" in text
    assert "=> FIXED" in text and "=> SKIPPED" in text
    table = harness.summary_table(results)
    assert table.splitlines()[0].split() == ["#", "point", "group", "model", "verdict", "observed"]
    assert "preprocess-keys" in table and table.splitlines()[-1].endswith("skipped")


def test_a_missing_option_is_not_fixed_yet_and_a_broken_check_is_reported(tmp_path):
    r = replay.make_replay(tmp_path, inprocess=True, write=lambda _: None)
    run = r.cli("inspect", "m.onnx", "--no-such-option")
    outcome = harness.not_yet(run, "`inspect --no-such-option`")
    assert run.code == 2 and outcome.verdict == harness.NOT_FIXED and outcome.observed.startswith("not fixed yet")

    def broken(_):
        raise KeyError("slices")

    def missing(_):
        raise harness.Missing("pip install --no-deps x==1")

    points = [harness.Point("a", "gate", "q", broken), harness.Point("b", "gate", "q", missing)]
    (_, a), (_, b) = harness.run_points(r, points)
    assert a.verdict == harness.NOT_FIXED and a.observed.startswith("check could not run: KeyError")
    assert b.verdict == harness.SKIPPED and b.observed == "skipped: pip install --no-deps x==1"


def test_main_selects_points_and_sets_the_exit_code(tmp_path, capsys):
    assert replay.main(["--synthetic", "--inprocess", "--only", "quiet-after", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1] quiet-after  (noise)" in out and "$ onnxcompress inspect conv_net.onnx" in out
    assert "1 fixed, 0 not fixed, 0 skipped" in out and (tmp_path / "conv_net.onnx").is_file()
    code = replay.main(["--synthetic", "--inprocess", "--only", "folder-hint-nhwc,prune-gate", "--keep", str(tmp_path)])
    rows = {line.split()[1]: line for line in capsys.readouterr().out.split("\nsummary\n")[1].splitlines()[1:3]}
    assert "SKIPPED" in rows["prune-gate"]  # skipped points do not count
    assert code == (1 if "NOT FIXED" in rows["folder-hint-nhwc"] else 0)
    assert [p.key for p in replay.select("targets")] == ["target-det-int8", "target-nsfw"]
    with pytest.raises(ValueError, match="unknown point or group nope"):
        replay.select("gate,nope")


def test_commands_run_in_subprocesses_with_this_checkout(tmp_path):
    r = replay.make_replay(tmp_path, write=lambda _: None)
    run = r.cli("--version")
    assert run.code == 0 and "onnxcompress" in run.out
    assert r.env["PYTHONPATH"].split(":")[0] == str(harness.ROOT)
