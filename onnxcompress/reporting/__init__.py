"""What a person reads: terminal tables, Markdown/HTML reports and plots.

* :mod:`.display` — rich tables for ``optimize``, ``inspect``, ``compare``, ``passes``, ``bench``
  and ``sensitivity`` (plain text when stdout is not a terminal).
* :mod:`.report` — :func:`build_report`: Markdown/HTML reports from the JSON the commands write,
  with :mod:`.inputs` (loading and checking the JSON), :mod:`.chains` (runs linked into chains
  by the models' sha256, each traced to its true original), :mod:`.summary` and
  :mod:`.sections` (one function per section), :mod:`.document` (blocks rendered as Markdown or
  self-contained HTML), :mod:`.runs` (formatting), :mod:`.pareto` (accuracy vs latency).
* :mod:`.plots` — PNG plots (matplotlib, optional), for the report and ``sensitivity --plot``.
"""

from __future__ import annotations

__all__: list[str] = []
