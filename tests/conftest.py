"""Shared fixtures: real slides from ../shared/data (or the bundled one), tiny real ONNX models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZOO_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLED_SLIDE = REPO / "zoo" / "data" / "cmu-1-small-region.svs"


@pytest.fixture(autouse=True, scope="session")
def _fresh_engine_checks() -> Iterator[None]:
    """Every run in the tests checks its engine afresh (``ZOO_CHECK_CACHE=0``, inherited by the CLI's child
    processes): no result depends on, or writes to, the user's cache; tests/zoo/test_engines.py tests the cache."""
    before = os.environ.get("ZOO_CHECK_CACHE")
    os.environ["ZOO_CHECK_CACHE"] = "0"
    yield
    if before is None:
        os.environ.pop("ZOO_CHECK_CACHE", None)
    else:
        os.environ["ZOO_CHECK_CACHE"] = before


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
def lymph_node_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 px slide of real lymph-node tissue at 0.972 um/px (PCam valid patches woven into tumour and normal
    regions on real glass; benchmarks/make_lymph_node_slide.py), made once per session (about 6 s)."""
    shared("pcam", "pcam-ai4all-trainval.zip")
    shared("slides", "kidney-48-5.tif")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_lymph_node_slide import make_lymph_node_slide

    return make_lymph_node_slide(tmp_path_factory.mktemp("lymph-node") / "lymph_node.tiff", px=2048)


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


def make_broken_onnx(path: Path, kind: str, patch_px: int = 64, classes: int = 2) -> Path:
    """Real ONNX graphs that return garbage, for the tests that a run refuses it (issue 22, item 3).

    ``nan``: a 1x1 convolution with NaN weights, then a sigmoid (N, 1, H, W): NaN everywhere;
    ``partly-nan``: ``sqrt(0.6 - mean(RGB))`` per pixel: NaN on bright pixels only;
    ``out-of-range``: ``6 * mean(RGB) - 1`` per pixel, declared as a probability (-1..5);
    ``nan-classifier``: (N, 3, H, W) -> (N, ``classes``) softmax of NaN-weighted pooled colours.
    """
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, patch_px, patch_px])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    inits = [axes] if kind in ("partly-nan", "out-of-range") else []
    if kind == "nan-classifier":
        out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])
        inits.append(helper.make_tensor("w", TensorProto.FLOAT, [3, classes], [float("nan")] * (3 * classes)))
        nodes = [
            helper.make_node("GlobalAveragePool", ["image"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["prob"], axis=1),
        ]
    else:
        out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, patch_px, patch_px])
        if kind == "nan":
            inits.append(helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [float("nan")] * 3))
            nodes = [helper.make_node("Conv", ["image", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["prob"])]
        elif kind == "partly-nan":
            inits.append(helper.make_tensor("c", TensorProto.FLOAT, [], [0.6]))
            nodes = [
                helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=1),
                helper.make_node("Sub", ["c", "m"], ["d"]),
                helper.make_node("Sqrt", ["d"], ["prob"]),
            ]
        elif kind == "out-of-range":
            inits += [
                helper.make_tensor("a", TensorProto.FLOAT, [], [6.0]),
                helper.make_tensor("b", TensorProto.FLOAT, [], [1.0]),
            ]
            nodes = [
                helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=1),
                helper.make_node("Mul", ["a", "m"], ["s"]),
                helper.make_node("Sub", ["s", "b"], ["prob"]),
            ]
        else:
            raise ValueError(kind)
    graph = helper.make_graph(nodes, kind, [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def classifier_registry_text(weights: str, sha256: str, name: str = "nanclf", classes: int = 2) -> str:
    """registry.yaml text with one patch classifier (64 px tiles, softmax over ``classes``) at ``weights``."""
    names = ["Background", "Tumor", "Stroma", "Other"][:classes]
    cls = "\n".join(f"      - {{index: {i}, name: {n}, color: [{40 * i}, 0, 0]}}" for i, n in enumerate(names))
    return f"""schema_version: 1
default_model: {name}
models:
  - name: {name}
    version: 0.1.0
    kind: patch-classification
    task: tumour-segmentation
    summary: broken test classifier
    architecture: pooled colours
    classes:
{cls}
    input: {{mode: tiled, patch_size_px: [64, 64], overlap: 0.5, input_name: image, target_mpp: 2.0}}
    output: {{output_name: prob, activation: softmax, layout: NC, channels: {classes}}}
    weights: {{uri: {weights}, sha256: {sha256}}}
    licence: MIT
    provenance: {{made_by: tests/conftest.py}}
"""
