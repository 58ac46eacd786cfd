"""A process's peak memory is its own, not its parent's (the CI failure of stop 27: 0.8 GB read as 3.4 GB)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from zoo.procstats import peak_rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's; elsewhere ru_maxrss is used")
def test_child_reports_its_own_peak_not_the_parents() -> None:
    held = np.ones(600 * 2**20, dtype=np.uint8)  # 600 MB touched in this (parent) process
    assert peak_rss_mb() > 600
    child = "import resource; from zoo.procstats import peak_rss_mb; print(peak_rss_mb())"
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert float(r.stdout) < 300, r.stdout
    del held
