"""The offline task data and metrics of ``scripts/task_data.py`` and ``scripts/real_model_tasks.py``.

No real model is needed: the builders are deterministic and shaped as the models expect, and the
metric helpers (CTC decoding, DB boxes, YOLOX decoding, agreement scores) give known answers on
hand-made outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.runs import load_script

td = load_script("task_data")
rt = load_script("real_model_tasks")

pytestmark = pytest.mark.skipif(not td.FONT_DIR.is_dir(), reason=f"no fonts in {td.FONT_DIR}")


def test_builders_are_deterministic_and_shaped():
    a, b = td.cls_dataset(4, 7), td.cls_dataset(4, 7)
    assert a["x"].shape == (4, 3, 48, 192) and np.array_equal(a["x"], b["x"])
    assert list(a["labels"]) == [0, 1, 0, 1]
    x, texts = td.rec_dataset(3, 1)
    assert x.shape == (3, 3, 48, 320) and len(texts) == 3 and all(texts)
    assert not np.array_equal(x, td.rec_dataset(3, 2)[0])
    imgs, boxes = td.pages(2, 3, 160)
    assert imgs.shape == (2, 160, 160, 3) and imgs.dtype == np.uint8
    assert all(len(b) >= 1 and (b[:, 2] > b[:, 0]).all() and (b[:, 3] <= 160).all() for b in boxes)
    caps, words = td.captcha_dataset(3, 0)
    assert caps.shape == (3, 1, 1, 64, 160) and caps.min() >= 0 and caps.max() <= 1
    assert all(4 <= len(w) <= 6 and set(w) <= set(td.CAPTCHA_CHARS) for w in words)
    feeds = td.feeds("input1", caps)
    assert len(feeds) == 3 and feeds[0]["input1"].shape == (1, 1, 64, 160)
    assert td.feeds("x", x)[0]["x"].shape == (1, 3, 48, 320)


def test_ctc_decoding_collapses_repeats_and_drops_blank():
    charset = ["", "a", "b", "c"]
    assert rt.ctc_text(np.array([0, 1, 1, 0, 1, 2, 2, 0, 3]), charset) == "aabc"
    assert rt.ctc_text(np.array([0, 0]), charset) == ""
    logits = np.zeros((4, 1, 4), np.float32)
    logits[[0, 1, 2, 3], 0, [2, 2, 0, 3]] = 5
    assert rt.ctc_text(rt._ids(logits), charset) == "bc"


def test_db_boxes_find_each_blob_and_skip_weak_ones():
    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 5:40] = 0.9  # a strong line
    prob[40:50, 5:40] = 0.4  # above thresh, mean below box_thresh
    boxes = rt.db_boxes(prob)
    assert boxes.shape == (1, 4)
    d = 10 * 35 * 1.5 / (2 * 45)
    np.testing.assert_allclose(boxes[0], [5 - d, 10 - d, 40 + d, 20 + d])
    score = rt.det_f1([np.array([[5 - d, 10 - d, 40 + d, 20 + d]]), np.zeros((0, 4))])  # DB maps are shrunk text
    assert score([], [[prob[None, None]], [np.zeros((1, 1, 64, 64))]]) == pytest.approx(1.0)
    assert score([], [[np.zeros((1, 1, 64, 64))], [np.zeros((1, 1, 64, 64))]]) == 0.0


def test_yolox_decode_places_a_box_on_its_grid_cell():
    out = np.full((1, 3549, 6), -10.0, np.float32)
    out[..., 2:] = 0.0  # objectness and class score 0 (they come after a sigmoid)
    cell = 52 * 3 + 4  # stride 8: row 3, column 4
    out[0, cell] = [0.5, 0.5, np.log(4.0), np.log(2.0), 10.0, 10.0]
    (det,) = rt.yolox_decode(out)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0], [36 - 16, 28 - 8, 36 + 16, 28 + 8], atol=1e-3)


def test_agreement_scores():
    ref = [[np.array([[0.9, 0.1]])], [np.array([[0.2, 0.8]])]]
    got = [[np.array([[0.6, 0.4]])], [np.array([[0.7, 0.3]])]]
    assert rt.top1_agreement(ref, ref) == 1.0 and rt.top1_agreement(ref, got) == 0.5
    iou = rt.mask_iou(lambda o: o[0] > 0.5)
    assert iou(ref, ref) == 1.0 and iou(ref, got) == pytest.approx(1 / 3)
    acc = rt.label_accuracy([0, 1], lambda o: int(np.argmax(o[0])))
    assert acc(None, ref) == 1.0 and acc(None, got) == 0.5
