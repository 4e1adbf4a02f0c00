"""scripts/child_peak.py: a child's peak resident memory, not the benchmark parent's.

On Linux a child started from a process that once held a lot of memory reports (``os.wait4``'s
``ru_maxrss``) at least that much: fork copies the parent's high-water mark and exec keeps it. The
relay measures the command's own peak."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.runs import load_script

child_peak = load_script("child_peak")

MB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited high-water mark is Linux's")
def test_the_peak_is_the_commands_own_not_the_parents():
    held = np.ones(400 * MB // 8)  # the parent's peak: 400 MB touched, then freed
    del held
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    assert usage.ru_maxrss * 1024 > 400 * MB  # the artefact: a bare interpreter "peaks" at the parent's mark
    rc, _, peak = child_peak.run([sys.executable, "-c", "pass"])
    assert rc == 0 and peak < 100 * MB
    rc, _, peak = child_peak.run([sys.executable, "-c", "import numpy, sys; a = numpy.ones(200 * 2**20 // 8); sys.exit(3)"])
    assert rc == 3 and 200 * MB < peak < 400 * MB
