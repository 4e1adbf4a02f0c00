"""runtime.memory: freed large blocks go back to the system (glibc's dynamic mmap threshold otherwise
carves them from heaps that keep them), and the CLI sets that policy."""

import subprocess
import sys

import pytest

from tests.helpers.runs import python_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

CHILD = """
import re, sys
import numpy as np
from onnxcompress.runtime.memory import return_large_blocks

if sys.argv[1] == "set" and not return_large_blocks():
    sys.exit(7)  # not glibc
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
big = np.ones(30 * 2**20 // 8)
del big  # a mapped block freed: glibc's dynamic threshold rises to 30 MB
before = rss()
blocks = [np.ones(8 * 2**20 // 8) for _ in range(12)]
del blocks[:-1]  # all but the last one freed
print(rss() - before)
"""


def _held_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=python_env())
    if out.returncode == 7:
        pytest.skip("not glibc")
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_freed_large_blocks_are_given_back():
    assert _held_mb("default") > 60  # the heap keeps the freed 8 MB blocks below the last one
    assert _held_mb("set") < 30


def test_the_cli_entry_point_sets_the_policy(monkeypatch):
    from onnxcompress import cli

    calls = []
    monkeypatch.setattr(cli, "return_large_blocks", lambda: calls.append(1) or True)
    assert cli.main(["passes"]) == 0 and calls == [1]
