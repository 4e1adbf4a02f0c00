#!/usr/bin/env python
"""Train the fixture transformers (a digits ViT and a token-sequence classifier) and export them.

Two small but real, trained transformers give the tests task accuracy in the graph styles users
bring (issue #13):

* ``vit``: a ViT on the digits images of ``models/digits_*.npz`` (the CNN fixtures' split, see
  ``scripts/make_models.py``): 8x8 patches (Conv stride 8) -> 16 tokens + class token, dim 64,
  2 pre-LN blocks, 4 heads, GELU MLP 128, final LayerNorm, class-token head.
* ``text``: a BERT-style post-LN encoder classifying token sequences (``input_ids``,
  ``attention_mask`` [batch, seq] int64, dynamic batch and seq): token + position embeddings,
  LayerNorm, 2 blocks, 4 heads, GELU FFN 128, first-token head. The task needs attention: a
  sequence is ``[CLS, q, x_1 .. x_n, PAD ..]`` and the label (4 classes) is how many times the
  query token ``q`` occurs among ``x_1 .. x_n`` (0..3; n = 6..22, padded to 24).

Each is exported with the TorchScript exporter (``dynamo=False``, opset 17) and the dynamo
exporter (opset 18, the lowest it targets), both with dynamic axes; the text model also as an
onnxruntime-fused graph (``onnxruntime.transformers.optimizer``, model_type ``bert``) and as an
opset-23 graph with the ``Attention`` op (dynamo exporter, ``F.scaled_dot_product_attention``).
Entries go to the ``transformers`` key of ``models/models.json``.

torch is needed here only (``pip install '.[train]'``); the library and CI tests never import it.
One thread, deterministic seeds: a rerun on the same library versions gives the same weights.

Usage (from the repository root)::

    python scripts/make_transformers.py --out models
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import math
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as _exc:  # pragma: no cover - depends on the environment
    sys.exit(f"make_transformers.py: missing optional dependency '{_exc.name}'; install it with: pip install '.[train]'")

LOG = logging.getLogger("make_transformers")

PAD, CLS, VOCAB, MAX_LEN, MIN_CONTENT, MAX_CONTENT = 0, 1, 64, 24, 6, 22
CLASSES = 4
N_TEXT_TRAIN, N_TEXT_CALIB, N_TEXT_TEST = 8000, 256, 1000
PARITY_ATOL = 1e-4


# --------------------------------------------------------------------------- models


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V/O Linear layers.

    ``sdpa=False`` spells the attention out (BERT's MatMul / Div / Add mask / Softmax / MatMul);
    ``sdpa=True`` calls ``F.scaled_dot_product_attention`` (the dynamo exporter maps it to the
    opset-23 ``Attention`` op). Same parameters either way.
    """

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim, self.sdpa = dim, heads, dim // heads, sdpa
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """[b, s, dim] -> [b, heads, s, head_dim] (head count written as a literal)."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if bias is not None:
                scores = scores + bias
            ctx = torch.matmul(scores.softmax(dim=-1), v)
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        return self.out(ctx.view(ctx.shape[0], ctx.shape[1], self.dim))


class Block(nn.Module):
    """Transformer block: ``pre_ln`` (ViT) or post-LN (BERT: LayerNorm(x + sublayer(x)))."""

    def __init__(self, dim: int, heads: int, ffn: int, pre_ln: bool, sdpa: bool = False) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = SelfAttention(dim, heads, sdpa)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x), bias)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.ffn(x))


class ViT(nn.Module):
    """Patch embedding (Conv 8x8 stride 8), class token, learned positions, pre-LN blocks."""

    def __init__(self, dim: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2, patch: int = 8,
                 size: int = 32, classes: int = 10) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn, pre_ln=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the ONNX input is called "input"
        x = self.patch(input).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TextEncoder(nn.Module):
    """BERT-style classifier: token + position embeddings, LayerNorm, post-LN blocks, first-token head."""

    def __init__(self, dim: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2, vocab: int = VOCAB,
                 max_len: int = 32, classes: int = CLASSES, sdpa: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn, pre_ln=False, sdpa=sdpa) for _ in range(layers))
        self.head = nn.Linear(dim, classes)
        self.sdpa = sdpa

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.norm(self.tokens(input_ids) + self.positions(self.position_ids[:, :seq]))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        if self.sdpa:  # onnxruntime's opset-23 Attention kernel wants the mask's query axis spelled out
            bias = bias.expand(-1, -1, seq, -1)
        for block in self.blocks:
            x = block(x, bias)
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------- data


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` with fixed zip timestamps (byte-reproducible reruns)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, src.read(info.filename))
    path.write_bytes(out.getvalue())


def text_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` query-counting sequences padded to ``MAX_LEN``: ``input_ids``, ``attention_mask``, ``labels``.

    ``[CLS, q, x_1 .. x_m]`` with m in [MIN_CONTENT, MAX_CONTENT]; the x are distinct content tokens
    other than q, then ``label`` of them (0..3, balanced) are replaced by q.
    """
    rng = np.random.default_rng(seed)
    ids = np.full((n, MAX_LEN), PAD, np.int64)
    mask = np.zeros((n, MAX_LEN), np.int64)
    labels = (np.arange(n) % CLASSES).astype(np.int64)
    rng.shuffle(labels)
    for i in range(n):
        m = int(rng.integers(MIN_CONTENT, MAX_CONTENT + 1))
        q, *rest = (rng.permutation(VOCAB - 2) + 2)[: m + 1].tolist()
        for pos in rng.choice(m, size=int(labels[i]), replace=False):
            rest[pos] = q
        ids[i, : m + 2] = [CLS, q, *rest]
        mask[i, : m + 2] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def digits() -> dict[str, dict[str, np.ndarray]]:
    """The CNN fixtures' digits split: ``train`` rebuilt by make_models.prepare_data; calib/test from the npz files."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_models import prepare_data

    splits = prepare_data()
    return {"train": {"input": splits.train_x, "labels": splits.train_y},
            "fill": {"value": np.float32(-splits.mean / splits.std)}}


# -------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Spec:
    """How one model family is trained."""

    epochs: int
    lr: float
    seed: int
    batch: int = 64


def shift(x: torch.Tensor, gen: torch.Generator, fill: float, m: int = 2) -> torch.Tensor:
    """Translate each image by up to ``m`` pixels (border = normalized background)."""
    padded = F.pad(x, (m, m, m, m), value=fill)
    offsets = torch.randint(0, 2 * m + 1, (x.shape[0], 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(model: nn.Module, spec: Spec, feeds: dict[str, torch.Tensor], labels: torch.Tensor,
          augment=None) -> nn.Module:
    """AdamW with a one-cycle schedule; ``augment(batch_feeds, gen)`` may transform each batch."""
    gen = torch.Generator().manual_seed(spec.seed)
    n = len(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * -(-n // spec.batch))
    model.train()
    for epoch in range(spec.epochs):
        perm, total = torch.randperm(n, generator=gen), 0.0
        for start in range(0, n, spec.batch):
            idx = perm[start:start + spec.batch]
            batch = {k: v[idx] for k, v in feeds.items()}
            if augment is not None:
                batch = augment(batch, gen)
            loss = F.cross_entropy(model(**batch), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        LOG.info("  epoch %2d/%d  loss %.4f", epoch + 1, spec.epochs, total / n)
    return model.eval()


# --------------------------------------------------------------------------- export


def export(model: nn.Module, path: Path, args: tuple, names: list[str], dynamic: dict[str, dict[int, str]],
           dynamo: bool, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript (``dynamo=False``) or the dynamo exporter, dynamic axes, weights embedded."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = {n: {ax: torch.export.Dim(name, min=1, max=4096) for ax, name in dynamic[n].items()}
                      for n in names}
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=["logits"], dynamic_shapes=shapes, external_data=False,
                                        verbose=False)
            proto = program.model_proto
        else:
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["logits"], dynamic_axes={**dynamic, "logits": {0: "batch"}},
                              do_constant_folding=True)
            proto = onnx.load_from_string(buf.getvalue())
    proto.producer_version = torch.__version__.split("+")[0]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def ort_logits(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits from onnxruntime (CPU, one thread, graph optimizations off)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names})[0]


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Node counts by ``domain::op`` (``op`` for the default domain), sorted."""
    counts = collections.Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
                                 for n in proto.graph.node)
    return dict(sorted(counts.items()))


def entry(path: Path, proto: onnx.ModelProto, test: dict[str, np.ndarray], model: nn.Module | None,
          **info: object) -> dict[str, object]:
    """The ``models.json`` entry of one exported file: ORT accuracy on ``test``, torch parity, size, ops."""
    feeds = {k: v for k, v in test.items() if k != "labels"}
    logits = ort_logits(path, feeds)
    correct = int((logits.argmax(1) == test["labels"]).sum())
    if model is not None:
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        diff = float(np.abs(ref - logits).max())
        assert diff <= PARITY_ATOL * max(1.0, float(np.abs(ref).max())), f"{path.name}: ORT vs torch {diff}"
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return {"file": path.name, "accuracy": correct / len(test["labels"]), "correct": correct,
            "n_test": len(test["labels"]), "params": params, "size_bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "opset": {d.domain or "ai.onnx": d.version for d in proto.opset_import}, "ops": op_counts(proto), **info}


# --------------------------------------------------------------------------- driver


def build_vit(out: Path, spec: Spec) -> dict[str, dict[str, object]]:
    """Train the digits ViT and export it with both exporters."""
    data = digits()
    fill = float(data["fill"]["value"])
    with np.load(out / "digits_test.npz") as npz:
        test = {"input": npz["input"], "labels": npz["labels"]}
    torch.manual_seed(spec.seed)
    model = ViT()
    train(model, spec, {"input": torch.from_numpy(data["train"]["input"])}, torch.from_numpy(data["train"]["labels"]),
          augment=lambda b, gen: {"input": shift(b["input"], gen, fill)})
    summary = ("ViT: Conv 8x8/8 patch embedding (16 tokens) + class token + learned positions, dim 64, 2 pre-LN "
               "blocks (4 heads x 16, GELU MLP 128), final LayerNorm, class-token Linear(64->10)")
    common = {"task": "digits", "data": {"calib": "digits_calib.npz", "test": "digits_test.npz"},
              "inputs": {"input": ["batch", 1, 32, 32]}, "heads": 4, "hidden": 64, "layers": 2, "ffn": 128,
              "epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed, "summary": summary}
    entries = {}
    x0 = (torch.from_numpy(test["input"][:2]),)
    for key, dynamo, opset in (("vit_ts", False, 17), ("vit_dynamo", True, 18)):
        path = out / f"{key}.onnx"
        proto = export(model, path, x0, ["input"], {"input": {0: "batch"}}, dynamo, opset)
        entries[key] = entry(path, proto, {"input": test["input"], "labels": test["labels"]}, model,
                             exporter="dynamo" if dynamo else "torchscript", style="decomposed", **common)
    return entries


def build_text(out: Path, spec: Spec) -> dict[str, dict[str, object]]:
    """Train the text classifier; export it (both exporters), ORT-fuse it, export the opset-23 Attention form."""
    train_set, calib, test = text_data(N_TEXT_TRAIN, 10), text_data(N_TEXT_CALIB, 11), text_data(N_TEXT_TEST, 12)
    save_npz(out / "text_calib.npz", **calib)
    save_npz(out / "text_test.npz", **test)
    torch.manual_seed(spec.seed)
    model = TextEncoder()
    train(model, spec, {k: torch.from_numpy(train_set[k]) for k in ("input_ids", "attention_mask")},
          torch.from_numpy(train_set["labels"]))
    summary = ("BERT-style text classifier: token (64) + position (32) embeddings, LayerNorm, 2 post-LN blocks "
               "(4 heads x 16, additive -10000 mask, GELU FFN 128), first-token Linear(64->4); task: how many "
               "times (0-3) the query token (position 1) occurs again in the sequence")
    common = {"task": "query counting (synthetic, 4 classes)", "data": {"calib": "text_calib.npz", "test": "text_test.npz"},
              "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}, "heads": 4,
              "hidden": 64, "layers": 2, "ffn": 128, "epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed,
              "summary": summary}
    names, dyn = ["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "seq"},
                                                    "attention_mask": {0: "batch", 1: "seq"}}
    args = (torch.from_numpy(test["input_ids"][:2]), torch.from_numpy(test["attention_mask"][:2]))
    entries = {}
    for key, dynamo, opset in (("text_ts", False, 17), ("text_dynamo", True, 18)):
        path = out / f"{key}.onnx"
        proto = export(model, path, args, names, dyn, dynamo, opset)
        entries[key] = entry(path, proto, test, model, exporter="dynamo" if dynamo else "torchscript",
                             style="decomposed", **common)
    entries["text_ortfused"] = ort_fuse(out / "text_ts.onnx", out / "text_ortfused.onnx", test, common)
    sdpa = TextEncoder(sdpa=True)
    sdpa.load_state_dict(model.state_dict())
    sdpa.eval()
    path = out / "text_attn23.onnx"
    proto = export(sdpa, path, args, names, dyn, True, 23)
    entries["text_attn23"] = entry(path, proto, test, sdpa, exporter="dynamo", style="opset-23 Attention",
                                   **common)
    return entries


def ort_fuse(src: Path, dst: Path, test: dict[str, np.ndarray], common: dict) -> dict[str, object]:
    """onnxruntime.transformers.optimizer (model_type bert, python fusions only) on the TorchScript export."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    fused = optimize_model(str(src), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
    fused.save_model_to_file(str(dst))
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto, full_check=True)
    ref = ort_logits(src, {k: v for k, v in test.items() if k != "labels"})
    got = ort_logits(dst, {k: v for k, v in test.items() if k != "labels"})
    diff = float(np.abs(ref - got).max())
    assert diff <= 1e-3 * max(1.0, float(np.abs(ref).max())), f"{dst.name}: fused vs unfused {diff}"
    return entry(dst, proto, test, None, exporter="torchscript + onnxruntime.transformers.optimizer "
                 "(model_type=bert, num_heads=4, hidden_size=64, opt_level=0)", style="ORT-fused",
                 parity_vs_text_ts=diff, **common)


def main(argv: list[str] | None = None) -> int:
    """Build the requested families and merge their entries into ``models.json``'s ``transformers`` key."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--only", default="vit,text", help="comma-separated: vit,text")
    parser.add_argument("--epochs", type=int, default=0, help="override the epochs (smoke runs only)")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    built: dict[str, dict[str, object]] = {}
    for family in args.only.split(","):
        builder = {"vit": (build_vit, Spec(epochs=40, lr=2e-3, seed=21)),
                   "text": (build_text, Spec(epochs=20, lr=2e-3, seed=22))}[family]
        spec = builder[1] if not args.epochs else Spec(args.epochs, builder[1].lr, builder[1].seed)
        built.update(builder[0](args.out, spec))
    json_path = args.out / "models.json"
    manifest = json.loads(json_path.read_text()) if json_path.exists() else {}
    manifest["transformers"] = dict(sorted({**manifest.get("transformers", {}), **built}.items()))
    json_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for key, e in built.items():
        LOG.info("%s: accuracy %.4f  %d B  ops %s", key, e["accuracy"], e["size_bytes"], e["ops"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
