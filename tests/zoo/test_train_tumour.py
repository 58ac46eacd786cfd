"""Training code of the tumour models: PCam reading, composites, augmentation, a few seeded steps, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[train]')")

from tests.conftest import shared  # noqa: E402
from zoo.train import augment, composites  # noqa: E402
from zoo.train.common import count_parameters  # noqa: E402
from zoo.train.h2g import PatchClassifier, RefinementUNet  # noqa: E402
from zoo.train.pcam import JpegSet, balanced_split, image_entropy, load_pack, read_pcam, save_pack  # noqa: E402
from zoo.train.tumour_tiles import TileCNN  # noqa: E402


@pytest.fixture(scope="module")
def pcam_valid() -> JpegSet:
    return read_pcam(shared("pcam", "pcam-ai4all-trainval.zip"), "valid")


def test_pcam_split_labels_and_pack_roundtrip(pcam_valid: JpegSet, tmp_path: Path) -> None:
    assert len(pcam_valid) == 3000 and int(pcam_valid.labels.sum()) == 1500
    assert all(n.startswith(f"valid/{y}/") for n, y in zip(pcam_valid.names, pcam_valid.labels, strict=True))
    idx = balanced_split(pcam_valid.labels, 4, seed=0)
    assert np.bincount(pcam_valid.labels[idx]).tolist() == [4, 4]
    assert np.array_equal(idx, balanced_split(pcam_valid.labels, 4, seed=0))  # seeded
    other = balanced_split(pcam_valid.labels, 4, seed=1, exclude=idx)
    assert not set(idx) & set(other)
    sub = pcam_valid.subset(idx)
    save_pack(tmp_path / "p.npz", {"s": sub})
    back = load_pack(tmp_path / "p.npz", "s")
    assert back.blobs == sub.blobs and back.names == sub.names  # original bytes, never re-encoded
    img = back.decode()
    assert img.shape == (8, 96, 96, 3) and img.dtype == np.uint8
    assert image_entropy(img).shape == (8,)


def test_read_pcam_refuses_a_wrong_zip(tmp_path: Path) -> None:
    import zipfile

    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("notes.txt", "x")
    with pytest.raises(FileNotFoundError, match="no valid/<label>"):
        read_pcam(z, "valid")


def test_composite_masks_are_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    comp = composites.layout(32, 5, 6, 3, gen)
    cells = comp.cells
    assert set(torch.unique(cells).tolist()) <= {composites.GLASS, 0, 1}
    assert (cells == 1).any() or (cells == 0).any()
    # each cell holds a patch of its own pool: tumour patches bright red, others blue, glass white
    tum = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    tum[:, 0] = 255
    nor = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    nor[:, 2] = 255
    gla = torch.full((3, 3, 8, 8), 255, dtype=torch.uint8)
    img = composites.render(comp, tum, nor, gla, out_px=32 * 8)
    red = (img[0] > 0.99) & (img[1] < 0.01)
    truth = composites.cell_map((cells == 1).long(), 32 * 8, mode="nearest") > 0.5
    assert torch.equal(red, truth)
    heat = composites.heat_of(comp, torch.ones(5), torch.zeros(6))
    assert torch.equal(heat > 0.5, cells == 1)


def test_hsv_roundtrip_and_augmentation_keeps_range() -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(augment.hsv_to_rgb(augment.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(1)
    y = augment.colour(augment.geometric(x, gen), gen)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_architectures() -> None:
    # seed 004's MobileNetV2 with the simplified head, and seed 001's lightweight CNN
    clf, cnn, unet = PatchClassifier().eval(), TileCNN().eval(), RefinementUNet().eval()
    assert count_parameters(clf) == 2_352_374
    assert count_parameters(cnn) == 1_273_090
    assert count_parameters(unet) == 1_964_258
    with torch.no_grad():
        p = clf(torch.rand(2, 3, 96, 96))
        torch.testing.assert_close(p.sum(1), torch.ones(2))
        assert cnn(torch.rand(2, 3, 96, 96)).shape == (2, 2)
        assert unet(torch.rand(1, 4, 64, 64)).shape == (1, 2, 64, 64)


def test_few_seeded_steps_and_export(pcam_valid: JpegSet, tmp_path: Path) -> None:
    """A few seeded steps of both models on real PCam patches (not a full training), then ONNX export."""
    from zoo.train import h2g, tumour_tiles

    i1 = balanced_split(pcam_valid.labels, 8, seed=0)
    i2 = balanced_split(pcam_valid.labels, 4, seed=1, exclude=i1)
    glass = JpegSet(pcam_valid.subset(i2).blobs[:2], np.zeros(2, np.int64), ["g0", "g1"])
    pack = tmp_path / "pack.npz"
    save_pack(pack, {"stage1": pcam_valid.subset(i1), "stage2": pcam_valid.subset(i2), "glass": glass})
    torch.manual_seed(0)
    s = tumour_tiles.train(pack, tmp_path / "tiles", steps=3, batch=4, seed=0)
    assert s["parameters"] == 1_273_090 and len(s["loss_log"]) == 1  # type: ignore[arg-type]
    s2 = h2g.train(pack, tmp_path / "h2g", steps1=2, steps2=1, batch1=8, batch2=1, seed=0, refine_px=128)
    assert json.loads((tmp_path / "h2g" / "train.json").read_text())["stage2"]["steps"] == 1
    assert s2["stage1"]["patches"] == {"tumour": 8, "non_tumour": 8}  # type: ignore[index]
    errs = {
        **tumour_tiles.export(tmp_path / "tiles", tmp_path / "onnx"),
        **h2g.export(tmp_path / "h2g", tmp_path / "onnx"),
    }
    assert all(e < 1e-4 for e in errs.values()), errs
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "onnx" / "refine.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "heatmap"]
    out = sess.run(
        None, {"image": np.zeros((2, 3, 1024, 1024), np.float32), "heatmap": np.zeros((2, 1, 1024, 1024), np.float32)}
    )
    assert out[0].shape == (2, 2, 1024, 1024)  # dynamic batch, probabilities out


# --------------------------------------------------------------------------- the 1.1 recipe (issue 25)


def test_full_recipe_splits_are_disjoint_balanced_and_use_everything() -> None:
    from zoo.train.pcam_recipe import pcam_splits

    sp = pcam_splits(shared("pcam", "pcam-ai4all-trainval.zip"), 0)
    assert (len(sp.train), len(sp.select), len(sp.report)) == (20000, 1500, 1500)
    assert np.bincount(sp.select.labels).tolist() == [750, 750] == np.bincount(sp.report.labels).tolist()
    assert not set(sp.select.names) & set(sp.report.names) and not set(sp.train.names) & set(sp.report.names)


def test_dihedral_tta_is_invariant_and_exports(tmp_path: Path) -> None:
    """The TTA graph's output does not change under any of the 8 dihedral transforms, and ONNX matches torch."""
    from zoo.train.pcam_recipe import DihedralTTA, dihedral_views
    from zoo.train.tumour_tiles import export

    torch.manual_seed(0)
    net = TileCNN().eval()
    tta = DihedralTTA(net, temperature=1.7).eval()
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        ref = tta(x)
        for v in dihedral_views(x):
            assert torch.allclose(tta(v), ref, atol=1e-5)
        assert torch.allclose(ref.sum(1), torch.ones(3), atol=1e-5)
    (tmp_path / "s").mkdir()
    torch.save(net.state_dict(), tmp_path / "s" / "tiles.pt")
    diff = export(tmp_path / "s", tmp_path, tta=True, temperature=1.7)["tiles"]
    assert diff < 1e-4 and (tmp_path / "tumour-tiles.onnx").stat().st_size > 1e6


def test_full_recipe_runs_a_few_seeded_steps(tmp_path: Path) -> None:
    """train-full on 64 patches per split, 2 epochs of 3 steps: it trains, evaluates and records everything."""
    from zoo.train.tumour_tiles import train_full

    s = train_full(shared("pcam", "pcam-ai4all-trainval.zip"), tmp_path, 2, 16, 1e-3, 0, steps_per_epoch=3, limit=64)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert (tmp_path / "tiles.pt").exists() and saved["fit"]["best_epoch"] in (1, 2)
    ev = saved["evaluation"]
    assert 0.5 <= ev["temperature"] <= 4 and 0 < ev["threshold_select"] < 1
    for split in ("select", "report"):
        assert {"single_view", "tta8", "tta8_ci95"} <= set(ev[split])
        assert 0 <= ev[split]["tta8"]["auc"] <= 1 and 0 <= ev[split]["tta8"]["ece"] <= 1
    assert s["data"]["train"]["tumour"] + s["data"]["train"]["non_tumour"] == 64


def test_tile_resnet_trains_with_the_full_recipe_and_exports(tmp_path: Path) -> None:
    """1.2's network: its size, a few seeded train-full steps on 48 patches per split, and the TTA export."""
    from zoo.train.tumour_tiles import TileResNet, export, train_full

    assert count_parameters(TileResNet()) == 2_795_554
    s = train_full(shared("pcam", "pcam-ai4all-trainval.zip"), tmp_path, 1, 16, 1e-3, 0, steps_per_epoch=2, limit=48,
                   net="resnet")  # fmt: skip
    assert s["network"] == "TileResNet" and (tmp_path / "tiles.pt").exists()
    diff = export(tmp_path, tmp_path / "onnx", tta=True, temperature=1.3, net_name="resnet")["tiles"]
    assert diff < 1e-4


def test_calibration_helpers() -> None:
    from zoo.train.pcam_recipe import best_threshold, expected_calibration_error, fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(y * 0.7 + rng.random(2000) * 0.3, 0, 1)  # tumour >= 0.7, non-tumour < 0.3
    assert 0.3 <= best_threshold(p, y) <= 0.7
    assert expected_calibration_error(y.astype(float), y) == 0.0
    noisy = np.where(rng.random(2000) < 0.2, 1 - y, y)  # logits of +-8 for labels that are 20% wrong: overconfident
    logits = torch.from_numpy(np.stack([np.zeros(2000), (y * 2 - 1) * 8.0], 1)[:, None, :])
    assert fit_temperature(logits, noisy) > 2.0
