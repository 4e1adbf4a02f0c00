"""``onnxcompress auto``: targets met (or exit 1), the reported spec rebuilds the winner byte for byte,
deterministic for a seed (in-process vs process pool vs Ray), an interrupted search resumes from its
cache, bad options exit 2, and ``report`` reads the auto JSON.

One small search (concat fixture, 64 calibration / 64 validation samples, space: prune 0.25 and int8)
is shared; the other tests reuse its cache, so they evaluate at most one candidate each."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import onnxcompress
from onnxcompress.cli import main
from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.auto import choose
from onnxcompress.pipeline.auto_space import Candidate, Space, Targets, candidate_spec, parse_space, parse_targets
from onnxcompress.pipeline.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "concat_digits.onnx"
SPACE = Space(prune=(0.25,), prune_macs=(), lowrank=(), quant=("int8",), weight_only=())
SPACE_CLI = "prune=0.25,prune_macs=,lowrank=,quant=int8,weight_only="
COMBO = "prune_channels:ratio=0.25,fold_bn,simplify,quantize_int8:share_concat_scales=true"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("auto_data")
    calib, test = np.load(ROOT / "models" / "digits_calib.npz"), np.load(ROOT / "models" / "digits_test.npz")
    np.savez(folder / "calib.npz", **{k: v[:64] for k, v in calib.items()})
    np.savez(folder / "test.npz", **{k: v[:64] for k, v in test.items()})
    np.savez(folder / "nolabels.npz", input=test["input"][:16])
    return {"calib": str(folder / "calib.npz"), "data": str(folder / "test.npz"),
            "nolabels": str(folder / "nolabels.npz"), "folder": folder}


def _auto(data: dict, cache: Path, **kw):
    args = {"target": "size=0.3", "min_cosine": 0.99, "jobs": 1, "space": SPACE, "seed": 0, "latency_runs": 20}
    return onnxcompress.auto(MODEL, data["calib"], data["data"], cache_dir=cache, **{**args, **kw})


@pytest.fixture(scope="module")
def searched(data):
    cache = data["folder"] / "cache"
    return _auto(data, cache, jobs=2), cache  # the process pool


def _bytes(result) -> bytes:
    return Path(result.winner["model_path"]).read_bytes()


def test_winner_meets_targets_by_combining(searched):
    result, _ = searched
    assert result.winner is not None and result.winner["passed"]
    # int8 alone (~0.35x) and pruning alone (~0.6x) miss size=0.3: only their combination meets it
    assert result.spec == COMBO
    assert result.winner["size_ratio"] <= 0.3 and result.winner["cosine"] >= 0.99
    singles = {r["spec"]: r for r in result.records if r["stage"] == "single"}
    assert all(r["misses"] for r in singles.values())
    assert result.evaluated == 3 and result.cached == 0
    payload = json.loads(json.dumps(result.as_dict()))
    assert payload["kind"] == "auto" and payload["spec"] == COMBO
    assert any(r["front"] for r in payload["candidates"])


def test_spec_reproduces_the_winner_byte_for_byte(searched, data, tmp_path):
    result, _ = searched
    model, report = onnxcompress.optimize(MODEL, result.spec, calib=data["calib"], data=data["data"],
                                          gate=result.gate, seed=0)
    assert report.passed
    serde.save_model(model, tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx").read_bytes() == _bytes(result)


def test_deterministic_in_process_vs_pool(searched, data, tmp_path):
    pooled, _ = searched
    again = _auto(data, tmp_path / "fresh", jobs=1)
    assert again.evaluated == 3 and again.spec == pooled.spec
    assert _bytes(again) == _bytes(pooled)


def _interrupted(cache: Path, result, spec: str, copy: Path) -> Path:
    """A copy of ``cache`` without one finished evaluation, as if the search had stopped before it."""
    shutil.copytree(cache, copy)
    rec = next(r for r in result.records if r["spec"] == spec)
    (copy / f"{rec['key']}.json").unlink()
    (copy / Path(rec["model_path"]).name).unlink()
    return copy


def test_interrupted_search_resumes_from_the_cache(searched, data, tmp_path):
    result, cache = searched
    resumed = _auto(data, _interrupted(cache, result, COMBO, tmp_path / "cache"))
    assert (resumed.evaluated, resumed.cached) == (1, 2)
    assert resumed.spec == result.spec and _bytes(resumed) == _bytes(result)
    again = _auto(data, tmp_path / "cache")
    assert (again.evaluated, again.cached) == (0, 3)


def test_ray_gives_the_same_winner(searched, data, tmp_path):
    ray = pytest.importorskip("ray")
    result, cache = searched
    copy = _interrupted(cache, result, COMBO, tmp_path / "cache")  # the winner is evaluated again, on Ray
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = _auto(data, copy, ray="auto")
    finally:
        ray.shutdown()
    assert (on_ray.evaluated, on_ray.spec) == (1, result.spec)
    assert _bytes(on_ray) == _bytes(result)


def _cli(data: dict, cache: Path, *args: str) -> list[str]:
    return ["auto", str(MODEL), "--calib", data["calib"], "--data", data["data"], "--min-cosine", "0.99",
            "--space", SPACE_CLI, "--jobs", "1", "--cache-dir", str(cache), "--latency-runs", "20", *args]


def test_cli_no_candidate_meets_the_targets_exit_1(searched, data, tmp_path, capsys):
    _, cache = searched
    out = tmp_path / "out.onnx"
    code = main(["-q", *_cli(data, cache, "--target", "macs=0.1", "-o", str(out), "--json", str(tmp_path / "a.json"))])
    assert code == 1 and not out.exists()
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["winner"] is None and payload["output"] is None
    assert payload["best"]["spec"].startswith("prune_channels") and payload["best"]["misses"]
    assert "no candidate met the targets" in capsys.readouterr().err


def test_cli_writes_the_winner_and_report_reads_its_json(searched, data, tmp_path, capsys):
    _, cache = searched
    out, js = tmp_path / "win.onnx", tmp_path / "auto.json"
    assert main(_cli(data, cache, "--target", "size=0.3", "-o", str(out), "--json", str(js))) == 0
    text = capsys.readouterr().out
    assert f"chosen pipeline: {COMBO}" in text and "speed-up" in text and "reproduce: onnxcompress optimize" in text
    payload = json.loads(js.read_text())
    assert out.read_bytes() == Path(payload["winner"]["model_path"]).read_bytes()
    assert main(["report", str(js), "-o", str(tmp_path / "r.md")]) == 0
    report = (tmp_path / "r.md").read_text()
    assert "## auto search (auto)" in report and COMBO in report
    plots = list(tmp_path.glob("r-pareto-*.png"))
    assert plots or "matplotlib is not installed" in report


@pytest.mark.parametrize("args, message", [
    (["--target", "speed=0.5", "--min-cosine", "0.99"], "unknown kind 'speed'"),
    (["--target", "latency=2", "--min-cosine", "0.99"], "ratio must be in (0, 1]"),
    (["--target", "latency=0.5"], "needs a quality bound"),
    (["--min-cosine", "0.99"], "at least one --target"),
    (["--target", "size=0.5", "--min-cosine", "0.99", "--space", "prune=big"], "must be numbers"),
])
def test_cli_bad_options_exit_2(data, tmp_path, capsys, args, message):
    code = main(["auto", str(MODEL), "--calib", data["calib"], "--cache-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_max_drop_needs_labels(data, tmp_path):
    with pytest.raises(InputError, match="needs labels"):
        onnxcompress.auto(MODEL, data["calib"], data["nolabels"], target="size=0.5", max_drop=1.0, cache_dir=tmp_path)


def test_targets_and_space_parsing():
    t = parse_targets(["latency=0.5", "size=0.25"])
    assert t.primary == "latency" and t.get("size") == 0.25
    assert t.misses({"latency": 0.4, "size": 0.3}) == ["size 0.300 > 0.25"]
    assert t.misses({"latency": None, "size": 0.1}) == ["latency ? > 0.5"]
    with pytest.raises(InputError, match="given twice"):
        parse_targets("size=0.5,size=0.4")
    assert parse_space("prune=0.5|0.25,lowrank=") == Space(prune=(0.5, 0.25), lowrank=())
    assert parse_space("prune_macs=0.3|0.5") == Space(prune_macs=(0.3, 0.5))
    assert parse_space("align=8|16").align == (8, 16) and parse_space("align=").align == ()
    with pytest.raises(InputError, match="align"):
        parse_space("align=1")
    with pytest.raises(InputError, match="prune MAC target"):
        parse_space("prune_macs=1.5")
    with pytest.raises(InputError, match="unknown quantization"):
        parse_space("quant=int3")


def test_candidate_spec_order():
    c = Candidate(prune=0.5, lowrank=0.9, quant="int8")
    assert candidate_spec(c) == ("prune_channels:ratio=0.5,fold_bn,factorize_tucker:energy=0.9,simplify,"
                                 "quantize_int8:share_concat_scales=true")
    assert Candidate().spec == "fold_bn,simplify"
    onnxcompress.parse_spec(c.spec)  # every spec the search can produce parses
    b = Candidate(budget=0.3, quant="int8")
    assert b.spec.startswith("prune_channels:macs=0.3:max_group_ratio=") and b.spec.endswith(",quantize_int8:share_concat_scales=true")
    assert b.label() == "prune macs 0.3 + int8" and b.techniques == 2
    onnxcompress.parse_spec(b.spec)
    with pytest.raises(InputError, match="not both"):
        Candidate(prune=0.5, budget=0.3)
    a = Candidate(budget=0.3, quant="int8", align=16)
    assert a.spec == b.spec.replace(",fold_bn", ":round_to=16,fold_bn") and a.label() == "prune macs 0.3 /16 + int8"
    assert Candidate(prune=0.5, align=16).spec.startswith("prune_channels:ratio=0.5:round_to=16,")
    assert onnxcompress.parse_spec(a.spec)[0].opts["round_to"] == 16
    with pytest.raises(InputError, match="does not prune"):
        Candidate(quant="int8", align=16)


def test_choose_prefers_the_first_target_then_quality():
    recs = [{"spec": "a", "passed": True, "latency_ratio": 0.4, "size_ratio": 0.5, "accuracy": 98.0},
            {"spec": "b", "passed": True, "latency_ratio": 0.3, "size_ratio": 0.5, "accuracy": 97.0},
            {"spec": "c", "passed": False, "latency_ratio": None, "size_ratio": 0.1, "accuracy": 50.0},
            {"spec": "d", "passed": True, "latency_ratio": 0.2, "size_ratio": 0.9, "accuracy": 99.0}]
    win, _ = choose(recs, Targets((("latency", 0.5), ("size", 0.6))), "accuracy")
    assert win["spec"] == "b"  # d misses size, c failed the gate
    win, best = choose(recs, Targets((("size", 0.2),)), "accuracy")
    assert win is None and best["spec"] in ("a", "b")


def test_recipe_auto_table(tmp_path):
    path = tmp_path / "budget.toml"
    path.write_text('description = "auto defaults"\n[auto]\ntarget = ["size=0.3"]\nmin_cosine = 0.99\n')
    recipe = load_recipe(path)
    assert recipe.auto == {"target": ["size=0.3"], "min_cosine": 0.99} and recipe.passes == []
    with pytest.raises(InputError, match="only an \\[auto\\] table"):
        onnxcompress.optimize(MODEL, recipe=str(path))
    path.write_text('[auto]\ntargets = ["size=0.3"]\n')
    with pytest.raises(InputError, match="unknown key 'targets'"):
        load_recipe(path)


def _space_for(targets: str, **signals):
    from onnxcompress.pipeline.auto import AutoSettings, _space

    s = AutoSettings(parse_targets(targets), {}, "accuracy", None, None, "m", "c", "d")
    return _space(s, {"matmul_weight_share": 0.0, "conv_weight_share": 0.0, **signals}).quant


def test_conv_weight_only_joins_where_convs_hold_the_weights():
    assert _space_for("size=0.1", conv_weight_share=0.9) == ("cw4", "cw8", "int8", "int8-mixed")  # 4 bits first
    assert _space_for("latency=0.5", conv_weight_share=0.9) == ("int8", "int8-mixed", "cw8", "cw4")
    assert _space_for("size=0.1", conv_weight_share=0.1) == ("int8", "int8-mixed")
    assert _space_for("size=0.1", matmul_weight_share=0.5) == ("w4", "w8", "int8", "int8-mixed")
    assert "ops=matmul|conv:bits=4" in Candidate(prune=0.5, quant="cw4").spec
    assert "method=gptq" in Candidate(quant="cw4").spec  # 4-bit convs round with GPTQ (auto always has --calib)
    assert "method" not in Candidate(quant="cw8").spec
    onnxcompress.parse_spec(Candidate(prune=0.5, quant="cw4").spec)


class _StubRun:
    """Stands in for the search's run: single records given, every combination asked for is recorded
    as failing (so backtracking shows), nothing is evaluated."""

    def __init__(self, targets: str, singles: dict):
        from onnxcompress.pipeline.auto import AutoSettings

        self.s = AutoSettings(parse_targets(targets), {}, "accuracy", None, None, "m", "c", "d")
        self.records = {c: {"passed": True, **rec} for c, rec in singles.items()}
        self.asked: list[list[Candidate]] = []

    def run(self, candidates, stage=None):
        self.asked.append(list(candidates))
        for c in candidates:
            self.records.setdefault(c, {"passed": False})

    def passed(self, c):
        return bool(self.records.get(c, {}).get("passed"))


def test_combinations_prune_one_way_and_prefilter_by_estimate():
    from onnxcompress.pipeline.auto import _combinations

    uni, bud, q = Candidate(prune=0.5), Candidate(budget=0.3), Candidate(quant="int8")
    singles = {uni: {"size_ratio": 0.5, "macs_ratio": 0.28}, bud: {"size_ratio": 0.3, "macs_ratio": 0.3},
               q: {"size_ratio": 0.3, "macs_ratio": 1.0}}
    space = Space(prune=(0.375, 0.5), prune_macs=(0.4, 0.3), lowrank=(), align=())  # aligned: the next test
    run = _StubRun("latency=0.5", singles)
    _combinations(run, {"prune": uni, "budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    assert run.asked[0] == [Candidate(prune=0.5, quant="int8"), Candidate(budget=0.3, quant="int8")]
    assert run.asked[1] == [Candidate(prune=0.375, quant="int8"), Candidate(budget=0.4, quant="int8")]  # backtrack
    run = _StubRun("size=0.1", singles)  # estimates 0.15 (uniform + int8) and 0.09 (budget + int8)
    _combinations(run, {"prune": uni, "budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    assert run.asked[0] == [Candidate(budget=0.3, quant="int8")]
    run = _StubRun("size=0.1", {k: v for k, v in singles.items() if k != q})  # int8 never ran alone: kept
    _combinations(run, {"prune": uni, "budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    assert len(run.asked[0]) == 2
    run = _StubRun("size=0.01", singles)  # none comes close: all are evaluated
    _combinations(run, {"prune": uni, "budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    assert len(run.asked[0]) == 2


def test_latency_target_also_tries_the_pruning_bests_aligned():
    from onnxcompress.pipeline.auto import _combinations

    bud, q = Candidate(budget=0.3), Candidate(quant="int8")
    singles = {bud: {"size_ratio": 0.3, "macs_ratio": 0.3}, q: {"size_ratio": 0.3, "macs_ratio": 1.0}}
    space = Space(prune=(), prune_macs=(0.4, 0.3), lowrank=())
    run = _StubRun("latency=0.5", singles)
    _combinations(run, {"budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    aligned, capped = Candidate(budget=0.3, align=16), Candidate(budget=0.3, align=16, cap=0.75)
    assert run.asked[0] == [Candidate(budget=0.3, quant="int8"), replace(aligned, quant="int8"), aligned,
                            replace(capped, quant="int8"), capped]
    assert replace(aligned, budget=0.4) in run.asked[1]  # backtracking keeps the alignment
    assert replace(capped, budget=0.4) in run.asked[1] and ":max_group_ratio=0.75:" in capped.spec
    assert capped.label() == "prune macs 0.3 /16 cap 0.75"
    run = _StubRun("size=0.5", singles)  # no latency target: channel counts need no alignment
    _combinations(run, {"budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    assert run.asked[0] == [Candidate(budget=0.3, quant="int8")]
    run = _StubRun("latency=0.5", singles)
    _combinations(run, {"budget": bud, "quant": q}, replace(space, align=()))  # type: ignore[arg-type]
    assert run.asked[0] == [Candidate(budget=0.3, quant="int8")]


def test_latency_target_also_tries_int8_with_the_slower_layers_float():
    from onnxcompress.pipeline.auto import _combinations

    bud, q = Candidate(budget=0.3), Candidate(quant="int8")
    singles = {bud: {"size_ratio": 0.3, "macs_ratio": 0.3}, q: {"size_ratio": 0.3, "macs_ratio": 1.0}}
    space = Space(prune=(), prune_macs=(0.4, 0.3), lowrank=(), align=(), int8_float=("stem",))
    run = _StubRun("latency=0.5", singles)
    _combinations(run, {"budget": bud, "quant": q}, space)  # type: ignore[arg-type]
    both = Candidate(budget=0.3, quant="int8")
    assert run.asked[0] == [both, replace(q, float_layers=("stem",)), replace(both, float_layers=("stem",))]
    assert run.asked[0][1].spec == "fold_bn,simplify,quantize_int8:share_concat_scales=true:float_pools=true:exclude=stem"
    assert run.asked[0][1].label() == "int8 (1 float)"
    assert _space_for("latency=0.5", int8_slower_layers=["stem"]) == ("int8", "int8-mixed")
    from onnxcompress.pipeline.auto import AutoSettings, _space

    for targets, expect in (("latency=0.5", ("stem",)), ("size=0.5", ())):
        s = AutoSettings(parse_targets(targets), {}, "accuracy", None, None, "m", "c", "d")
        signals = {"matmul_weight_share": 0.0, "conv_weight_share": 0.0, "int8_slower_layers": ["stem"]}
        assert _space(s, signals).int8_float == expect  # only a latency target keeps layers float for speed
    with pytest.raises(InputError, match="not int8"):
        Candidate(prune=0.5, float_layers=("stem",))


def test_choose_breaks_latency_ties_by_quality_then_macs():
    recs = [{"spec": "a", "passed": True, "latency_ratio": 0.2186, "macs_ratio": 0.25, "size_ratio": 0.09, "accuracy": 99.0},
            {"spec": "b", "passed": True, "latency_ratio": 0.2196, "macs_ratio": 0.19, "size_ratio": 0.06, "accuracy": 99.0},
            {"spec": "c", "passed": True, "latency_ratio": 0.2202, "macs_ratio": 0.10, "size_ratio": 0.05, "accuracy": 98.0}]
    win, _ = choose(recs, Targets((("latency", 0.5),)), "accuracy")
    assert win["spec"] == "b"  # all round to 0.22; c is less accurate; b has fewer MACs than a
    recs[1]["latency_ratio"] = 0.2251  # rounds to 0.23: no longer tied
    assert choose(recs, Targets((("latency", 0.5),)), "accuracy")[0]["spec"] == "a"


def test_near_fastest_candidates_are_timed_again_alone(monkeypatch):
    from types import SimpleNamespace

    from onnxcompress.pipeline import auto

    calls = []

    def fake_bench(models, **kw):
        calls.append((list(models[1:]), kw["runs"]))
        again = {"a.onnx": 0.233, "b.onnx": 0.210}
        return SimpleNamespace(models=[None, *[SimpleNamespace(ratio_vs_first=again[p], median_ms=1.0)
                                               for p in models[1:]]])

    monkeypatch.setattr(auto, "bench", fake_bench)
    passing = [{"spec": "a", "model_path": "a.onnx", "latency_ratio": 0.2186},
               {"spec": "b", "model_path": "b.onnx", "latency_ratio": 0.2196},
               {"spec": "far", "model_path": "far.onnx", "latency_ratio": 0.30}]  # over 10 % slower: not again
    run = SimpleNamespace(s=SimpleNamespace(targets=Targets((("latency", 0.5),)), latency_runs=50, data=None, seed=0,
                                            progress=False))
    auto._confirm(run, None, passing)
    assert calls == [(["a.onnx", "b.onnx"], 100)]
    assert [r["latency_ratio"] for r in passing] == [0.233, 0.210, 0.30]
    assert passing[0]["latency_ratio_all"] == 0.2186 and "latency_ratio_all" not in passing[2]
    run.s.targets = Targets((("size", 0.5),))  # no latency target: nothing timed again
    auto._confirm(run, None, passing)
    assert len(calls) == 1


def test_four_bit_combinations_first_backtrack_to_the_plain_refit():
    from onnxcompress.pipeline.auto import _step_down

    space = Space(quant=("cw8", "cw4"))
    c = Candidate(budget=0.3, quant="cw4")
    plain = _step_down(c, space)
    assert plain == Candidate(budget=0.3, quant="cw4", plain=True)
    assert ":refit_holdout=0" in plain.spec and plain.label() == "prune macs 0.3 plain + cw4"
    assert onnxcompress.parse_spec(plain.spec)[0].opts["refit_holdout"] == 0
    assert _step_down(plain, space) == Candidate(budget=0.4, quant="cw4", plain=True)  # then the pruning weakens
    assert _step_down(Candidate(budget=0.3, quant="int8"), Space()) == Candidate(budget=0.4, quant="int8")  # int8: no
    assert _step_down(Candidate(quant="cw4"), space) == Candidate(quant="cw8")  # nothing pruned: no plain rung
    with pytest.raises(InputError, match="does not prune"):
        Candidate(quant="cw4", plain=True)
