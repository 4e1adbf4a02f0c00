"""Running models: onnxruntime sessions, the data they run on, and what is measured while they run.

* :mod:`.session` — :func:`make_session`, the one way a session is created (CPU, optimizations
  off by default, models above the external-data threshold through a temporary folder).
* :mod:`.data` — calibration and validation sources (``.npz``, folders, images with
  preprocessing, random, iterables) and input checks; :mod:`.batching` — :class:`Batch` and
  re-cutting streams of them.
* :mod:`.capture` — run a model exposing intermediate tensors, batch by batch.
* :mod:`.bench` — interleaved latency rounds, paired ratios, machine and memory facts.
* :mod:`.progress` — one nested progress display on stderr.
* :mod:`.tasks` — task metrics vs a reference model (classification, detection, embedding,
  segmentation), streaming; :mod:`.detection` — YOLO-style decoding, NMS and box matching.
"""

from __future__ import annotations

from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource, open_source
from onnxcompress.runtime.preprocess import Preprocess
from onnxcompress.runtime.session import make_session

__all__ = ["Batch", "CalibSource", "Preprocess", "make_session", "open_source"]
