#!/usr/bin/env python3
"""Peak memory of the CLI on a generated model over 2 GB (external data); not a test.

The model (``big.onnx`` + ``big.onnx.data``, about 2.3 GB of float32 weights, deterministic for
a seed) is written tensor by tensor straight into the external data file, so generating it never
holds more than one weight in memory. Its shape gives every measured step work:

* ``Conv 3×3 → BatchNormalization → Relu`` twice (``fold_bn``; prunable conv channels),
* ``GlobalAveragePool → Flatten → Gemm 256→1024``, then ``PAIRS`` blocks of
  ``Gemm 1024→16384 → Relu → Gemm 16384→1024 → Relu`` (64 MiB weights each; every hidden width
  is a prunable group for ``prune_channels``; the weights are rank ``RANK`` plus 10 % noise, so
  ``factorize_svd``'s default 90 %-energy rule factorizes them), ``Gemm 1024→10 → logits``.

Each step runs the CLI in a fresh subprocess (``python -m onnxcompress optimize big.onnx
--passes X -o out.onnx --external-data --no-validate -q``; ``inspect`` for the first) and its
peak resident memory is its own ``ru_maxrss`` (``scripts/child_peak.py``). The table shows the weights'
size, the peak, their ratio (the target is about 2×), wall time, the output's size on disk and
whether the step exited 0. ``--validate N`` validates instead with N random samples (two
onnxruntime sessions on top: expect more memory).

Usage::

    python scripts/large_model.py                       # files in a temporary folder under /tmp
    python scripts/large_model.py --workdir /data/big --keep --steps inspect,fold_bn
    python scripts/large_model.py --workdir /data/big --reuse --steps prune_channels   # same model again
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

GIB = 2**30
WIDE, NARROW, RANK = 16384, 1024, 48
STEPS = {
    "inspect": None,
    "fold_bn": "fold_bn",
    "prune_channels": "prune_channels:ratio=0.3",
    "factorize_svd": "factorize_svd",
    "quantize_int8": "quantize_int8:weights_only=true",
    "simplify": "simplify",
}


class _Writer:
    """Appends initializers to one external data file and records them as external tensors."""

    def __init__(self, data_path: Path, rng: np.random.Generator):
        self.fh = open(data_path, "wb")  # noqa: SIM115 - closed by finish()
        self.location = data_path.name
        self.rng = rng
        self.inits: list[TensorProto] = []
        self.nbytes = 0

    def add(self, name: str, values: np.ndarray) -> str:
        values = np.ascontiguousarray(values, dtype=np.float32)
        offset = self.fh.tell()
        self.fh.write(values.tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(values.shape))
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(values.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        self.inits.append(tensor)
        self.nbytes += values.nbytes
        return name

    def low_rank(self, name: str, rows: int, cols: int) -> str:
        """A ``[rows, cols]`` weight of rank ``RANK`` plus 10 % noise, He-scaled for ``rows`` inputs."""
        a = self.rng.standard_normal((rows, RANK), dtype=np.float32)
        b = self.rng.standard_normal((RANK, cols), dtype=np.float32)
        w = a @ b
        w *= np.float32(1 / np.sqrt(RANK))
        w += np.float32(0.1) * self.rng.standard_normal((rows, cols), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / rows))
        return self.add(name, w)


def _conv_bn(w: _Writer, nodes: list, x: str, cin: int, cout: int, i: int) -> str:
    rng = w.rng
    weight = w.add(f"conv{i}.w", rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.sqrt(2 / (cin * 9)))
    bias = w.add(f"conv{i}.b", rng.standard_normal(cout, dtype=np.float32) * 0.1)
    nodes.append(helper.make_node("Conv", [x, weight, bias], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
    bn = [w.add(f"bn{i}.{k}", v) for k, v in (
        ("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.standard_normal(cout) * 0.1),
        ("mean", rng.standard_normal(cout) * 0.1), ("var", rng.uniform(0.5, 1.5, cout)))]
    nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"bn{i}"))
    nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"))
    return f"relu{i}"


def _gemm(w: _Writer, nodes: list, x: str, name: str, cin: int, cout: int, relu: bool = True) -> str:
    weight = w.low_rank(f"{name}.w", cin, cout) if min(cin, cout) >= NARROW else w.add(
        f"{name}.w", w.rng.standard_normal((cin, cout), dtype=np.float32) * np.sqrt(2 / cin))
    bias = w.add(f"{name}.b", w.rng.standard_normal(cout, dtype=np.float32) * 0.01)
    out = name if relu else "logits"
    nodes.append(helper.make_node("Gemm", [x, weight, bias], [out], name=name))
    if not relu:
        return out
    nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"], name=f"{name}.relu"))
    return f"{name}.relu"


def make_large_model(path: Path, pairs: int, seed: int = 0) -> int:
    """Write the model to ``path`` (+ ``path.data``) and return its weights' bytes."""
    w = _Writer(path.with_name(path.name + ".data"), np.random.default_rng(seed))
    nodes: list = []
    try:
        x = _conv_bn(w, nodes, "input", 64, 256, 0)
        x = _conv_bn(w, nodes, x, 256, 256, 1)
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
        x = _gemm(w, nodes, "flat", "fc_in", 256, NARROW)
        for i in range(pairs):
            x = _gemm(w, nodes, x, f"fc{i}_up", NARROW, WIDE)
            x = _gemm(w, nodes, x, f"fc{i}_down", WIDE, NARROW)
        _gemm(w, nodes, x, "fc_out", NARROW, 10, relu=False)
    finally:
        w.fh.close()
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="large_model.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return w.nbytes


def _weights_of(path: Path) -> int:
    """Bytes of initializer data of a model file (read without its external data)."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer)


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def run_step(step: str, model: Path, workdir: Path, validate: int) -> dict:
    """Run one CLI step in a fresh process; its peak RSS (bytes), seconds, output bytes and status."""
    out = workdir / f"out_{step}.onnx"
    if STEPS[step] is None:
        args = ["inspect", str(model), "--json", str(workdir / "inspect.json")]
    else:
        check = ["--samples", str(validate), "--batch-size", str(validate)] if validate else ["--no-validate"]
        args = ["optimize", str(model), "--passes", STEPS[step], "-o", str(out), "--external-data", *check]
    from checkout import env as checkout_env
    from child_peak import run  # the child's own peak, not this process's (which made the model)

    env = checkout_env(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    log = workdir / f"{step}.stderr"

    with open(log, "wb") as err_fh:
        rc, seconds, peak = run([sys.executable, "-m", "onnxcompress", "-q", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err_fh)
    size = _files_bytes(out) if out.exists() else 0
    err = log.read_text(errors="replace").strip().splitlines()
    for p in (out, out.with_name(out.name + ".data"), log):
        p.unlink(missing_ok=True)
    return {"step": step, "peak": peak, "seconds": seconds, "out_bytes": size, "rc": rc,
            "err": err[-1] if err else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the model and outputs (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--pairs", type=int, default=17, help="Gemm up/down pairs (17: 2.3 GB of weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--validate", type=int, default=0, metavar="N", help="validate with N random samples instead of --no-validate")
    parser.add_argument("--reuse", action="store_true", help="use the model already in --workdir (from an earlier --keep run)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnxcompress-large-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    need = (2 * args.pairs + 1) * NARROW * WIDE * 4 * 2.2
    if free < need:
        print(f"not enough disk in {workdir}: {free / GIB:.1f} GiB free, need ~{need / GIB:.1f} GiB", file=sys.stderr)
        return 2
    model = workdir / "big.onnx"
    try:
        start = time.perf_counter()
        if args.reuse and model.exists():
            weights = _weights_of(model)
            print(f"reusing {model} ({weights / 1e9:.2f} GB of weights)", flush=True)
        else:
            weights = make_large_model(model, args.pairs, args.seed)
            print(f"generated {model} ({weights / 1e9:.2f} GB of weights, {_files_bytes(model) / 1e9:.2f} GB on disk) "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for step in steps:
            row = run_step(step, model, workdir, args.validate)
            rows.append(row)
            _print_row(row, weights, header=len(rows) == 1)
        bad = [r for r in rows if r["rc"] != 0]
        over = [r for r in rows if r["peak"] > 2.0 * weights]
        print(f"\n{len(rows) - len(bad)}/{len(rows)} steps ok; peak/weights max "
              f"{max(r['peak'] for r in rows) / weights:.2f}x (target ~2x); over 2.0x: "
              f"{', '.join(r['step'] for r in over) or 'none'}")
        return 1 if bad else 0
    finally:
        if not args.keep and not args.reuse:
            for p in workdir.glob("*"):
                p.unlink()
            if args.workdir is None:
                workdir.rmdir()


def _print_row(row: dict, weights: int, header: bool) -> None:
    if header:
        print(f"{'step':<16}{'weights GB':>11}{'peak RSS GB':>13}{'peak/weights':>14}{'seconds':>9}{'output GB':>11}  ok")
    print(f"{row['step']:<16}{weights / 1e9:>11.2f}{row['peak'] / 1e9:>13.2f}{row['peak'] / weights:>14.2f}"
          f"{row['seconds']:>9.0f}{row['out_bytes'] / 1e9:>11.2f}  {'yes' if row['rc'] == 0 else 'NO (rc=' + str(row['rc']) + ')'}",
          flush=True)
    if row["rc"] != 0 and row["err"]:
        print(f"    {row['err']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
