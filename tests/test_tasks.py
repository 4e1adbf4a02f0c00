"""Task metrics (runtime/detection.py, runtime/tasks.py): YOLO decoding, NMS, matching, the other
tasks' metrics against hand computations, streaming == one-shot, and what ``auto`` infers."""

import numpy as np
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.runtime.detection import DetectionCounts, Detections, box_iou, decode, match, nms
from onnxcompress.runtime.tasks import TaskSpec, infer_task, start_task, task_note

# --- decoding --------------------------------------------------------------------------------------

#: Anchors (cx, cy, w, h, score class 0, score class 1) of a YOLOv8 head with 2 classes.
_ANCHORS = [
    (50, 50, 20, 20, 0.9, 0.1),   # kept
    (52, 50, 20, 20, 0.8, 0.0),   # same class, IoU ~0.82 with the first: suppressed
    (50, 50, 20, 20, 0.0, 0.7),   # same box, other class: kept
    (200, 100, 40, 10, 0.1, 0.2),  # below the confidence threshold
    (200, 100, 40, 10, 0.3, 0.0),  # kept
    (0, 0, 0, 0, 0.0, 0.0),
    (0, 0, 0, 0, 0.0, 0.0),
    (0, 0, 0, 0, 0.0, 0.0),
]


def _v8(anchors=_ANCHORS) -> np.ndarray:
    return np.asarray(anchors, dtype=np.float32).T[None]  # [1, 6, 8]


def test_decode_yolov8_boxes_scores_classes_nms():
    (d,) = decode(_v8())
    np.testing.assert_allclose(d.boxes, [[40, 40, 60, 60], [40, 40, 60, 60], [180, 95, 220, 105]])
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.3], rtol=1e-6)
    assert d.classes.tolist() == [0, 1, 0]
    assert decode(_v8(), conf=0.75)[0].scores.tolist() == pytest.approx([0.9])  # 0.8 still suppressed, 0.7 dropped
    assert len(decode(_v8(), iou=0.9)[0]) == 4  # IoU 0.82 is not above 0.9: both class-0 boxes stay


def test_decode_transposed_equals_features_first():
    a, b = decode(_v8())[0], decode(np.swapaxes(_v8(), 1, 2).copy(), layout="yolov8")[0]
    for field in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_decode_yolov5_objectness_multiplies_class_scores():
    rows = [(50, 50, 20, 20, 0.5, 0.9, 0.1),   # 0.45
            (150, 50, 20, 20, 0.3, 0.2, 0.9),  # 0.27, class 1
            (250, 50, 20, 20, 0.2, 1.0, 0.0),  # 0.2 < 0.25
            (50, 150, 20, 20, 1.0, 0.2, 0.1)]  # 0.2 < 0.25 though objectness is 1
    out = np.asarray(rows + [(0,) * 7] * 6, dtype=np.float32)[None]  # [1, 10, 7]: anchors first
    (d,) = decode(out)  # auto: anchors first -> objectness
    np.testing.assert_allclose(d.scores, [0.45, 0.27], rtol=1e-6)
    assert d.classes.tolist() == [0, 1]
    (t,) = decode(np.swapaxes(out, 1, 2).copy(), layout="yolov5")
    np.testing.assert_array_equal(t.scores, d.scores)
    assert len(decode(out, layout="yolov8")[0]) == 4  # read without objectness: column 4 is a class


def test_decode_refuses_what_is_not_a_head():
    with pytest.raises(InputError, match="not a yolov8 detection head"):
        decode(np.zeros((1, 10), np.float32), layout="yolov8")
    with pytest.raises(InputError):
        decode(np.zeros((1, 5, 20), np.float32), layout="yolov5")  # 5 features: no class after objectness


def test_decode_batch_and_max_det():
    out = np.concatenate([_v8(), _v8()[:, :, ::-1]])
    a, b = decode(out)
    assert len(a) == len(b) == 3 and np.array_equal(np.sort(a.scores), np.sort(b.scores))
    assert decode(out, max_det=2)[0].scores.tolist() == pytest.approx([0.9, 0.7])


# --- NMS and IoU -----------------------------------------------------------------------------------

def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [3, 3, 3, 3]], float)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0, 1, 0]])


def test_nms_suppresses_overlapping_same_class_keeps_other_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.6, 0.9, 0.8, 0.5])
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, classes, 0.45).tolist() == [1, 2, 3]
    assert nms(boxes, scores, np.zeros(4, int), 0.45).tolist() == [1, 3]  # class-agnostic: one of the three
    assert nms(boxes, scores, classes, 0.45, max_det=2).tolist() == [1, 2]
    tie = nms(boxes[:2], np.array([0.5, 0.5]), np.array([0, 0]), 0.45)
    assert tie.tolist() == [0]  # equal scores: the first anchor wins
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)).tolist() == []


# --- matching --------------------------------------------------------------------------------------

def _dets(boxes, classes=None, scores=None) -> Detections:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    n = len(boxes)
    return Detections(boxes, np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, n), float),
                      np.asarray(classes if classes is not None else [0] * n, int))


_BOXES = [[0, 0, 10, 10], [20, 20, 40, 40], [100, 100, 130, 110], [200, 0, 260, 50]]


def _counts(pairs) -> dict:
    c = DetectionCounts()
    for r, k in pairs:
        c.add(r, k)
    return c.metrics()


def test_match_identical_is_f1_one():
    m = _counts([(_dets(_BOXES), _dets(_BOXES))])
    assert (m["precision"], m["recall"], m["f1"], m["matched"], m["images_agree"]) == (1.0, 1.0, 1.0, 4, 1)


def test_match_one_dropped_box_costs_recall():
    n = len(_BOXES)
    m = _counts([(_dets(_BOXES), _dets(_BOXES[:2] + _BOXES[3:]))])
    assert m["recall"] == pytest.approx((n - 1) / n) and m["precision"] == 1.0
    assert m["f1"] == pytest.approx(2 * (n - 1) / (2 * n - 1)) and m["images_agree"] == 0


def test_match_box_shifted_below_iou_half_or_other_class_is_a_miss():
    n = len(_BOXES)
    shifted = [b[:] for b in _BOXES]
    shifted[1] = [30, 20, 50, 40]  # IoU with [20, 20, 40, 40]: 200 / 600 = 1/3
    m = _counts([(_dets(_BOXES), _dets(shifted))])
    assert m["matched"] == n - 1 and m["precision"] == m["recall"] == pytest.approx((n - 1) / n)
    nudged = [b[:] for b in _BOXES]
    nudged[1] = [22, 20, 42, 40]  # IoU 360 / 440 = 0.82: still a match
    assert _counts([(_dets(_BOXES), _dets(nudged))])["f1"] == 1.0
    assert match(_dets(_BOXES), _dets(_BOXES, classes=[0, 1, 0, 0])) == n - 1


def test_match_is_greedy_by_score_and_one_to_one():
    ref = _dets([[0, 0, 10, 10]])
    cand = _dets([[0, 0, 10, 9], [0, 0, 10, 10]], scores=[0.4, 0.9])  # the better-scored one takes it
    assert match(ref, cand) == 1
    assert _counts([(ref, cand)])["precision"] == 0.5


def test_empty_detections():
    empty = _dets([])
    both = _counts([(empty, empty)])
    assert (both["f1"], both["precision"], both["recall"], both["images_agree"]) == (1.0, 1.0, 1.0, 1)
    lost = _counts([(_dets(_BOXES), empty)])
    assert (lost["f1"], lost["precision"], lost["recall"]) == (0.0, 1.0, 0.0)
    spurious = _counts([(empty, _dets(_BOXES))])
    assert (spurious["f1"], spurious["precision"], spurious["recall"]) == (0.0, 0.0, 1.0)
    mixed = _counts([(empty, empty), (_dets(_BOXES), _dets(_BOXES))])  # an empty pair agrees, costs nothing
    assert mixed["f1"] == 1.0 and mixed["images_agree"] == 2 and mixed["images"] == 2


# --- accumulators: streaming == one-shot, values by hand ---------------------------------------------

def _run_task(task, ref, cand, splits=(None,), **spec):
    acc = start_task(ref, TaskSpec(task, **spec))
    assert acc is not None
    bounds = [0, *[s for s in splits if s is not None], len(ref)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.add(ref[a:b], cand[a:b])
    return acc.result()


def _yolo_outputs(n=9, seed=0, flip=0.15):
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(0, 300, (n, 2, 60)), rng.uniform(5, 60, (n, 2, 60))], axis=1)
    scores = rng.uniform(0, 0.5, (n, 3, 60)) ** 2 * 4 / 1.0
    scores = np.clip(scores, 0, 1)
    ref = np.concatenate([boxes, scores], 1).astype(np.float32)
    cand = ref.copy()
    cand[:, 4:] = np.clip(cand[:, 4:] + rng.normal(0, flip, cand[:, 4:].shape), 0, 1)
    return ref, cand


def test_detection_task_streaming_equals_one_shot_and_counts():
    ref, cand = _yolo_outputs()
    one = _run_task("detection", ref, cand)
    streamed = _run_task("detection", ref, cand, splits=(2, 3, 7))
    assert one == streamed and one.values["images"] == 9
    total = DetectionCounts()
    for r, c in zip(decode(ref), decode(cand)):
        total.add(r, c)
    assert one.values == total.metrics() and 0 < one.values["f1"] < 1
    assert _run_task("detection", ref, ref).values["f1"] == 1.0
    assert one.settings == {"conf": 0.25, "iou": 0.45, "match_iou": 0.5, "max_det": 300, "layout": "yolov8"}
    assert _run_task("detection", ref, cand, det_conf=0.9).values["ref_detections"] < one.values["ref_detections"]


def test_classification_top5_agreement():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((20, 12)).astype(np.float32)
    cand = ref + rng.normal(0, 1.0, ref.shape).astype(np.float32)
    rank = (-cand).argsort(1).argsort(1)[np.arange(20), ref.argmax(1)]  # candidate's rank of the ref top-1
    m = _run_task("classification", ref, cand, splits=(7,))
    assert m.values == {"top5_agreement": pytest.approx(float((rank < 5).mean()))}
    assert 0 < m.values["top5_agreement"] < 1 and "top-5 agreement" in m.summary()
    assert _run_task("classification", ref[:, :9], cand[:, :9]).values == {}  # C < 10: top-1 only


def test_segmentation_pixel_agreement_and_miou_by_hand():
    ref_map = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    cand_map = ref_map.copy()
    cand_map[0, 2] = 0  # one pixel of class 1 becomes 0
    ref, cand = (np.eye(3, dtype=np.float32)[m].transpose(2, 0, 1)[None].repeat(2, 0) for m in (ref_map, cand_map))
    m = _run_task("segmentation", ref, cand, splits=(1,))
    iou = [4 / 5, 3 / 4, 1.0]  # class 0: 4 common of 5; class 1: 3 of 4; class 2 intact
    assert m.values["pixel_agreement"] == pytest.approx(15 / 16)
    assert m.values["miou"] == pytest.approx(np.mean(iou)) and m.values["classes"] == 3
    assert m == _run_task("segmentation", ref, cand)


def test_embedding_cosine_and_nearest_neighbour_agreement():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((10, 16)).astype(np.float32)
    cand = ref.copy()
    cand[3] = -cand[3]  # one sample flipped: cosine -1, and its neighbours change
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    m = _run_task("embedding", ref, cand, splits=(4, 5))
    assert m.values["cosine_mean"] == pytest.approx(cos.mean()) and m.values["cosine_min"] == pytest.approx(-1.0)
    sim = lambda e: (lambda u: u @ u.T - 3 * np.eye(len(u)))(e / np.linalg.norm(e, axis=1, keepdims=True))  # noqa: E731
    expected = (sim(ref).argmax(1) == sim(cand).argmax(1)).mean()
    assert m.values["nn_agreement"] == pytest.approx(expected) and expected < 1
    assert m.values["nn_samples"] == 10 and m.values == pytest.approx(_run_task("embedding", ref, cand).values)
    same = _run_task("embedding", ref, ref.copy())
    assert same.values["nn_agreement"] == 1.0 and same.values["cosine_min"] == pytest.approx(1.0)
    assert _run_task("embedding", ref[:2], cand[:2]).values["nn_agreement"] is None  # 2 samples: no neighbour test


def test_embedding_spearman_of_pairwise_similarities_by_hand():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((12, 8)).astype(np.float32)
    cand = ref + 0.4 * rng.standard_normal(ref.shape).astype(np.float32)
    unit = lambda e: e / np.linalg.norm(e.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    iu = np.triu_indices(12, 1)
    expected = spearmanr((unit(ref) @ unit(ref).T)[iu], (unit(cand) @ unit(cand).T)[iu]).statistic
    m = _run_task("embedding", ref, cand, splits=(5,))
    assert m.values["spearman"] == pytest.approx(expected, abs=1e-5) and 0.3 < expected < 0.99
    assert _run_task("embedding", ref, ref * 2).values["spearman"] == pytest.approx(1.0)
    unrelated = _run_task("embedding", ref, rng.standard_normal(ref.shape).astype(np.float32)).values["spearman"]
    assert abs(unrelated) < 0.3  # the candidate's similarities no longer follow the reference's
    assert _run_task("embedding", ref[:2], cand[:2]).values["spearman"] is None
    assert "Spearman of pairwise similarities" in m.summary()


# --- auto inference, explicit tasks, settings --------------------------------------------------------

def test_auto_infers_yolov8_heads_classifiers_and_segmentation():
    head, _ = _yolo_outputs()
    assert infer_task(head) == "detection"
    assert infer_task(np.zeros((4, 10), np.float32)) == "classification"
    assert infer_task(np.zeros((2, 5, 8, 8), np.float32)) == "segmentation"


@pytest.mark.parametrize("case", ["transposed", "scores_above_1", "negative_width", "short", "pixel_free", "int",
                                  "one_class_column", "many_channels", "tiny_map", "flat"])
def test_auto_leaves_ambiguous_layouts_alone(case):
    head, _ = _yolo_outputs()
    arrays = {
        "transposed": np.swapaxes(head, 1, 2), "short": head[:, :, :20],
        "scores_above_1": np.concatenate([head[:, :4], head[:, 4:] * 3], 1),
        "negative_width": np.concatenate([head[:, :2], -head[:, 2:4], head[:, 4:]], 1),
        "pixel_free": np.concatenate([head[:, :4] / 1000, head[:, 4:]], 1),  # every value in [0, 1]
        "int": np.zeros((2, 10), np.int64), "one_class_column": np.zeros((4, 1), np.float32),
        "many_channels": np.zeros((2, 255, 20, 20), np.float32), "tiny_map": np.zeros((2, 4, 2, 2), np.float32),
        "flat": np.zeros((4,), np.float32),
    }
    assert infer_task(arrays[case]) is None


def test_explicit_tasks_apply_where_they_fit_and_say_so():
    head, _ = _yolo_outputs()
    spec = TaskSpec("detection")
    started = {"boxes": start_task(head, spec), "aux": start_task(np.zeros((9, 3), np.float32), spec)}
    assert started["aux"] is None and started["boxes"] is not None and not started["boxes"].inferred
    assert task_note(spec, started, {"boxes": "[N, 7, 60]", "aux": "[N, 3]"}) is None  # asked, not inferred
    with pytest.raises(InputError, match=r"--task segmentation: no output fits .*boxes \[N, 7, 60\]"):
        task_note(TaskSpec("segmentation"), {"boxes": None}, {"boxes": "[N, 7, 60]"})
    auto = TaskSpec()
    started = {"boxes": start_task(head, auto), "aux": start_task(np.zeros((9, 3, 4), np.float32), auto)}
    note = task_note(auto, started, {"boxes": "[N, 7, 60]", "aux": "[N, 3, 4]"})
    assert note == ("task inferred from the output layout: detection for output 'boxes' [N, 7, 60] "
                    "(override with --task NAME, or --task none)")
    assert start_task(head, TaskSpec("none")) is None
    assert task_note(auto, {"aux": None}, {"aux": "[N, 3, 4]"}) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "detect"}, "--task 'detect'"), ({"det_conf": 2.0}, "--det-conf 2.0: must be a number in"),
    ({"det_iou": -0.1}, "--det-iou"), ({"det_layout": "yolox"}, "--det-layout"), ({"det_max": 0}, "det_max"),
    ({"det_conf": True}, "--det-conf")])
def test_task_spec_refuses_bad_values(kwargs, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        TaskSpec(**kwargs)


def test_summaries_name_the_task_and_its_headline():
    ref, cand = _yolo_outputs()
    det = _run_task("detection", ref, cand)
    assert det.summary().startswith(f"detection F1 {det.values['f1']:.4f}, precision ")
    assert "yolov8, conf 0.25, IoU 0.45" in det.summary()
    seg = _run_task("segmentation", np.ones((1, 2, 4, 4), np.float32), np.ones((1, 2, 4, 4), np.float32))
    assert seg.summary() == "segmentation mIoU 1.0000, pixel agreement 1.0000 (1 classes present)"
    emb = _run_task("embedding", np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    assert emb.summary().startswith("embedding per-sample cosine mean 1.000000, min 1.000000; nearest-neighbour")
    auto = start_task(np.zeros((2, 12), np.float32), TaskSpec())
    auto.add(np.eye(2, 12, dtype=np.float32), np.eye(2, 12, dtype=np.float32))
    assert auto.result().summary() == "classification (inferred) top-5 agreement 1.0000"
