"""Image preprocessing specs: how an image file becomes a model input (size, resize, mean/std, scale,
layout, channel order), parsed from ``key=value`` text or a TOML file and checked against the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress.core.errors import InputError

__all__ = ["Preprocess", "parse_preprocess", "check_channels"]


@dataclass
class Preprocess:
    """How to turn an image file into a model input.

    Attributes:
        size: ``(height, width)``; default: the model input's static spatial dims.
        resize: ``stretch`` (to size) or ``crop`` (shorter side to size, then center crop).
        mean: Per-channel mean subtracted after scaling.
        std: Per-channel std divided by after subtracting the mean.
        scale: Pixel values are multiplied by this first (1/255 maps to [0, 1]).
        layout: ``NCHW`` or ``NHWC``.
        order: ``RGB``, ``BGR`` or ``L`` (grayscale).
    """

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str = "NCHW"
    order: str = "RGB"


def parse_preprocess(text: str | None) -> Preprocess:
    """Parse ``key=value,key=value`` (``size=224x224,mean=0.485/0.456/0.406,layout=NHWC``)
    or the path of a TOML file with the same keys.

    Raises:
        InputError: Unknown key or malformed value.
    """
    if not text:
        return Preprocess()
    if Path(text).is_file():
        from onnxcompress.core.fileio import read_toml

        return _preprocess_from(read_toml(Path(text)))
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--preprocess {item!r}: expected key=value")
        pairs[key.strip()] = value.strip()
    return _preprocess_from(pairs)


def _floats(value: Any) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return tuple(float(v) for v in str(value).split("/"))


def _preprocess_from(pairs: dict[str, Any]) -> Preprocess:
    pre = Preprocess()
    try:
        for key, value in pairs.items():
            if key == "size":
                parts = value if isinstance(value, (list, tuple)) else str(value).lower().split("x")
                h, w = (int(parts[0]), int(parts[-1]))
                pre.size = (h, w)
            elif key in ("mean", "std"):
                setattr(pre, key, _floats(value))
            elif key == "scale":
                pre.scale = float(value)
            elif key in ("layout", "order", "resize"):
                setattr(pre, key, str(value).upper() if key != "resize" else str(value).lower())
            else:
                raise InputError(f"preprocess: unknown key {key!r} (size, resize, mean, std, scale, layout, order)")
    except (ValueError, IndexError):
        raise InputError(f"preprocess: bad value in {pairs}") from None
    if pre.layout not in ("NCHW", "NHWC") or pre.order not in ("RGB", "BGR", "L") or pre.resize not in ("stretch", "crop"):
        raise InputError("preprocess: layout is NCHW|NHWC, order RGB|BGR|L, resize stretch|crop")
    _check_ranges(pre)
    return pre


def _check_ranges(pre: Preprocess) -> None:
    """Values that would give NaN, infinities or empty images are refused (one line)."""
    if pre.size is not None and min(pre.size) < 1:
        raise InputError(f"preprocess: size {pre.size[0]}x{pre.size[1]} must be positive")
    if not (math.isfinite(pre.scale) and pre.scale > 0):
        raise InputError(f"preprocess: scale={pre.scale} must be a positive number")
    if not all(math.isfinite(v) for v in pre.mean):
        raise InputError(f"preprocess: mean {'/'.join(map(str, pre.mean))} must be finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in pre.std):
        raise InputError(f"preprocess: std {'/'.join(map(str, pre.std))} must be positive numbers")


def check_channels(pre: Preprocess, model_channels: int | None, other_end: int | None = None) -> None:
    """Check ``mean``/``std`` against the image channels ``order`` gives (L: 1; RGB, BGR: 3, in
    that order) and those against the model input's channel dim (when static). ``other_end`` is
    the input's dim at the other layout's channel position: when it fits, the hint names the layout.

    Raises:
        InputError: One line naming the counts and how to fix them.
    """
    channels = 1 if pre.order == "L" else 3
    for key in ("mean", "std"):
        values = getattr(pre, key)
        if len(values) not in (1, channels):
            raise InputError(f"preprocess: {key} has {len(values)} values; order={pre.order} gives {channels} "
                             f"channel{'s' if channels > 1 else ''}: give 1 or {channels} (in {pre.order} order)")
    if model_channels is not None and model_channels != channels:
        other = "NHWC" if pre.layout == "NCHW" else "NCHW"
        hint = "order=L" if model_channels == 1 else "order=RGB or order=BGR" if model_channels == 3 else \
            f"layout={other} (the input's other end has {other_end})" if other_end in (1, 3) else "another model"
        raise InputError(f"the model's image input has {model_channels} channels, order={pre.order} gives "
                         f"{channels}: add --preprocess {hint}")
