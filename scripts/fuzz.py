#!/usr/bin/env python3
"""Bounded, seeded fuzzing with hypothesis (not a test; ``tests/test_fuzz_smoke.py`` runs a few examples).

Targets:

* ``load``: :func:`onnxcompress.core.serde.load_model` on arbitrary bytes and on byte-level mutations
  (truncate, bit flips, splices, deletions) of the fixture models, from bytes and from a file.
  It must return a model or raise :class:`~onnxcompress.core.errors.InputError`, within ``--timeout``.
* ``spec``: :func:`~onnxcompress.core.pass_api.parse_spec` on arbitrary and on spec-like strings, and
  :func:`~onnxcompress.pipeline.recipes.load_recipe` on arbitrary text and on generated TOML recipes:
  success or ``InputError`` only.
* ``cli``: ``onnxcompress -q optimize MODEL --passes P -o OUT --no-validate`` in-process (through
  :func:`onnxcompress.cli.main`) on structurally mutated fixture models that still load: exit
  code in {0, 1, 2, 3}, at most one line on stderr and no traceback, and no output (nor temporary)
  file unless the exit code is 0. A ``internal error`` (an unexpected exception turned into exit 3)
  is reported as a finding too.

Each target runs in rounds of ``--chunk`` examples with seeds ``seed, seed+1, ...`` until
``--seconds`` have passed. A failing example is shrunk by hypothesis and saved (minimized) under
``--out``; a failure already seen (same kind and message) is counted but not raised again, so the
rounds go on finding new ones. Prints examples run, seconds and the distinct failures per target.

Usage::

    python scripts/fuzz.py                          # every target, 60 s each
    python scripts/fuzz.py --targets load --seconds 300 --out /tmp/fuzz
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

from onnxcompress.cli import main as cli_main
from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.manager import parse_spec, registry
from onnxcompress.pipeline.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = [ROOT / "models" / f"{n}_digits.onnx" for n in ("resnet", "mobilenetv2", "vgg", "concat")]
CLI_PASSES = ("fold_bn", "prune_channels:ratio=0.3:reconstruct=false", "factorize_svd",
              "quantize_int8:weights_only=true", "fold_bn,prune_channels:ratio=0.5:reconstruct=false")


class Hang(Exception):
    """An example ran longer than the per-example timeout."""


class Finding(AssertionError):
    """A property violation; ``key`` identifies it among the distinct failures."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key = key


@dataclass
class Stats:
    """What one target found."""

    name: str
    examples: int = 0
    seconds: float = 0.0
    outcomes: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)  # key -> (count, saved path)

    def outcome(self, label: str) -> None:
        self.outcomes[label] = self.outcomes.get(label, 0) + 1


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds``."""
    def handler(signum, frame):
        raise Hang(f"no result after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _key(exc: BaseException) -> str:
    """A failure's identity: exception type and message with numbers and quoted names blanked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', text)[:120]}"


# --------------------------------------------------------------------------- strategies


def _fixture_bytes() -> list[bytes]:
    return [p.read_bytes() for p in FIXTURES if p.exists()]


@st.composite
def mutated_bytes(draw, fixtures: list[bytes]) -> bytes:
    """A fixture model's bytes after 1-4 truncations, bit flips, splices or deletions."""
    data = bytearray(draw(st.sampled_from(fixtures)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("truncate", "flip", "splice", "delete", "insert")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            other = draw(st.sampled_from(fixtures))
            start = draw(st.integers(0, len(other) - 1))
            data[pos:pos] = other[start:start + draw(st.integers(1, 512))]
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 256))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


_OPS = ("Conv", "Relu", "Add", "Gemm", "MatMul", "Concat", "Reshape", "Flatten", "BatchNormalization",
        "GlobalAveragePool", "MaxPool", "Identity", "Mul", "Transpose", "Split", "Slice", "Unknown")


@st.composite
def mutated_model(draw, fixtures: list[onnx.ModelProto]) -> onnx.ModelProto:
    """A fixture model with 1-3 structural edits (op types, inputs, attributes, shapes, dtypes, opset)."""
    model = onnx.ModelProto()
    model.CopyFrom(draw(st.sampled_from(fixtures)))
    g = model.graph
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("op_type", "drop_node", "rewire", "attr", "init_dims", "drop_init",
                                   "input_shape", "opset", "dtype", "dup_node", "extra_output")))
        _mutate(draw, model, g, op)
    return model


def _mutate(draw, model: onnx.ModelProto, g: onnx.GraphProto, op: str) -> None:
    nodes, inits = g.node, g.initializer
    names = [n for node in nodes for n in node.output] + [i.name for i in inits] + [i.name for i in g.input]
    if op == "opset":
        model.opset_import[0].version = draw(st.integers(1, 24))
    elif op == "input_shape":
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            d = dims[draw(st.integers(0, len(dims) - 1))]
            d.Clear()
            choice = draw(st.integers(0, 2))
            if choice == 0:
                d.dim_value = draw(st.integers(0, 64))
            elif choice == 1:
                d.dim_param = draw(st.sampled_from(("N", "H", "?")))
    elif op in ("init_dims", "drop_init", "dtype") and inits:
        i = draw(st.integers(0, len(inits) - 1))
        if op == "drop_init":
            del inits[i]
        elif op == "dtype":
            inits[i].data_type = draw(st.sampled_from((1, 2, 3, 6, 7, 10, 11)))
        elif inits[i].dims:
            inits[i].dims[draw(st.integers(0, len(inits[i].dims) - 1))] = draw(st.integers(0, 8))
    elif nodes:
        i = draw(st.integers(0, len(nodes) - 1))
        node = nodes[i]
        if op == "op_type":
            node.op_type = draw(st.sampled_from(_OPS))
        elif op == "drop_node":
            del nodes[i]
        elif op == "rewire" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names + [""]))
        elif op == "attr" and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.integers(-3, 8))
            elif attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-2, 8))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = draw(st.sampled_from((0.0, -1.0, 1e30, float("nan"))))
        elif op == "dup_node":
            nodes.add().CopyFrom(node)
        elif op == "extra_output" and node.output:
            g.output.add().name = node.output[0]


_NAMES = tuple(registry()) + ("", "x", "fold_bn ")
_KEYS = ("ratio", "rank", "energy", "exclude", "method", "weights_only", "criterion", "steps", "", "x", "ratio ")
_VALUES = ("0.3", "1", "-1", "nan", "inf", "1e309", "true", "false", "", "a|b", "conv", "mse", "9" * 30, "0x10", "=")


@st.composite
def spec_like(draw) -> str:
    """A pass spec built from real and broken pass names, keys, values and separators."""
    items = []
    for _ in range(draw(st.integers(0, 3))):
        item = draw(st.sampled_from(_NAMES))
        for _ in range(draw(st.integers(0, 3))):
            item += ":" + draw(st.sampled_from(_KEYS)) + draw(st.sampled_from(("=", "", "==", ":"))) + draw(
                st.sampled_from(_VALUES))
        items.append(item)
    return draw(st.sampled_from((",", ", ", ",,"))).join(items)


_TOML_VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
                         st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3),
                         st.dictionaries(st.sampled_from(("a", "name")), st.integers(), max_size=2))


@st.composite
def recipe_like(draw) -> str:
    """A TOML recipe with real and unknown keys and values of every TOML type."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"description = {_toml(draw(_TOML_VALUES))}")
    if draw(st.booleans()):
        lines.append("[gate]" if draw(st.booleans()) else "gate = 3")
        for key in draw(st.lists(st.sampled_from(("min_cosine", "max_top1_drop", "x", "min_sqnr")), max_size=3, unique=True)):
            lines.append(f"{key} = {_toml(draw(_TOML_VALUES))}")
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[pass]]")
        if draw(st.integers(0, 4)):
            lines.append(f"name = {_toml(draw(st.sampled_from(_NAMES + (3, True))))}")
        for key in draw(st.lists(st.sampled_from(_KEYS[:8]), max_size=3, unique=True)):
            lines.append(f"{key} = {_toml(draw(_TOML_VALUES))}")
    if draw(st.integers(0, 5)) == 0:
        lines.append(f"{draw(st.sampled_from(('extra', 'pass', 'name')))} = {_toml(draw(_TOML_VALUES))}")
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"


# --------------------------------------------------------------------------- targets


def _expect_input_error(fn, *args) -> str:
    """Run ``fn``; return ``"ok"`` or ``"InputError"``; any other exception is a :class:`Finding`."""
    try:
        fn(*args)
        return "ok"
    except InputError as exc:
        if "\n" in str(exc).strip():
            raise Finding("multi-line InputError", str(exc)[:200]) from None
        return "InputError"
    except (Hang, Finding):
        raise
    except Exception as exc:
        raise Finding(_key(exc), repr(exc)[:300]) from exc


def _load_from_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-load-") as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(data)
        serde.load_model(path)


def _recipe_from_text(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-recipe-") as tmp:
        path = Path(tmp) / "r.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        load_recipe(path)


def _cli_once(model: onnx.ModelProto, passes: str) -> str:
    with tempfile.TemporaryDirectory(prefix="fuzz-cli-") as tmp:
        src, out = Path(tmp) / "in" / "m.onnx", Path(tmp) / "out" / "o.onnx"
        src.parent.mkdir()
        out.parent.mkdir()
        src.write_bytes(model.SerializeToString())
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["-q", "optimize", str(src), "--passes", passes, "-o", str(out), "--no-validate"])
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        leftovers = sorted(p.name for p in out.parent.iterdir())
    if rc not in (0, 1, 2, 3):
        raise Finding(f"exit code {rc}", "\n".join(lines)[:300])
    if any("Traceback" in line for line in lines) or len([l for l in lines if l.startswith("error:")]) > 1:
        raise Finding("traceback or several error lines", "\n".join(lines)[:300])
    if rc != 0 and leftovers:
        raise Finding("partial output", f"rc={rc} left {leftovers}")
    if rc == 0 and leftovers != ["o.onnx"] and leftovers != ["o.onnx", "o.onnx.data"]:
        raise Finding("unexpected output files", str(leftovers))
    error = next((l for l in lines if l.startswith("error:")), "")
    if "internal error" in error:
        raise Finding("internal error: " + _key(Exception(error.split("internal error:", 1)[1])), error[:300])
    return f"exit {rc}"


@dataclass
class Target:
    """One fuzz target: a hypothesis strategy and a check returning an outcome label."""

    name: str
    strategy: st.SearchStrategy
    check: callable
    save: callable
    timeout: float


def make_targets(timeout: float) -> dict[str, Target]:
    """The three targets (``cli`` and ``load`` need the fixture models)."""
    raw = _fixture_bytes()
    models = [serde.load_model(b) for b in raw]

    def check_load(case) -> str:
        kind, data = case
        return _expect_input_error(_load_from_file if kind == "file" else serde.load_model, data)

    def check_spec(case) -> str:
        kind, text = case
        return _expect_input_error(parse_spec if kind == "spec" else _recipe_from_text, text)

    def check_cli(case) -> str:
        model, passes = case
        return _cli_once(model, passes)

    load_data = st.one_of(st.binary(max_size=2048), mutated_bytes(raw)) if raw else st.binary(max_size=2048)
    return {
        "load": Target("load", st.tuples(st.sampled_from(("bytes", "file")), load_data), check_load,
                       lambda case: (case[1], ".onnx"), timeout),
        "spec": Target("spec", st.one_of(
            st.tuples(st.just("spec"), st.one_of(st.text(max_size=60), spec_like())),
            st.tuples(st.just("recipe"), st.one_of(st.text(max_size=200), recipe_like()))), check_spec,
            lambda case: (case[1].encode("utf-8", "surrogateescape"), ".spec" if case[0] == "spec" else ".toml"), timeout),
        "cli": Target("cli", st.tuples(mutated_model(models), st.sampled_from(CLI_PASSES)), check_cli,
                      lambda case: (case[0].SerializeToString(), f".{case[1].split(':')[0].split(',')[0]}.onnx"),
                      max(timeout, 60.0)),
    }


def run_target(target: Target, seconds: float, seed: int, chunk: int, out: Path | None,
               max_examples: int | None = None) -> Stats:
    """Fuzz one target for ``seconds`` (or ``max_examples``) and return what it found."""
    stats = Stats(target.name)
    start = time.perf_counter()
    last: dict = {}

    def prop(case) -> None:
        stats.examples += 1
        try:
            with time_limit(target.timeout):
                stats.outcome(target.check(case))
        except Hang as exc:
            _seen_or_raise(Finding("hang", str(exc)), case)
        except Finding as exc:
            _seen_or_raise(exc, case)

    def _seen_or_raise(exc: Finding, case) -> None:
        if exc.key in stats.failures and stats.failures[exc.key][1] is not None:
            count, path = stats.failures[exc.key]
            stats.failures[exc.key] = (count + 1, path)
            return
        last["case"], last["key"] = case, exc.key
        raise exc

    round_no = 0
    while time.perf_counter() - start < seconds and (max_examples is None or stats.examples < max_examples):
        n = chunk if max_examples is None else min(chunk, max_examples - stats.examples)
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))(hseed(seed + round_no)(given(target.strategy)(prop)))
        round_no += 1
        try:
            test()
        except Finding as exc:
            key = last.get("key", exc.key)
            saved = _save(out, target, key, last.get("case"), len(stats.failures)) if out else Path("-")
            count = stats.failures.get(key, (0, None))[0]
            stats.failures[key] = (count + 1, saved)
            print(f"  [{target.name}] new failure: {key}  (minimized example: {saved})", flush=True)
    stats.seconds = time.perf_counter() - start
    return stats


def _save(out: Path, target: Target, key: str, case, index: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data, suffix = target.save(case)
    path = out / f"{target.name}_{index:02d}{suffix}"
    path.write_bytes(data)
    path.with_name(path.name + ".txt").write_text(key + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="load,spec,cli", help="comma-separated: load, spec, cli")
    parser.add_argument("--seconds", type=float, default=60, help="time budget per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=200, help="examples per hypothesis round")
    parser.add_argument("--timeout", type=float, default=10, help="per-example time limit (cli: at least 60 s)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "onnxcompress-fuzz",
                        help="folder for minimized failing examples")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.CRITICAL)  # the library logs warnings on odd models; the CLI's stderr is what we check
    targets = make_targets(args.timeout)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    results = []
    for name in names:
        if name not in targets:
            parser.error(f"unknown target {name!r}")
        random.seed(args.seed)
        print(f"fuzzing {name} for {args.seconds:g} s (seed {args.seed})", flush=True)
        results.append(run_target(targets[name], args.seconds, args.seed, args.chunk, args.out))
    print(f"\n{'target':<8}{'examples':>10}{'seconds':>9}{'distinct failures':>19}  outcomes")
    for s in results:
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(s.outcomes.items()))
        print(f"{s.name:<8}{s.examples:>10}{s.seconds:>9.0f}{len(s.failures):>19}  {outcomes}")
        for key, (count, path) in s.failures.items():
            print(f"    {count:>5}x {key}  ->  {path}")
    return 1 if any(s.failures for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
