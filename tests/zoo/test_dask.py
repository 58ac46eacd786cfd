"""Many slides on a real dask.distributed LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("dask.distributed", reason="dask[distributed] not installed (pip install '.[dask]')")

from zoo.jobs import JobConfig, run_many_dask
from zoo.runner import RunOptions


def test_local_cluster_runs_slides_and_reports_failures(
    cmu_slide: Path, broken_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    cfg = JobConfig(
        model="darkness", registry_path=str(darkness_registry), out_dir=str(tmp_path / "out"), run=RunOptions(threads=1)
    )
    results = run_many_dask([cmu_slide, broken_slide], cfg, workers=2)
    by_slide = {Path(r.slide).name: r for r in results}
    assert by_slide[cmu_slide.name].status == "ok"
    assert (
        by_slide[broken_slide.name].status == "failed" and "not a readable slide" in by_slide[broken_slide.name].error
    )
    assert (tmp_path / "out" / cmu_slide.stem / "mask.tiff").exists()
    again = run_many_dask([cmu_slide], cfg, workers=1)
    assert again[0].status == "skipped"
