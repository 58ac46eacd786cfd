"""Run a FAST text pipeline headless with pyfast, in a child process.

FAST prints a banner, may look for a display and keeps global state, so each run
gets its own interpreter; the parent gets the wall time and the output path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from zoo.errors import FplError

_CHILD = r"""
import json, sys, time
import fast
from zoo.procstats import peak_rss_mb
fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
path, variables = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
p = fast.Pipeline(path, variables)
p.parse()
p.run()
seconds = time.perf_counter() - t0
print("FAST_STATS", json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
"""


def fast_available() -> str | None:
    """None when pyfast imports here, else the reason it does not."""
    r = subprocess.run([sys.executable, "-c", "import fast"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
    return f"pyfast cannot be imported ({last}); install '.[fast]' and the Debian libraries in .ci/apt-packages.txt"


def run_fast_pipeline_stats(fpl: Path, variables: dict[str, str], timeout_s: float = 1800) -> dict[str, float]:
    """Run ``fpl`` in FAST with ``@@variables@@``; return FAST's own ``seconds`` (parse + run)
    and the child's ``peak_rss_mb``.

    Raises:
        FplError: FAST failed; the message carries its last error line.
    """
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(fpl), json.dumps(variables)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "Test data" not in ln]
        raise FplError(f"{fpl}: FAST failed ({lines[-1] if lines else r.returncode}); check the pipeline attributes")
    for ln in r.stdout.splitlines():
        if ln.startswith("FAST_STATS "):
            return dict(json.loads(ln.split(" ", 1)[1]))
    raise FplError(f"{fpl}: FAST finished without reporting its statistics; check pyfast's installation")


def run_fast_pipeline(fpl: Path, variables: dict[str, str], timeout_s: float = 1800) -> float:
    """Run ``fpl`` in FAST (see :func:`run_fast_pipeline_stats`); return FAST's own seconds."""
    return run_fast_pipeline_stats(fpl, variables, timeout_s)["seconds"]


_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "<u2", "MET_SHORT": "<i2", "MET_FLOAT": "<f4"}


def read_metaimage(path: Path) -> Any:
    """A 2-D MetaImage (``.mhd`` + raw data file, as FAST's MetaImageExporter writes) as (H, W[, C]).

    Raises:
        FplError: not a 2-D uncompressed MetaImage of a known element type.
    """
    import numpy as np

    header: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    try:
        width, height = (int(v) for v in header["DimSize"].split())
        dtype = np.dtype(_MET_TYPES[header["ElementType"]])
        channels = int(header.get("ElementNumberOfChannels", "1"))
        raw = Path(path).with_name(header["ElementDataFile"])
    except (KeyError, ValueError) as err:
        raise FplError(f"{path}: not a 2-D MetaImage FAST writes ({err}); re-export it with MetaImageExporter") from err
    if header.get("CompressedData", "False") == "True":
        raise FplError(f"{path}: compressed MetaImage is not supported; export it uncompressed")
    a = np.fromfile(raw, dtype=dtype)
    if a.size != width * height * channels:
        raise FplError(f"{raw}: {a.size} values for {width}x{height}x{channels}; the export is truncated")
    return a.reshape(height, width, channels)[..., 0] if channels == 1 else a.reshape(height, width, channels)
