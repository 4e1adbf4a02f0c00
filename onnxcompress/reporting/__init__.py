"""What a person reads: terminal tables, Markdown/HTML reports and plots.

* :mod:`.display` — rich tables for ``optimize``, ``inspect``, ``compare``, ``passes``, ``bench``
  and ``sensitivity`` (plain text when stdout is not a terminal).
* :mod:`.report` — Markdown/HTML reports from the JSON the commands write.
* :mod:`.plots` — PNG plots (matplotlib, optional).
"""

from __future__ import annotations

__all__: list[str] = []
