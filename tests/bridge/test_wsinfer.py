"""WSInfer model folders: every eligible registered model, checked by WSInfer's own validator and run as
QuPath's extension runs it (TorchScript, transforms from config.json, softmax)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bridge.wsinfer import CONFIG, MANIFEST, TORCHSCRIPT, export_wsinfer, patch_network
from tests.conftest import run_zoo
from zoo.errors import ExportError, OutputExistsError
from zoo.registry import ModelEntry, load_registry, verified_weights

torch = pytest.importorskip("torch", reason="the WSInfer export traces TorchScript with torch (extra 'train')")

REG = load_registry()


def _eligible(entry: ModelEntry) -> bool:
    try:
        patch_network(entry)
    except ExportError:
        return False
    return True


ELIGIBLE = [e.id for e in REG.models if _eligible(e)]
INELIGIBLE = [e.id for e in REG.models if not _eligible(e)]


def _wsinfer_transform(pixels: np.ndarray, transforms: list[dict]) -> np.ndarray:
    """What WSInfer / QuPath do to an (H, W, 3) uint8 RGB patch, from config.json alone."""
    x = pixels.astype(np.float32)
    for t in transforms:
        args = t.get("arguments", {})
        if t["name"] == "Resize":
            assert args["size"] == pixels.shape[0]  # patches are read at the model's size already
        elif t["name"] == "ToTensor":
            x = x.transpose(2, 0, 1) / 255.0
        elif t["name"] == "Normalize":
            x = (x - np.asarray(args["mean"], np.float32)[:, None, None]) / np.asarray(args["std"], np.float32)[
                :, None, None
            ]
    return x


def test_there_is_something_to_export() -> None:
    assert {"tumour-tiles@1.0.0", "tumour-h2g@1.0.0"} <= set(ELIGIBLE)


@pytest.mark.parametrize("model", ELIGIBLE)
def test_export_passes_wsinfers_validator_and_runs_as_qupath_runs_it(
    model: str, tmp_path: Path, cmu_slide: Path
) -> None:
    from zoo.engines.model import OnnxModel
    from zoo.slide import choose_level, open_slide, read_scaled

    entry = REG.get(model)
    dest = export_wsinfer(entry, REG, tmp_path)
    assert dest == tmp_path / f"{entry.name}-{entry.version}"
    config = json.loads((dest / CONFIG).read_text())
    wz = pytest.importorskip("wsinfer_zoo.client", reason="wsinfer-zoo (WSInfer's own config validator) not installed")
    wz.validate_config_json(config)  # raises on an invalid config
    assert config["class_names"] == [c.qupath_name or c.name for c in sorted(entry.classes, key=lambda c: c.index)]
    manifest = json.loads((dest / MANIFEST).read_text())
    for f in ("torchscript", "config"):
        item = manifest[f]
        assert hashlib.sha256((dest / item["file"]).read_bytes()).hexdigest() == item["sha256"]
    assert manifest["max_abs_diff_softmax_vs_onnxruntime"] <= 1e-4

    # real pixels of the bundled slide at the model's spacing, as WSInfer would read them
    net = patch_network(entry)
    size = config["patch_size_pixels"]
    with open_slide(cmu_slide) as slide:
        choice = choose_level(slide, config["spacing_um_px"])
        tiles = np.stack([read_scaled(slide, choice, x, 200, size, size) for x in (100, 400, 700, 1000)])
    ts = torch.jit.load(str(dest / TORCHSCRIPT))
    x = np.stack([_wsinfer_transform(t, config["transform"]) for t in tiles])
    with torch.no_grad():
        p_qupath = torch.softmax(ts(torch.from_numpy(x)), dim=1).numpy()
    onnx = OnnxModel(verified_weights(net, REG), net, providers=["CPUExecutionProvider"])
    p_zoo = onnx.predict(onnx.preprocess(tiles)).reshape(len(tiles), -1)
    np.testing.assert_allclose(p_qupath, p_zoo, atol=1e-4)
    assert np.allclose(p_qupath.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("model", INELIGIBLE)
def test_segmentation_models_are_refused_with_one_line(model: str, tmp_path: Path) -> None:
    r = run_zoo("export", "wsinfer", model, "--out", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "patch classifiers" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    """An existing folder is kept without --force; a folder that is not a zoo export is kept even with it."""
    entry = REG.get("tumour-tiles")
    mine = tmp_path / f"{entry.name}-{entry.version}"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own model"}')
    before = (mine / "config.json").read_bytes()
    for force in (False, True):
        with pytest.raises(OutputExistsError):
            export_wsinfer(entry, REG, tmp_path, force=force)
        assert (mine / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]  # no partial folder left


def test_force_replaces_an_earlier_zoo_export(tmp_path: Path) -> None:
    r = run_zoo("export", "wsinfer", "tumour-tiles", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    dest = Path(r.stdout.strip())
    again = run_zoo("export", "wsinfer", "tumour-tiles", "--out", str(tmp_path))
    assert again.returncode == 1 and "--force" in again.stderr
    forced = run_zoo("export", "wsinfer", "tumour-tiles", "--out", str(tmp_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (dest / TORCHSCRIPT).is_file() and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
