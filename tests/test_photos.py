"""scripts/photos.py (real photos as inputs) and, where nudenet is installed, detection metrics on it."""

import importlib.util

import numpy as np
import pytest

from tests.helpers.runs import load_script

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

photos_script = load_script("photos")


def test_photos_shape_range_order_and_determinism():
    x = photos_script.photos((40, 56), count=14)
    assert x.shape == (14, 3, 40, 56) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert np.array_equal(x, photos_script.photos((40, 56), count=14))
    n = len(photos_script.photo_sources())
    assert n >= 8  # the first views are one per photo: all different
    firsts = x[:n].reshape(n, -1)
    assert len({row.tobytes() for row in firsts}) == n
    nhwc = photos_script.photos((40, 56), count=3, layout="NHWC")
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), x[:3])
    np.testing.assert_array_equal(photos_script.photos((40, 56), count=4, start=10), x[10:14])
    with pytest.raises(ValueError, match="views are available"):
        photos_script.photos(16, count=10_000)
    with pytest.raises(ValueError, match="views are available"):
        photos_script.photos(16, count=2, start=len(photos_script.VIEWS) * n - 1)


def test_random_crops_seeded_and_distinct_from_views():
    n = len(photos_script.photo_sources())
    x = photos_script.random_crops(24, per_photo=2, seed=5)
    assert x.shape == (2 * n, 3, 24, 24) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert np.array_equal(x, photos_script.random_crops(24, per_photo=2, seed=5))
    assert not np.array_equal(x, photos_script.random_crops(24, per_photo=2, seed=6))
    views = photos_script.photos(24, count=len(photos_script.VIEWS) * n).reshape(-1, 3 * 24 * 24)
    assert not {v.tobytes() for v in views} & {c.tobytes() for c in x.reshape(len(x), -1)}


def test_photos_cli_writes_npz(tmp_path, capsys):
    out = tmp_path / "p.npz"
    assert photos_script.main(["-o", str(out), "--size", "24x32", "--count", "5", "--input", "x"]) == 0
    with np.load(out) as data:
        assert data.files == ["x"] and data["x"].shape == (5, 3, 24, 32)
    with pytest.raises(SystemExit):
        photos_script.main(["-o", str(out), "--size", "big"])


def _nudenet_320n():
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nudenet is not installed")
    from pathlib import Path

    path = Path(spec.submodule_search_locations[0]) / "320n.onnx"
    if not path.exists():
        pytest.skip("nudenet has no 320n.onnx")
    return path


def test_nudenet_detection_inferred_and_agrees_with_itself(tmp_path):
    from onnxcompress import api

    model = _nudenet_320n()
    np.savez(tmp_path / "p.npz", images=photos_script.photos(320, count=6))
    rep = api.compare(model, model, tmp_path / "p.npz")
    (o,) = rep.outputs
    assert o.task is not None and o.task.task == "detection" and o.task.inferred
    assert o.task.values["f1"] == 1.0 and o.task.values["ref_detections"] > 0
    assert "detection for output 'output0' [N, 22, 2100]" in rep.task_note
