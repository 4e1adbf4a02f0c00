"""A small set of real photos as model inputs: the pictures that ship with scikit-image and scikit-learn.

Calibration and validation on random data say little; these photos (people, animals, objects,
scenes) are always at hand once ``scikit-image`` and ``scikit-learn`` are installed, with no
download. Each photo gives several views (the whole picture stretched, square crops from the
centre, left and right, a mirrored centre crop, a 2x zoom on the centre), taken view by view so
that any prefix of the set covers every photo. Pixels are RGB, scaled to [0, 1] (``/ 255``).

    python scripts/photos.py -o photos.npz                       # 32 x [3, 320, 320], key "images"
    python scripts/photos.py -o held_out.npz --start 32 --count 28   # other views, for validation
    python scripts/photos.py -o nsfw.npz --size 224 --count 24 --layout NHWC --input input

In Python: ``photos(size=320, count=32)`` returns the float32 array ``[count, 3, size, size]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["VIEWS", "photo_sources", "photos", "random_crops", "photo_calibration", "main"]

log = logging.getLogger("photos")


def photo_sources() -> dict[str, np.ndarray]:
    """The photos (name -> ``uint8 [H, W, 3]`` RGB) that need no download, skimage's first."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0], "camera": data.camera,
        "immunohistochemistry": data.immunohistochemistry, "colorwheel": data.colorwheel,
    }
    out = {}
    for name, load in loaders.items():
        try:
            img = np.asarray(load())
        except Exception as exc:  # a data file that needs pooch or a download: skip it
            log.info("skipping %s: %s", name, exc)
            continue
        out[name] = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images):
        out[Path(path).stem] = np.asarray(img)[..., :3]
    return out


def _square(img: np.ndarray, where: str, zoom: float = 1.0) -> np.ndarray:
    h, w = img.shape[:2]
    side = int(min(h, w) / zoom)
    top = (h - side) // 2
    left = {"left": 0, "right": w - side}.get(where, (w - side) // 2)
    return img[top:top + side, left:left + side]


#: The views taken of each photo, in order (name -> function of the ``[H, W, 3]`` image).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "whole": lambda img: img,
    "centre": lambda img: _square(img, "centre"),
    "left": lambda img: _square(img, "left"),
    "right": lambda img: _square(img, "right"),
    "mirrored": lambda img: _square(img, "centre")[:, ::-1],
    "zoom2": lambda img: _square(img, "centre", zoom=2.0),
}


def photos(size: int | tuple[int, int] = 320, count: int = 32, layout: str = "NCHW", start: int = 0) -> np.ndarray:
    """``count`` views of the photos from view ``start`` on, resized to ``size`` (an int or
    ``(H, W)``), float32 RGB in [0, 1], laid out ``NCHW`` (default) or ``NHWC``. Deterministic.

    Raises:
        ValueError: More views asked than available, or a bad layout.
    """
    from PIL import Image

    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout {layout!r}: expected NCHW or NHWC")
    h, w = (size, size) if isinstance(size, int) else size
    sources = photo_sources()
    views = [(name, view) for view in VIEWS for name in sources]
    if start < 0 or not 1 <= count <= len(views) - start:
        raise ValueError(f"start {start}, count {count}: {len(views)} views are available")
    batch = np.empty((count, h, w, 3), dtype=np.float32)
    for i, (name, view) in enumerate(views[start:start + count]):
        img = np.ascontiguousarray(VIEWS[view](sources[name]))
        batch[i] = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    return batch if layout == "NHWC" else np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def random_crops(size: int = 320, per_photo: int = 14, seed: int = 123) -> np.ndarray:
    """``per_photo`` seeded random square crops of every photo (side 35-100 % of the short side,
    mirrored half of the time), resized to ``size``: float32 RGB NCHW in [0, 1]. A larger held-out
    set than the fixed views, for metrics that need many detections."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for img in photo_sources().values():
        h, w = img.shape[:2]
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = np.ascontiguousarray(img[top:top + side, left:left + side])
            a = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
            out.append(a[:, ::-1] if rng.random() < 0.5 else a)
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


#: Seed of the random crops that extend a calibration set past the fixed views (the evaluation
#: crops of ``scripts/real_model_tasks.py`` use 123, ``scripts/diag_yolo_scores.py``'s second set 7).
CALIB_CROP_SEED = 99


def photo_calibration(size: int, count: int) -> tuple[np.ndarray, str]:
    """``count`` calibration images (NCHW) and what they are: the fixed views first, then seeded
    random crops (:data:`CALIB_CROP_SEED`) once the views run out."""
    n_photos = len(photo_sources())
    views = min(count, len(VIEWS) * n_photos)
    parts, note = [photos(size, views)], f"photos.py views 0..{views - 1} at {size}"
    if count > views:
        per_photo = -(-(count - views) // n_photos)
        parts.append(random_crops(size, per_photo=per_photo, seed=CALIB_CROP_SEED)[:count - views])
        note += f" + {count - views} random crops (seed {CALIB_CROP_SEED})"
    return np.concatenate(parts), note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="the .npz to write")
    ap.add_argument("--size", default="320", help="N or HxW (default 320)")
    ap.add_argument("--count", type=int, default=32, help="number of views (default 32)")
    ap.add_argument("--start", type=int, default=0, help="first view (default 0; e.g. a held-out set after --count)")
    ap.add_argument("--input", default="images", help="the model's input name: the key in the .npz (default images)")
    ap.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    args = ap.parse_args(argv)
    parts = args.size.lower().split("x")
    size = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) and all(p.isdigit() for p in parts) else None
    if size is None:
        ap.error(f"--size {args.size!r}: expected N or HxW")
    try:
        batch = photos(size, args.count, args.layout, args.start)
    except ValueError as exc:
        ap.error(str(exc))
    np.savez(args.output, **{args.input: batch})
    print(f"wrote {args.output}: {args.input} {list(batch.shape)} float32 in [0, 1]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
