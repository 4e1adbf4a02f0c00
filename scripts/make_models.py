#!/usr/bin/env python
"""Train the fixture CNNs on scikit-learn's digits and export them to ONNX.

The fixtures under ``models/`` are small but real networks (ResNet, MobileNetV2,
VGG and Inception-like) trained on the 8x8 ``load_digits`` images that ship
inside scikit-learn, upsampled to 32x32. Everything is seeded and runs on one
CPU thread so a rerun reproduces the same files.

Usage (from the repository root, after ``pip install '.[models]'``)::

    python scripts/make_models.py --out models
    python scripts/make_models.py --only resnet,vgg
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

try:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn
except ImportError as _exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"make_models.py: missing optional dependency '{_exc.name}'; "
        "install it with: pip install '.[models]'"
    )

from fixture_archs import MODELS, SIZE, ModelSpec  # needs torch: imported after the check above

LOG = logging.getLogger("make_models")

SEED = 0
N_TEST = 360
N_CALIB = 256
OPSET = 17
BATCH_SIZE = 64
MAX_SHIFT = 2
NUM_THREADS = 1
PARITY_ATOL = 1e-4
MIN_ACCURACY = 0.95


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Splits:
    """Preprocessed digits, normalized with the train statistics."""

    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: float
    std: float


def upsample(images: np.ndarray) -> np.ndarray:
    """Scale 8x8 digits (0..16) to [0, 1] and resize them bilinearly to 32x32.

    Args:
        images: Array of shape [N, 8, 8] with values 0..16.

    Returns:
        float32 array of shape [N, 1, 32, 32].
    """
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32)


def prepare_data(seed: int = SEED) -> Splits:
    """Load, upsample, split (stratified) and normalize the digits dataset.

    Args:
        seed: ``random_state`` of both stratified splits.

    Returns:
        The train / calib / test splits and the normalization constants.
    """
    digits = load_digits()
    images = upsample(digits.images)
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=N_TEST, stratify=labels, random_state=seed
    )
    train_x, calib_x, train_y, calib_y = train_test_split(
        rest_x, rest_y, test_size=N_CALIB, stratify=rest_y, random_state=seed
    )
    mean = float(train_x.mean(dtype=np.float64))
    std = float(train_x.std(dtype=np.float64))

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - np.float32(mean)) / np.float32(std)).astype(np.float32)

    return Splits(norm(train_x), train_y, norm(calib_x), calib_y, norm(test_x), test_y, mean, std)


def save_npz(path: Path, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Save ``input`` / ``labels`` with ``np.savez_compressed``, byte-reproducibly.

    ``np.savez_compressed`` stamps each zip member with the current time; the
    members are rewritten with a fixed timestamp so reruns give identical bytes.

    Args:
        path: Destination ``.npz`` file.
        inputs: float32 array [N, 1, 32, 32].
        labels: int64 array [N].
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, input=inputs, labels=labels)
    buf.seek(0)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, src.read(info.filename))
    path.write_bytes(out.getvalue())


# ----------------------------------------------------------------------- training


def shift_batch(x: torch.Tensor, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Randomly translate each image by up to ``MAX_SHIFT`` pixels.

    Args:
        x: Batch [B, 1, H, W].
        gen: Seeded generator for the offsets.
        fill: Value used for the uncovered border (the normalized background).

    Returns:
        The shifted batch, same shape as ``x``.
    """
    m = MAX_SHIFT
    padded = F.pad(x, (m, m, m, m), value=fill)
    offsets = torch.randint(0, 2 * m + 1, (x.shape[0], 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


def train(model: nn.Module, spec: ModelSpec, data: Splits) -> nn.Module:
    """Train ``model`` with Adam, cosine LR decay and shift augmentation.

    Args:
        model: Freshly initialized network.
        spec: Epochs, learning rate and seed.
        data: The normalized splits (only train is used).

    Returns:
        The trained model, in eval mode.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.from_numpy(data.train_x)
    y = torch.from_numpy(data.train_y)
    fill = -data.mean / data.std
    steps = spec.epochs * -(-len(x) // BATCH_SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    model.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(shift_batch(x[idx], gen, fill)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        LOG.info("  epoch %2d/%d  loss %.4f", epoch + 1, spec.epochs, total / len(x))
    return model.eval()


# ------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, path: Path, summary: str) -> onnx.ModelProto:
    """Export with the TorchScript exporter, keeping BatchNormalization unfused.

    ``training=TrainingMode.PRESERVE`` skips the exporter's eval-only peephole
    pass (which folds BN into the preceding Conv) while the model itself stays
    in eval mode, so BN is exported in inference form with its running stats.
    Every initializer is kept distinct (no Identity aliases).

    Args:
        model: Trained model in eval mode.
        path: Destination ``.onnx`` file (weights embedded).
        summary: Architecture description stored as the graph doc string.

    Returns:
        The exported, checked model.
    """
    assert not model.training
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, SIZE, SIZE),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            keep_initializers_as_inputs=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    # Listing initializers as inputs stops the exporter from merging equal-valued
    # initializers behind Identity nodes (e.g. the two BN biases feeding a residual
    # Add train identically); drop them from the inputs again afterwards.
    weights = {t.name for t in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.doc_string = f"onnxcompress fixture trained on sklearn digits. {summary}"
    check_bn_unfused(model, proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def check_bn_unfused(model: nn.Module, proto: onnx.ModelProto) -> None:
    """Fail unless every BatchNorm2d survived as an inference-mode BN node.

    Args:
        model: The torch model.
        proto: Its ONNX export.

    Raises:
        RuntimeError: If BN nodes are missing or in training form.
    """
    n_torch = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if len(bns) != n_torch:
        raise RuntimeError(f"expected {n_torch} BatchNormalization nodes, found {len(bns)}")
    for node in bns:
        training = any(a.name == "training_mode" and a.i for a in node.attribute)
        if len(node.output) != 1 or training:
            raise RuntimeError(f"{node.name}: BatchNormalization is not in inference form")


def ort_session(path: Path) -> ort.InferenceSession:
    """Single-threaded CPU session with every graph optimization disabled."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the model at ``path`` on the whole batch ``x`` with onnxruntime."""
    return ort_session(path).run(["logits"], {"input": x})[0]


def torch_parity(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Max |ORT - torch| over the logits of ``x``.

    Raises:
        RuntimeError: If the difference exceeds ``PARITY_ATOL``.
    """
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ort_logits(path, x) - ref).max())
    if diff > PARITY_ATOL:
        raise RuntimeError(f"{path.name}: ORT/torch max abs diff {diff:.3g} > {PARITY_ATOL}")
    return diff


def count_params_macs(proto: onnx.ModelProto) -> tuple[int, int]:
    """Parameter count and MACs per sample (batch 1) of an ONNX model.

    Params are the elements of all initializers (Conv/Gemm weights and biases,
    BN scale/bias/mean/var). MACs count Conv (out_elems * Cin/group * kH * kW)
    and Gemm/MatMul (M * N * K); element-wise ops, BN and pooling are ignored.

    Args:
        proto: Model with a batch-1 or symbolic-batch input.

    Returns:
        ``(params, macs)``.
    """
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    params = sum(int(np.prod(d)) for d in inits.values())
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = dict(inits)
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    macs = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # [Cout, Cin/group, kH, kW]
            macs += int(np.prod(shapes[node.output[0]][1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            w = shapes[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            n, k = (w[0], w[1]) if trans_b else (w[-1], w[-2])
            macs += n * k  # M = 1 per sample
    return params, macs


# ------------------------------------------------------------------------- driver


def setup_torch() -> None:
    """Make torch deterministic and single-threaded (called in every process)."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(NUM_THREADS)


def init_worker() -> None:
    """Process-pool initializer: logging and torch settings."""
    setup_logging()
    setup_torch()


def build_one(name: str, out: Path) -> dict[str, object]:
    """Train, export, verify and measure one model (runs in a worker process).

    Args:
        name: Key of ``MODELS``.
        out: Output directory.

    Returns:
        The model's ``models.json`` entry.
    """
    data = prepare_data()
    spec = MODELS[name]
    torch.manual_seed(spec.seed)
    model = spec.build()
    t0 = time.perf_counter()
    train(model, spec, data)
    LOG.info("%s: trained in %.1f s", name, time.perf_counter() - t0)
    path = out / spec.file
    proto = export_onnx(model, path, spec.summary)
    diff = torch_parity(model, path, data.test_x)
    preds = ort_logits(path, data.test_x).argmax(axis=1)
    correct = int((preds == data.test_y).sum())
    params, macs = count_params_macs(proto)
    entry: dict[str, object] = {
        "file": spec.file,
        "accuracy": correct / len(data.test_y),
        "correct": correct,
        "n_test": len(data.test_y),
        "params": params,
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "size_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "epochs": spec.epochs,
        "lr": spec.lr,
        "seed": spec.seed,
        "summary": spec.summary,
    }
    LOG.info(
        "%s: acc %.4f  params %d  MACs %.2fM  size %.2f MB  max|ORT-torch| %.2g",
        name,
        entry["accuracy"],
        params,
        macs / 1e6,
        entry["size_bytes"] / 1e6,
        diff,
    )
    return entry


#: ``models/README.md``, filled by :func:`write_readme`.
README_TEMPLATE = """# Fixture models

Small but real CNNs trained on scikit-learn's bundled `load_digits` dataset and
exported to ONNX by `scripts/make_models.py`. Used as test fixtures and
benchmark inputs for onnxcompress.

## Provenance

- Dataset: `sklearn.datasets.load_digits` (1797 grayscale 8x8 digits, values
  0..16, 10 classes). Shipped inside scikit-learn; nothing is downloaded.
- Preprocessing: divide by 16, bilinear upsample to 32x32
  (`torch.nn.functional.interpolate`, `align_corners=False`), then normalize
  with the train-split mean / std: mean = {mean:.9g}, std = {std:.9g}.
- Split: stratified `train_test_split` with `random_state={split_seed}`:
  first test ({n_test}) vs rest, then calib ({n_calib}) vs
  train ({n_train}).
- Training: Adam with a one-cycle LR schedule, batch {batch_size}, random shifts of
  up to {max_shift} px (border filled with the normalized background);
  `torch.manual_seed` per model: {seeds}. Each model trains in its own
  process with `torch.use_deterministic_algorithms(True)` and
  `torch.set_num_threads({num_threads})` (`--jobs` only sets how many run at once).
- Export: TorchScript exporter (`dynamo=False`), opset {opset}, input `input`
  `[batch,1,32,32]`, output `logits` `[batch,10]` (dynamic dim `batch`),
  `training=TrainingMode.PRESERVE` on an eval-mode model so BatchNormalization stays
  unfused (inference form, running stats). ORT output is checked against torch
  (max abs diff <= {parity_atol:g}).

Data files (`np.savez_compressed`, keys `input` float32 `[N,1,32,32]` already
normalized, `labels` int64 `[N]`): `digits_calib.npz` ({n_calib} samples),
`digits_test.npz` ({n_test} samples).

## Regenerate

From the repository root:

```
pip install '.[models]'
python scripts/make_models.py --out models
```

`--only resnet,vgg` rebuilds a subset (other entries of `models.json` are kept).
Reruns on the same machine and library versions reproduce the files byte for byte.

## Models

Accuracy: onnxruntime (CPU, graph optimizations disabled) on `digits_test.npz`.
Params: elements of all initializers (includes BN mean/var); trainable: torch
parameters. MACs per sample: Conv = out_elems * Cin/group * kH * kW,
Gemm = M * N * K; other ops ignored. Machine-readable copy: `models.json`.

| file | FP32 test accuracy | size | params | trainable params | MACs / sample |
| --- | --- | --- | --- | --- | --- |
{rows}

{archs}
"""


def write_readme(out: Path, meta: dict[str, object], models: dict[str, dict[str, object]]) -> None:
    """Write ``models/README.md`` from the recorded metadata."""
    rows = "\n".join(
        f"| `{m['file']}` | {m['accuracy'] * 100:.2f}% ({m['correct']}/{m['n_test']}) "
        f"| {m['size_bytes'] / 1e6:.2f} MB ({m['size_bytes']:,} B) | {m['params']:,} "
        f"| {m['trainable_params']:,} | {m['macs'] / 1e6:.2f} M ({m['macs']:,}) |"
        for m in models.values()
    )
    archs = "\n".join(f"- `{m['file']}` ({name}): {m['summary']}" for name, m in models.items())
    seeds = ", ".join(f"{name} {m['seed']} ({m['epochs']} epochs, lr {m['lr']})" for name, m in models.items())
    text = README_TEMPLATE.format(
        **{k: meta[k] for k in ("mean", "std", "split_seed", "n_test", "n_calib", "n_train")},
        batch_size=BATCH_SIZE, max_shift=MAX_SHIFT, num_threads=NUM_THREADS, opset=OPSET, parity_atol=PARITY_ATOL,
        seeds=seeds, rows=rows, archs=archs,
    )
    (out / "README.md").write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    parser.add_argument(
        "--only", default=",".join(MODELS), help=f"comma-separated subset of: {','.join(MODELS)}"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="models trained in parallel, one thread each (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(MODELS))
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def setup_logging() -> None:
    """Log progress to stderr with timestamps."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(processName)s %(message)s", datefmt="%H:%M:%S"
    )


def build_all(names: list[str], out: Path, jobs: int) -> dict[str, dict[str, object]]:
    """Build ``names`` in ``jobs`` single-threaded worker processes.

    Each model trains in a fresh process on one thread, so results do not
    depend on ``jobs`` or on the order models are built in.

    Returns:
        ``models.json`` entries keyed by model name.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=init_worker) as pool:
        futures = {name: pool.submit(build_one, name, out) for name in names}
        return {name: fut.result() for name, fut in futures.items()}


def main(argv: list[str] | None = None) -> int:
    """Entry point: build the data files and the requested models."""
    setup_logging()
    args = parse_args(argv)
    setup_torch()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    data = prepare_data()
    save_npz(out / "digits_calib.npz", data.calib_x, data.calib_y)
    save_npz(out / "digits_test.npz", data.test_x, data.test_y)
    LOG.info(
        "data: train %d  calib %d  test %d", len(data.train_y), len(data.calib_y), len(data.test_y)
    )

    json_path = out / "models.json"
    manifest = json.loads(json_path.read_text()) if json_path.exists() else {}
    old = manifest.get("models", {})
    t0 = time.perf_counter()
    built = build_all(args.only, out, args.jobs)
    LOG.info("total build time %.1f s", time.perf_counter() - t0)

    models = {n: built.get(n) or old[n] for n in MODELS if n in built or n in old}
    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "input_size": SIZE,
        "mean": data.mean,
        "std": data.std,
        "split_seed": SEED,
        "n_train": len(data.train_y),
        "n_calib": len(data.calib_y),
        "n_test": len(data.test_y),
        "opset": OPSET,
    }
    # other keys (``transformers``: scripts/make_transformers.py) are kept
    json_path.write_text(json.dumps({**manifest, "meta": meta, "models": models}, indent=2) + "\n")
    write_readme(out, meta, models)

    low = [n for n, m in built.items() if float(m["accuracy"]) < MIN_ACCURACY]
    if low:
        LOG.error("accuracy below %.2f: %s", MIN_ACCURACY, low)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
