"""Shared fixtures: real slides from ../shared/data (or the bundled one), tiny real ONNX models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZOO_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLED_SLIDE = REPO / "zoo" / "data" / "cmu-1-small-region.svs"


def run_zoo(*args: str, check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the `zoo` CLI in a child process (as a user would), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        **kw,  # type: ignore[call-overload]
    )


def shared(*parts: str) -> Path:
    """A file under shared/data; the test is skipped (with the path) when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data file {p} is not present (set ZOO_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return BUNDLED_SLIDE


@pytest.fixture(scope="session")
def tcga_slide() -> Path:
    return shared("slides", "tcga-cr-7395-01a-01-ts1.svs")


@pytest.fixture(scope="session")
def kidney_slide() -> Path:
    return shared("slides", "kidney-48-5.tif")


@pytest.fixture(scope="session")
def broken_slide() -> Path:
    return shared("slides", "broken.svs")


def make_darkness_onnx(path: Path, patch_px: int = 64) -> Path:
    """A real ONNX graph computing, per pixel, ``1 - mean(RGB)`` (NCHW in [0,1] -> N,1,H,W).

    Being pointwise, any correct tiling + overlap averaging reproduces it exactly.
    """
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, patch_px, patch_px])
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, patch_px, patch_px])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=1),
        helper.make_node("Sub", ["one", "m"], ["prob"]),
    ]
    graph = helper.make_graph(nodes, "darkness", [inp], [out], initializer=[one, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def darkness_registry_text(weights: str, sha256: str, name: str = "darkness", extra_weights: str = "") -> str:
    """registry.yaml text with one tiled pointwise model (threshold 0.2 on darkness) at ``weights``."""
    return f"""schema_version: 1
default_model: {name}
models:
  - name: {name}
    version: 0.1.0
    task: tissue-segmentation
    summary: pointwise test model
    architecture: ReduceMean
    classes:
      - {{index: 0, name: Background, color: [255, 255, 255]}}
      - {{index: 1, name: Tissue, color: [0, 160, 0]}}
    input: {{mode: tiled, patch_size_px: [64, 64], overlap: 0.25, input_name: image, target_mpp: 2.0}}
    output: {{output_name: prob, activation: sigmoid, threshold: 0.2}}
    weights: {{uri: {weights}, sha256: {sha256}{", " + extra_weights if extra_weights else ""}}}
    licence: MIT
    provenance: {{made_by: tests/conftest.py}}
"""


@pytest.fixture()
def darkness_registry(tmp_path: Path) -> Path:
    """A registry with one tiled pointwise model (threshold 0.2 on darkness), weights pinned."""
    from zoo.registry import sha256_file

    w = make_darkness_onnx(tmp_path / "darkness.onnx")
    reg = tmp_path / "registry.yaml"
    reg.write_text(darkness_registry_text("darkness.onnx", sha256_file(w)), encoding="utf-8")
    return reg


@pytest.fixture()
def tampered_registry(tmp_path: Path) -> Path:
    """The bundled registry beside copies of every model's weights, each with one byte flipped."""
    from zoo.registry import load_registry

    reg = load_registry()
    root = reg.root
    dst = tmp_path / "reg"
    shutil.copytree(root / "models", dst / "models")
    shutil.copy(root / "registry.yaml", dst / "registry.yaml")
    for m in reg.models:
        w = dst / m.weights.uri
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0xFF
        w.write_bytes(bytes(data))
    return dst / "registry.yaml"
