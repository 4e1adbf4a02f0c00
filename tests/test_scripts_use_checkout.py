"""Scripts measure the onnxcompress they sit beside, not an installed copy.

README's quick start installs the project without ``-e``; a script run as ``python scripts/X.py``
then imports the installed package unless it puts its checkout first. Figures and fingerprints
(``check_outputs.py --compare``) taken that way silently describe other code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
_IMPORT = re.compile(r"^\s*(from onnxcompress[\s.]|import onnxcompress\b)")
_ROOT_FIRST = re.compile(r"sys\.path.*(ROOT\b|parents\[1\])")
_CHILD = '"-m", "onnxcompress"'
_CHILD_OK = re.compile(r"checkout_env|PYTHONPATH|cwd=(ROOT|CODE)\b")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_this_checkout(script):
    if '__name__ == "__main__"' not in script.read_text():
        pytest.skip("a module of other scripts (they set sys.path, e.g. replay_issue16.py --code)")
    lines = script.read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if _IMPORT.match(line)), None)
    if first is not None:
        assert any(_ROOT_FIRST.search(line) for line in lines[:first]), \
            f"{script.name}:{first + 1} imports onnxcompress before putting its checkout first on sys.path"
    text = "\n".join(lines)
    if _CHILD in text and script.name != "child_peak.py":  # child_peak runs what its caller gives it
        assert _CHILD_OK.search(text), f"{script.name} runs `python -m onnxcompress` without its checkout first"
