"""Multi-class training code (seeds 002, 003): stains, four-class composites, weights, a few seeded steps, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[train]')")

from tests.conftest import shared  # noqa: E402
from zoo.train import multiclass as mc  # noqa: E402
from zoo.train import stains  # noqa: E402
from zoo.train.cd_unet import CDUNet  # noqa: E402
from zoo.train.common import count_parameters  # noqa: E402
from zoo.train.multilevel import MultiLevelUNet, centre_crop_up  # noqa: E402


def _source() -> mc.CanvasSource:
    gen = torch.Generator().manual_seed(0)
    tum = (torch.rand(6, 3, 96, 96, generator=gen) * 80 + 100).to(torch.uint8)
    nor = (torch.rand(6, 3, 96, 96, generator=gen) * 80 + 150).to(torch.uint8)
    gla = torch.full((3, 3, 96, 96), 245, dtype=torch.uint8)
    arts = mc.artefact_arrays(shared("images"))
    pairs = [
        (torch.from_numpy(arts[f"{n}_rgb"].transpose(2, 0, 1).copy()), torch.from_numpy(arts[f"{n}_mask"]))
        for n in mc.ARTEFACTS
    ]
    return mc.CanvasSource(tum, nor, gla, pairs, grid=(8, 8))


def test_stain_recolouring_roundtrip_and_palettes() -> None:
    # an image made of non-negative H&E(+DAB) concentrations decomposes back to itself
    conc = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    rgb = stains.render(conc, "he")
    torch.testing.assert_close(stains.concentrations(rgb), conc, atol=2e-2, rtol=0)
    torch.testing.assert_close(stains.render(stains.concentrations(rgb), "he"), rgb, atol=2e-3, rtol=0)
    for s in (*stains.TRAIN_STAINS, *stains.UNSEEN_STAINS):
        out = stains.recolour(rgb, s)
        assert out.shape == rgb.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(stains.recolour(rgb, "giemsa"), stains.recolour(rgb, "h-dab"))


def test_four_class_canvas_labels_are_exact() -> None:
    src = _source()
    gen = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(6):
        img, label = src.canvas(gen)
        assert img.shape == (3, 8 * 96, 8 * 96) and label.shape == (8 * 96, 8 * 96)
        values = set(torch.unique(label).tolist())
        assert values <= {0, 1, 2, 3, mc.IGNORE}
        seen |= values
        # glass cells are the (uniform 245) glass patches, unless an artefact stroke covers them
        glass = label == 0
        assert torch.allclose(img[:, glass], torch.full_like(img[:, glass], 245 / 255), atol=1e-6)
    assert 3 in seen  # artefact strokes are pasted and labelled Exclude


def test_median_frequency_weights() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10 + [mc.IGNORE] * 50)
    w = mc.median_frequency_weights(labels)
    # frequencies 0.6, 0.3, 0.1 (median 0.3); class 3 absent: weight 0
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 3.0, 0.0]))


def test_context_crop_is_the_high_resolution_field_of_view() -> None:
    feat = torch.arange(64.0).reshape(1, 1, 8, 8)
    out = centre_crop_up(feat, 4, (8, 8))
    assert out.shape == (1, 1, 8, 8)
    assert float(out.min()) >= 27 and float(out.max()) <= 36  # only the central 2x2 (27, 28, 35, 36)


def test_few_seeded_steps_and_export(tmp_path: Path) -> None:
    """Two seeded SGD steps of each family on tiny composites (not a training run), then ONNX export."""
    from zoo.train.export import export_onnx

    src = _source()
    cd, ml = CDUNet(base=16), MultiLevelUNet()  # quarter width here to keep the test fast
    assert count_parameters(CDUNet()) == 7_763_203 and count_parameters(ml) == 3_935_684  # CD-UNET: half width
    assert count_parameters(CDUNet(colour_deconvolution=False)) == 7_763_140
    s1 = mc.train_segmenter(cd, src, steps=2, batch=2, size=128, seed=0, log_every=1)
    s2 = mc.train_segmenter(ml, src, steps=2, batch=2, size=64, seed=0, context=4, log_every=1)
    assert len(s1["loss_log"]) == 2 and s2["context_factor"] == 4  # type: ignore[arg-type]
    assert all(np.isfinite(r["loss"]) for r in s1["loss_log"])  # type: ignore[attr-defined]
    e1 = export_onnx(cd.eval(), (3, 128, 128), tmp_path / "cd.onnx", "image", "probabilities")
    e2 = export_onnx(ml.eval(), [(3, 64, 64), (3, 64, 64)], tmp_path / "ml.onnx", ["image", "context"], "probabilities")
    assert e1 < 1e-4 and e2 < 1e-4
