"""Task metrics: does the candidate still do the reference's job, not only produce close numbers?

Numerical agreement (cosine, SQNR) can look fine while the task fails: a YOLO head mixes box
coordinates (0-320) with class scores (0-1), so an int8 model can keep cosine 0.9997 while a fifth
of its detections change. Per output, one task is evaluated against the reference model's outputs
(the reference is the ground truth), with running counts only (batch by batch):

* ``classification`` (``[N, C]``, C > 1): top-1 agreement is measured for every such output by
  the validation itself; this adds ``top5_agreement`` when C >= 10: the fraction of samples whose
  reference top-1 class is among the candidate's 5 best.
* ``detection`` (YOLO-style heads, :mod:`onnxcompress.runtime.detection`): both outputs decoded
  (confidence threshold, class-aware NMS), the candidate's boxes matched to the reference's (same
  class, IoU >= 0.5): precision, recall, F1 and the counts.
* ``embedding`` (any float output of rank >= 2, flattened per sample): per-sample cosine (mean,
  min); over the first :data:`EMB_NN_MAX` samples (their embeddings are the only outputs kept; at
  least 3 samples are needed) nearest-neighbour agreement, the fraction of samples whose nearest
  other sample (cosine) is the same in both models, and ``spearman``, the Spearman rank correlation
  of the pairwise cosine similarities of the candidate with the reference's (does the candidate
  still rank pairs of samples the same way: what a retrieval or similarity search sees). Samples
  whose flattened size differs from the first one's (a rank-3 output over variable sequence
  lengths) count in the cosines but are not kept for the pairwise measures.
* ``segmentation`` (``[N, C, H, W]``, C > 1): agreement of the per-pixel argmax, and mean IoU of
  the argmax maps over the classes present in either (from a running confusion matrix).

``auto`` (the default) infers a task only when the layout of the reference's first batch leaves no
doubt: ``[N, C]`` float with C > 1 is classification; a rank-3 output ``[N, F, A]`` with
A >= :data:`AUTO_DET_RATIO` x F, F >= 5, rows 0-3 box-like (non-negative width and height, some
value above 1) and every other row in [0, 1] is a YOLOv8-style detection head; ``[N, C, H, W]``
with 2 <= C <= :data:`AUTO_SEG_MAX_CLASSES` and H, W >= 4 is segmentation. Embedding is never
inferred. Anchors-first heads (``[N, A, K]``) are left alone: they may have objectness or not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from onnxcompress.core.errors import InputError
from onnxcompress.runtime.detection import DET_LAYOUTS, DetectionCounts, decode, detection_layout

__all__ = ["AUTO_DET_RATIO", "AUTO_SEG_MAX_CLASSES", "EMB_NN_MAX", "TASKS", "TaskMetrics", "TaskSpec",
           "TaskAccumulator", "check_output_ranks", "infer_task", "start_task", "task_note"]

#: ``--task`` values.
TASKS = ("auto", "none", "classification", "detection", "embedding", "segmentation")
#: ``auto`` sees a ``[N, F, A]`` detection head only when A is at least this many times F.
AUTO_DET_RATIO = 4
#: ``auto`` sees segmentation only up to this many classes.
AUTO_SEG_MAX_CLASSES = 64
#: Embeddings kept for nearest-neighbour agreement (the first samples; also capped at 64 MiB).
EMB_NN_MAX = 1024
_EMB_NN_BYTES = 64 << 20

#: What each explicit task needs of an output.
_NEEDS = {
    "classification": "a float output [N, C] with C > 1",
    "detection": "a float output [N, 4+nc, A] or [N, A, 4+nc] (5+nc with objectness)",
    "embedding": "a float output of rank >= 2",
    "segmentation": "a float output [N, C, H, W] with C > 1",
}


@dataclass(frozen=True)
class TaskSpec:
    """Which task to evaluate and the detection settings (checked on creation).

    Attributes:
        task: One of :data:`TASKS`.
        det_conf: Detection confidence threshold (0..1).
        det_iou: NMS IoU threshold (0..1).
        det_layout: ``auto``, ``yolov8`` (no objectness) or ``yolov5`` (objectness).
        det_max: Detections kept per sample after NMS.
        match_iou: IoU for a candidate box to match a reference box.
    """

    task: str = "auto"
    det_conf: float = 0.25
    det_iou: float = 0.45
    det_layout: str = "auto"
    det_max: int = 300
    match_iou: float = 0.5

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.det_layout not in DET_LAYOUTS:
            raise InputError(f"--det-layout {self.det_layout!r}: expected one of {', '.join(DET_LAYOUTS)}")
        for name in ("det_conf", "det_iou", "match_iou"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: must be a number in [0, 1]")
        if isinstance(self.det_max, bool) or not isinstance(self.det_max, int) or self.det_max < 1:
            raise InputError(f"det_max {self.det_max!r}: must be an integer >= 1")

    @classmethod
    def of(cls, value: str | TaskSpec | None) -> TaskSpec:
        """``value`` as a spec (a task name, a spec, or ``None`` for ``auto``)."""
        return value if isinstance(value, TaskSpec) else cls(value or "auto")


@dataclass
class TaskMetrics:
    """One output's task metrics: the task, whether ``auto`` inferred it, its settings and values."""

    task: str
    inferred: bool
    settings: dict[str, object] = field(default_factory=dict)
    values: dict[str, float | int | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. ``detection (inferred) F1 0.7812, precision 0.8000, recall 0.7600; ...``."""
        v = self.values
        head = f"{self.task}{' (inferred)' if self.inferred else ''}"
        if self.task == "detection":
            return (f"{head} F1 {v['f1']:.4f}, precision {v['precision']:.4f}, recall {v['recall']:.4f}; "
                    f"boxes {v['ref_detections']} → {v['cand_detections']} ({v['matched']} matched), "
                    f"{v['images_agree']}/{v['images']} images agree; {self.settings['layout']}, "
                    f"conf {self.settings['conf']}, IoU {self.settings['iou']}")
        if self.task == "segmentation":
            return (f"{head} mIoU {v['miou']:.4f}, pixel agreement {v['pixel_agreement']:.4f} "
                    f"({v['classes']} classes present)")
        if self.task == "embedding":
            nn = "-" if v["nn_agreement"] is None else f"{v['nn_agreement']:.4f} over {v['nn_samples']} samples"
            rho = "-" if v.get("spearman") is None else f"{v['spearman']:.4f}"
            return (f"{head} per-sample cosine mean {v['cosine_mean']:.6f}, min {v['cosine_min']:.6f}; "
                    f"nearest-neighbour agreement {nn}; Spearman of pairwise similarities {rho}")
        top5 = v.get("top5_agreement")
        return f"{head} " + ("top-1 agreement in the table" if top5 is None else f"top-5 agreement {top5:.4f}")


class TaskAccumulator:
    """Running task metrics for one output: :meth:`add` each batch, then :meth:`result`."""

    task = ""

    def __init__(self, inferred: bool, spec: TaskSpec):
        self.inferred, self.spec = inferred, spec

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        raise NotImplementedError

    def values(self) -> dict[str, float | int | None]:
        raise NotImplementedError

    def settings(self) -> dict[str, object]:
        return {}

    def result(self) -> TaskMetrics:
        return TaskMetrics(self.task, self.inferred, self.settings(), self.values())


class _Classification(TaskAccumulator):
    task = "classification"

    def __init__(self, inferred: bool, spec: TaskSpec):
        super().__init__(inferred, spec)
        self.n = self.top5 = 0
        self.classes = 0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.classes = ref.shape[1]
        if self.classes < 10:
            return
        best5 = np.argpartition(-cand, 4, axis=1)[:, :5]
        self.top5 += int((best5 == ref.argmax(1)[:, None]).any(1).sum())
        self.n += len(ref)

    def values(self) -> dict[str, float | int | None]:
        return {"top5_agreement": self.top5 / self.n} if self.n else {}


class _Detection(TaskAccumulator):
    task = "detection"

    def __init__(self, inferred: bool, spec: TaskSpec):
        super().__init__(inferred, spec)
        self.counts = DetectionCounts()
        self.layout = ""

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        s = self.spec
        self.layout = "yolov5" if (detection_layout(ref.shape, s.det_layout) or (True, False))[1] else "yolov8"
        for r, c in zip(decode(ref, s.det_layout, s.det_conf, s.det_iou, s.det_max),
                        decode(cand, s.det_layout, s.det_conf, s.det_iou, s.det_max)):
            self.counts.add(r, c, s.match_iou)

    def settings(self) -> dict[str, object]:
        s = self.spec
        return {"conf": s.det_conf, "iou": s.det_iou, "match_iou": s.match_iou, "max_det": s.det_max,
                "layout": self.layout}

    def values(self) -> dict[str, float | int | None]:
        return dict(self.counts.metrics())


class _Embedding(TaskAccumulator):
    task = "embedding"

    def __init__(self, inferred: bool, spec: TaskSpec):
        super().__init__(inferred, spec)
        self.n, self.cos_sum, self.cos_min = 0, 0.0, math.inf
        self.kept_ref: list[np.ndarray] = []
        self.kept_cand: list[np.ndarray] = []
        self.keep = EMB_NN_MAX
        self.width: int | None = None  # the flattened size of the kept samples

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = ref.reshape(len(ref), -1).astype(np.float64)
        c = cand.reshape(len(cand), -1).astype(np.float64)
        rn, cn = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        dot = np.einsum("ij,ij->i", r, c)
        denom = rn * cn
        cos = np.divide(dot, denom, out=np.where(rn == cn, 1.0, 0.0), where=denom > 0)
        self.n += len(r)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min(initial=math.inf)))
        self.width = r.shape[1] if self.width is None else self.width
        if r.shape[1] != self.width:
            return
        self.keep = min(self.keep, max(3, _EMB_NN_BYTES // max(8 * r.shape[1], 1)))
        room = self.keep - sum(len(k) for k in self.kept_ref)
        if room > 0:
            self.kept_ref.append(_unit(r[:room]))
            self.kept_cand.append(_unit(c[:room]))

    def values(self) -> dict[str, float | int | None]:
        kept = sum(len(k) for k in self.kept_ref)
        nn = rho = None
        if kept >= 3:
            ref, cand = np.concatenate(self.kept_ref), np.concatenate(self.kept_cand)
            nn = float((_nearest(ref) == _nearest(cand)).mean())
            rho = _pairwise_spearman(ref, cand)
        return {"cosine_mean": self.cos_sum / self.n if self.n else 1.0,
                "cosine_min": self.cos_min if self.n else 1.0, "nn_agreement": nn, "spearman": rho,
                "nn_samples": kept}


def _pairwise_spearman(ref: np.ndarray, cand: np.ndarray) -> float | None:
    """Spearman correlation of the pairwise cosine similarities (rows are unit vectors), or ``None``
    when either set of similarities is constant (no ranking to compare)."""
    from scipy.stats import spearmanr

    upper = np.triu_indices(len(ref), 1)
    a = (ref.astype(np.float64) @ ref.T.astype(np.float64))[upper]
    b = (cand.astype(np.float64) @ cand.T.astype(np.float64))[upper]
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else None
    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _nearest(units: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine; first index on ties)."""
    sim = units.astype(np.float64) @ units.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


class _Segmentation(TaskAccumulator):
    task = "segmentation"

    def __init__(self, inferred: bool, spec: TaskSpec):
        super().__init__(inferred, spec)
        self.confusion: np.ndarray | None = None

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        classes = ref.shape[1]
        if self.confusion is None or len(self.confusion) != classes:
            if self.confusion is not None:
                raise InputError(f"segmentation: the number of classes changed between batches "
                                 f"({len(self.confusion)} -> {classes})")
            self.confusion = np.zeros((classes, classes), dtype=np.int64)
        r, c = ref.argmax(1).ravel(), cand.argmax(1).ravel()
        self.confusion += np.bincount(r * classes + c, minlength=classes * classes).reshape(classes, classes)

    def values(self) -> dict[str, float | int | None]:
        cm = self.confusion if self.confusion is not None else np.zeros((1, 1), dtype=np.int64)
        inter = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        total = cm.sum()
        return {"pixel_agreement": float(inter.sum() / total) if total else 1.0,
                "miou": float((inter[present] / union[present]).mean()) if present.any() else 1.0,
                "classes": int(present.sum())}


_KINDS: dict[str, type[TaskAccumulator]] = {
    k.task: k for k in (_Classification, _Detection, _Embedding, _Segmentation)}


#: The output ranks each explicit task can use.
_RANKS = {"classification": (2, 2), "detection": (3, 3), "segmentation": (4, 4), "embedding": (2, 99)}


def check_output_ranks(spec: TaskSpec, ranks: dict[str, int | None]) -> None:
    """Refuse an explicit task early (before any pass runs) when the declared output ranks rule out
    every output: ``ranks`` maps each output to its rank, ``None`` when unknown, 0 when not float.

    Raises:
        InputError: As :func:`task_note` would later.
    """
    if spec.task in ("auto", "none") or not ranks:
        return
    lo, hi = _RANKS[spec.task]
    if any(r is None or lo <= r <= hi for r in ranks.values()):
        return
    outs = ", ".join(f"{n} (rank {r})" if r else f"{n} (not float)" for n, r in ranks.items())
    raise InputError(f"--task {spec.task}: no output fits (needs {_NEEDS[spec.task]}); outputs: {outs}")


def _fits(task: str, ref: np.ndarray, spec: TaskSpec) -> bool:
    lo, hi = _RANKS[task]
    if ref.dtype.kind != "f" or not lo <= ref.ndim <= hi:
        return False
    if task == "classification":
        return ref.ndim == 2 and ref.shape[1] > 1
    if task == "detection":
        return detection_layout(ref.shape, spec.det_layout) is not None
    if task == "segmentation":
        return ref.ndim == 4 and ref.shape[1] > 1
    return ref.ndim >= 2


def infer_task(ref: np.ndarray) -> str | None:
    """The task ``auto`` sees in a reference batch's layout, or ``None`` (see the module docstring)."""
    if ref.dtype.kind != "f" or not ref.size:
        return None
    if ref.ndim == 2 and ref.shape[1] > 1:
        return "classification"
    if ref.ndim == 3 and _looks_like_yolov8(ref):
        return "detection"
    if ref.ndim == 4 and 2 <= ref.shape[1] <= AUTO_SEG_MAX_CLASSES and min(ref.shape[2:]) >= 4:
        return "segmentation"
    return None


def _looks_like_yolov8(ref: np.ndarray) -> bool:
    """``[N, 4+nc, A]``: A >> 4+nc, box rows with w, h >= 0 and some value > 1, score rows in [0, 1]."""
    features, anchors = ref.shape[1], ref.shape[2]
    if features < 5 or anchors < AUTO_DET_RATIO * features:
        return False
    boxes, scores = ref[:, :4], ref[:, 4:]
    return bool(np.isfinite(boxes).all() and (boxes[:, 2:] >= 0).all() and boxes.max() > 1.0
                and scores.min() >= 0.0 and scores.max() <= 1.0)


def start_task(ref: np.ndarray, spec: TaskSpec) -> TaskAccumulator | None:
    """The accumulator for an output given its reference's first batch, or ``None`` (``none``,
    nothing inferred, or an explicit task that does not fit this output)."""
    if spec.task == "none":
        return None
    if spec.task == "auto":
        task = infer_task(ref)
        return _KINDS[task](True, spec) if task else None
    return _KINDS[spec.task](False, spec) if _fits(spec.task, ref, spec) else None


def task_note(spec: TaskSpec, started: dict[str, TaskAccumulator | None], shapes: dict[str, str]) -> str | None:
    """The one line saying which task ``auto`` inferred for which output and how to override it
    (``None`` when nothing was inferred).

    Raises:
        InputError: An explicit task fits no output.
    """
    if spec.task not in ("auto", "none") and not any(started.values()):
        outs = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise InputError(f"--task {spec.task}: no output fits (needs {_NEEDS[spec.task]}); outputs: {outs}")
    if spec.task != "auto" or not any(started.values()):
        return None
    found = ", ".join(f"{a.task} for output {n!r} {shapes[n]}" for n, a in started.items() if a is not None)
    return f"task inferred from the output layout: {found} (override with --task NAME, or --task none)"
