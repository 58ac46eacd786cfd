"""The installed distribution carries its registry, weights and pipelines, and works outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest


def _installed_files() -> list[str]:
    try:
        dist = metadata.distribution("pathology-zoo")
    except metadata.PackageNotFoundError:
        pytest.skip("pathology-zoo is not installed (run scripts/setup.sh or pip install .)")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        pytest.skip("pathology-zoo is installed in editable mode; the wheel contents are not checked")
    return [str(f) for f in dist.files or []]


def test_wheel_contains_package_data() -> None:
    names = _installed_files()
    assert "zoo/registry.yaml" in names
    assert any(n.startswith("zoo/models/tissue-multires/") and n.endswith(".onnx") for n in names)
    assert any(n.startswith("zoo/pipelines/") and n.endswith("_export.fpl") for n in names)
    assert "zoo/data/cmu-1-small-region.svs" in names


def test_installed_cli_outside_checkout(tmp_path: Path) -> None:
    _installed_files()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZOO_REGISTRY")}
    code = "import zoo, sys; print(zoo.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "site-packages" in where.stdout, where.stdout + where.stderr
    r = subprocess.run(
        [sys.executable, "-m", "zoo.cli", "verify", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert all(x["ok"] for x in json.loads(r.stdout))
