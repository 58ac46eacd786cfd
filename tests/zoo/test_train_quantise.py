"""zoo.train.quantise: int8 copies of registered networks, calibrated on PCam train patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared
from zoo.registry import load_registry, verified_weights
from zoo.train.quantise import main, pcam_calibration, quantise


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return np.asarray(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0])


def test_quantise_keeps_the_stem_float_and_the_labels(tmp_path: Path) -> None:
    import onnx

    tiles = pcam_calibration(shared("pcam", "pcam-ai4all-trainval.zip"), 32, seed=1)
    assert tiles.shape == (32, 96, 96, 3) and tiles.dtype == np.uint8
    reg = load_registry()
    entry = reg.get("tumour-tiles@1.2.0")
    out = tmp_path / "q.onnx"
    info = quantise(entry, verified_weights(entry, reg), out, tiles, batch=16)
    assert info["kept_float"] == ["/stem/stem.0/Conv"] and info["calibration_tiles"] == 32
    graph = onnx.load(str(out)).graph
    dequantised = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    stem = convs.pop("/stem/stem.0/Conv")
    assert not set(stem.input) & dequantised  # float in, float weights
    assert len(convs) == 19 and all(c.input[0] in dequantised and c.input[1] in dequantised for c in convs.values())
    assert not any(n.op_type == "Gemm" and set(n.input) & dequantised for n in graph.node)  # the head stays float
    x = np.load(reg.resolve(entry.test.input))  # type: ignore[union-attr]
    ref, got = _ort(verified_weights(entry, reg), x), _ort(out, x)
    t = entry.output.threshold
    assert ((ref[:, 1] >= t) == (got[:, 1] >= t)).all() and 0 < np.abs(ref - got).max() < 0.05
    with pytest.raises(FileExistsError, match="never overwritten"):
        quantise(entry, verified_weights(entry, reg), out, tiles)


def test_the_registered_int8_file_is_reproduced_by_its_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``made_by`` remakes the pinned file: the same sha256 with the same onnxruntime, else the same outputs."""
    import onnxruntime

    zip_path = shared("pcam", "pcam-ai4all-trainval.zip")
    reg = load_registry()
    entry = reg.get("tumour-tiles@1.2.0")
    spec = entry.precisions["int8"]
    assert spec.made_by and spec.weights and "--calibration" not in spec.made_by  # the defaults: 512, seed 0
    out = tmp_path / "int8.onnx"
    assert main(["--model", entry.id, "--pcam", str(zip_path), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    same_tools = f"onnxruntime {onnxruntime.__version__}" in spec.made_by
    if same_tools:
        assert info["sha256"] == spec.weights.sha256
    x = np.load(reg.resolve(entry.test.input))  # type: ignore[union-attr]
    remade, pinned = _ort(out, x), _ort(verified_weights(entry, reg, "int8"), x)
    t = entry.output.threshold  # another onnxruntime may round a scale differently: the same labels, close values
    assert ((remade[:, 1] >= t) == (pinned[:, 1] >= t)).all()
    assert np.abs(remade - pinned).max() < (1e-5 if same_tools else 0.02)
    assert main(["--model", entry.id, "--pcam", str(zip_path), "--out", str(out)]) == 1  # never overwrites
