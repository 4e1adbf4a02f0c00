"""Detection agreement: decode YOLO-style heads, NMS, and match a candidate's detections to a reference's.

Layouts (one output of rank 3, per sample a table of anchors x features; the features axis is the
shorter of the last two, so ``[N, 4+nc, A]`` and its transpose ``[N, A, 4+nc]`` both work):

* ``yolov8`` (anchor-free: YOLOv8/v9/v10/11 exports): features ``cx, cy, w, h, s_1 .. s_nc``, the
  class scores already after the sigmoid, no objectness; a box's score is its best class score.
* ``yolov5`` (with objectness: YOLOv5/v7/YOLOX exports): features ``cx, cy, w, h, obj, s_1 .. s_nc``;
  a box's score is ``obj * s_c`` for its best class ``c``.
* ``auto``: ``yolov8`` when the features come first (``[N, 4+nc, A]``, how Ultralytics exports
  anchor-free heads), ``yolov5`` when the anchors come first (``[N, A, 5+nc]``).

Decoding: boxes ``(cx, cy, w, h)`` become corners ``(x1, y1, x2, y2)``; boxes whose score is below
``conf`` are dropped; class-aware greedy NMS (a box suppresses lower-scored boxes of its class that
overlap it with IoU > ``iou``; ties broken by anchor index, so the result is deterministic); at most
``max_det`` boxes are kept, best first. Coordinates may be pixels or normalised: IoU does not care.

Matching (:func:`match`): the reference's detections are the ground truth. Candidate boxes, best
score first, each take the unmatched reference box of the same class with the highest IoU, if that
IoU is >= ``match_iou`` (0.5). Over a data set the counts add up (micro average):
``precision = matched / candidate boxes``, ``recall = matched / reference boxes``,
``F1 = 2 * matched / (reference boxes + candidate boxes)``. Zero boxes: a ratio with a zero
denominator is 1.0 (precision with no candidate box: no false detection; recall with no reference
box: nothing missed), so two models that both detect nothing agree fully (F1 1.0), and F1 is 0.0
when exactly one of them detects something. ``images_agree`` counts the samples whose detections
match one to one (both empty included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcompress.core.errors import InputError

__all__ = ["DET_LAYOUTS", "Detections", "DetectionCounts", "box_iou", "decode", "detection_layout", "match", "nms",
           "xywh_to_xyxy"]

#: ``--det-layout`` values (see the module docstring).
DET_LAYOUTS = ("auto", "yolov8", "yolov5")
#: Boxes above the confidence threshold that enter NMS, per sample (the best-scored ones).
MAX_NMS_CANDIDATES = 30000


@dataclass
class Detections:
    """The detections of one sample, best score first: ``boxes [k, 4]`` (x1, y1, x2, y2),
    ``scores [k]``, ``classes [k]``."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def detection_layout(shape: tuple[int, ...], layout: str = "auto") -> tuple[bool, bool] | None:
    """``(features_first, objectness)`` for an output of this shape, or ``None`` when it cannot be
    a detection head of ``layout`` (rank 3, enough features: 5 without, 6 with objectness)."""
    if len(shape) != 3:
        return None
    features_first = shape[1] <= shape[2]
    features = min(shape[1], shape[2])
    objectness = layout == "yolov5" or (layout == "auto" and not features_first)
    return (features_first, objectness) if features >= (6 if objectness else 5) else None


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(cx, cy, w, h)`` rows to ``(x1, y1, x2, y2)`` rows (float64)."""
    b = np.asarray(boxes, dtype=np.float64)
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of corner boxes (0 where both areas are 0)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = 0.45,
        max_det: int = 300) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, best score first (stable: equal scores keep index order)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(scores), dtype=bool)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        if len(keep) >= max_det:
            break
        rest = order[pos + 1:]
        rest = rest[~suppressed[rest] & (classes[rest] == classes[i])]
        if len(rest):
            suppressed[rest[box_iou(boxes[i:i + 1], boxes[rest])[0] > iou]] = True
    return np.asarray(keep, dtype=np.int64)


def decode(output: np.ndarray, layout: str = "auto", conf: float = 0.25, iou: float = 0.45,
           max_det: int = 300) -> list[Detections]:
    """Each sample's detections from a YOLO-style output ``[N, 4+nc, A]``/``[N, A, 4+nc]`` (or
    ``5+nc`` with objectness); see the module docstring.

    Raises:
        InputError: The output cannot be a head of ``layout``.
    """
    kind = detection_layout(output.shape, layout)
    if kind is None:
        raise InputError(f"an output of shape {list(output.shape)} is not a {layout} detection head "
                         "(rank 3, [N, 4+nc, A] or [N, A, 4+nc]; 5+nc features with objectness)")
    features_first, objectness = kind
    table = np.swapaxes(output, 1, 2) if features_first else output
    return [_decode_one(np.asarray(t, dtype=np.float64), objectness, conf, iou, max_det) for t in table]


def _decode_one(table: np.ndarray, objectness: bool, conf: float, iou: float, max_det: int) -> Detections:
    """One sample: ``table [A, 4(+1)+nc]``."""
    cls_scores = table[:, 5:] * table[:, 4:5] if objectness else table[:, 4:]
    classes = cls_scores.argmax(axis=1)
    scores = cls_scores[np.arange(len(table)), classes]
    idx = np.flatnonzero(scores > conf)
    if len(idx) > MAX_NMS_CANDIDATES:
        idx = np.sort(idx[np.argsort(-scores[idx], kind="stable")[:MAX_NMS_CANDIDATES]])
    boxes = xywh_to_xyxy(table[idx, :4])
    keep = nms(boxes, scores[idx], classes[idx], iou, max_det)
    return Detections(boxes[keep], scores[idx][keep], classes[idx][keep])


def match(ref: Detections, cand: Detections, iou: float = 0.5) -> int:
    """How many of ``cand``'s boxes match one of ``ref``'s (same class, IoU >= ``iou``), greedily
    best candidate score first, each reference box matched at most once."""
    if not len(ref) or not len(cand):
        return 0
    overlap = box_iou(cand.boxes, ref.boxes)
    overlap[cand.classes[:, None] != ref.classes[None, :]] = -1.0
    taken = np.zeros(len(ref), dtype=bool)
    matched = 0
    for i in np.argsort(-cand.scores, kind="stable"):
        row = np.where(taken, -1.0, overlap[i])
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            matched += 1
    return matched


@dataclass
class DetectionCounts:
    """Running detection counts over samples; :meth:`add` one sample's reference and candidate."""

    samples: int = 0
    ref_boxes: int = 0
    cand_boxes: int = 0
    matched: int = 0
    images_agree: int = 0

    def add(self, ref: Detections, cand: Detections, iou: float = 0.5) -> None:
        m = match(ref, cand, iou)
        self.samples += 1
        self.ref_boxes += len(ref)
        self.cand_boxes += len(cand)
        self.matched += m
        self.images_agree += int(m == len(ref) == len(cand))

    def metrics(self) -> dict[str, float | int]:
        """precision, recall, F1 and the counts (see the module docstring for zero boxes)."""
        both = self.ref_boxes + self.cand_boxes
        return {
            "precision": self.matched / self.cand_boxes if self.cand_boxes else 1.0,
            "recall": self.matched / self.ref_boxes if self.ref_boxes else 1.0,
            "f1": 2 * self.matched / both if both else 1.0,
            "ref_detections": self.ref_boxes, "cand_detections": self.cand_boxes, "matched": self.matched,
            "images_agree": self.images_agree, "images": self.samples,
        }
