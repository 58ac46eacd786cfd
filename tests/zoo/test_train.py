"""The Table 3 architecture, the training data builder and the ONNX export (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[train]')")

from tests.conftest import SHARED  # noqa: E402
from zoo.train.data import PatchSampler, Sample, artefact_samples  # noqa: E402
from zoo.train.model import MultiResUNet, count_parameters  # noqa: E402
from zoo.train.train import export_onnx  # noqa: E402

# Parameter counts printed in Table 3 of Jurgas et al. (seed 000), by layer.
TABLE3 = {
    "stem.0": 17,
    "enc1.0": 9_760,
    "enc1.1": 16_416,
    "enc2.0": 57_792,
    "enc2.1": 78_272,
    "enc2.2": 65_600,
    "enc3.0": 230_272,
    "enc3.1": 312_192,
    "enc3.2": 262_272,
    "bottleneck.0": 312_192,
    "bottleneck.2": 262_272,
    "dec2.0": 160_192,
    "dec2.1": 65_600,
    "dec1.0": 40_160,
    "dec1.1": 16_416,
    "dec0.0": 346,
    "dec0.1": 17,
    "head": 2,
}


@pytest.mark.parametrize("in_mode", ["grey", "rgb"])
def test_layer_parameter_counts_match_table3(in_mode: str) -> None:
    net = MultiResUNet(in_mode)  # type: ignore[arg-type]
    modules = dict(net.named_modules())
    for name, expected in TABLE3.items():
        got = sum(p.numel() for p in modules[name].parameters())
        if name == "stem.0" and in_mode == "rgb":
            expected = 3 * 16 + 1  # the first conv takes 3 channels instead of 1
        assert got == expected, name
    assert count_parameters(net) == (2_202_882 if in_mode == "grey" else 2_202_914)


def test_output_shape_and_dynamic_size() -> None:
    net = MultiResUNet("rgb").eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 256, 256)).shape == (2, 1, 256, 256)
        assert net(torch.rand(1, 3, 128, 192)).shape == (1, 1, 128, 192)


def test_edge_weighted_sampling_and_batches() -> None:
    label = np.zeros((200, 200), bool)
    label[50:150, 50:150] = True
    img = np.where(label[..., None], 120, 240).astype(np.uint8).repeat(3, axis=2)
    sampler = PatchSampler([Sample("square", img, label)], patch_px=64, seed=0)
    x, y = sampler.batch(64, augment_on=True)
    assert x.shape == (64, 3, 64, 64) and y.shape == (64, 1, 64, 64)
    assert 0.0 <= x.min() and x.max() <= 1.0
    centre = y[:, 0, 32, 32]  # a quarter background, a quarter foreground, half at the edge
    assert 0.25 < centre.mean() < 0.85
    mixed = ((y.mean(axis=(1, 2, 3)) > 0.02) & (y.mean(axis=(1, 2, 3)) < 0.98)).mean()
    assert mixed > 0.3


def test_pen_marks_are_background() -> None:
    img = SHARED / "images" / "models_pen_markings_he_pen_green.png"
    mask = SHARED / "images" / "models_pen_markings_he_pen_green_mask.png"
    if not img.exists():
        pytest.skip(f"{img} absent")
    (s,) = artefact_samples(img, mask)
    from PIL import Image

    pen = np.asarray(Image.open(mask).convert("L")) > 0
    assert not s.label[pen].any()
    assert 0.05 < s.label.mean() < 0.6


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MultiResUNet("rgb")
    torch.save(net.state_dict(), tmp_path / "m.pt")
    err = export_onnx(tmp_path / "m.pt", "rgb", tmp_path / "m.onnx")
    assert err < 1e-4 and (tmp_path / "m.onnx").exists()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert isinstance(shape[0], str)  # dynamic batch
    out = sess.run(None, {"image": np.random.default_rng(0).random((3, 3, 256, 256), dtype=np.float32)})[0]
    assert out.shape == (3, 1, 256, 256) and 0 <= out.min() and out.max() <= 1


def test_unscanned_rectangles_only_whiten_background() -> None:
    from zoo.train.data import unscanned_rectangle

    x = np.full((64, 64, 3), 0.9, np.float32)
    y = np.zeros((64, 64), np.float32)
    y[20:40, 20:40] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = unscanned_rectangle(x, y, rng)
        assert np.array_equal(out[y > 0], x[y > 0])  # tissue never painted
        assert ((out == 1.0).any(axis=-1) <= (y == 0)).all()
        assert (out == 1.0).any()
