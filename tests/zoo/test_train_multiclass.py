"""Multi-class training code (seeds 002, 003): stains, four-class composites, weights, a few seeded steps, export."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------- the 1.1 recipe (issue 25)


def _pools(n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tumour patches uniformly 60, non-tumour uniformly 160, glass uniformly 245 (so each pixel's source is known)."""
    return (torch.full((n, 3, 96, 96), 60, dtype=torch.uint8), torch.full((n, 3, 96, 96), 160, dtype=torch.uint8),
            torch.full((3, 3, 96, 96), 245, dtype=torch.uint8))  # fmt: skip


def test_seamless_labels_are_exact_and_regions_have_no_grid() -> None:
    from zoo.train import seamless

    tum, nor, gla = _pools()
    gen = torch.Generator().manual_seed(0)
    free = 0
    for _ in range(8):
        c = seamless.composite(tum, nor, gla, 384, gen)
        v = c.image[0] * 255
        lab = c.label
        # away from region borders (2 px soft edge) each label shows exactly its own material
        for code, value in ((seamless.GLASS, 245), (seamless.TISSUE, 160), (seamless.TUMOUR, 60)):
            inner = lab == code
            inner &= ~seamless._dilate(~inner, 3)
            if inner.any():
                assert torch.allclose(v[inner], torch.full_like(v[inner], value), atol=0.5), code
        assert set(torch.unique(lab).tolist()) <= {0, 1, 2, seamless.IGNORE}
        free += int(not (lab == seamless.TUMOUR).any())
        # the tumour/tissue boundary is ignored, never labelled either way
        if (lab == seamless.TUMOUR).any() and (lab == seamless.TISSUE).any():
            assert (lab == seamless.IGNORE).any()
    assert free >= 1  # some canvases are tumour-free


def test_weave_hides_the_piece_lattice() -> None:
    """Pieces of distinct patches are cross-faded: a jump between two patches (up to 240 grey levels here) is
    spread over at least 8 px, never a hard seam; and the pieces' record points at the patches actually used."""
    from zoo.train import seamless

    pool = torch.arange(0, 250, 10, dtype=torch.uint8)[:, None, None, None].expand(25, 3, 96, 96).contiguous()
    tex = seamless.weave(pool, 256, torch.Generator().manual_seed(1))
    grey = tex.image[0] * 255
    steps = (grey[:, 1:] - grey[:, :-1]).abs().amax(0)
    assert float(steps.max()) <= 240 / 8
    assert tex.pieces.shape[1] == 3 and int(tex.pieces[:, 0].max()) < 25
    score = seamless.piece_scores(tex, torch.ones(256, 256), 25)
    assert float(score.sum()) > 0


def test_multiclass_recipe_runs_a_few_seeded_steps(tmp_path: Path) -> None:
    """train-full of each family: 3 + 2 steps on 300 real PCam patches, hard negatives mined, held-out figures."""
    from zoo.train.multiclass_recipe import finetune, train_full

    zip_path, slide = shared("pcam", "pcam-ai4all-trainval.zip"), shared("slides", "kidney-48-5.tif")
    images = shared("images")
    for name, net, ctx in (("cd-unet", CDUNet(base=8), 0), ("multilevel-unet", MultiLevelUNet(base=8), 4)):
        s = train_full(net, name, ctx, zip_path, slide, images, tmp_path / name, 3, 2, 2, 64, 0, eval_composites=2,
                       canvas_px=256, limit=300)  # fmt: skip
        saved = json.loads((tmp_path / name / "train.json").read_text())
        assert (tmp_path / name / f"{name}.pt").exists() and saved["round2"]["steps"] == 2
        ev = saved["evaluation_report_composites"]
        assert 0 <= ev["tumour_called_on_tumour_free_tissue"] <= 1 and ev["composites"] == 2
        assert s["hard_negatives"]["patches_seen"] > 0
        if name == "multilevel-unet":  # finetune continues that state with Tumour weighted, and says where from
            f = finetune(MultiLevelUNet(base=8), name, ctx, zip_path, slide, images, tmp_path / name, tmp_path / "ft",
                         2, 2, 64, 1, 1e-3, 3.0, eval_composites=1, canvas_px=256, limit=300)  # fmt: skip
            assert f["finetune"]["class_weights"][2] == 3.0 and f["started_from"]["round2"]["steps"] == 2
            assert (tmp_path / "ft" / f"{name}.pt").exists() and (tmp_path / "ft" / "train.json").exists()


def test_export_writes_a_bundled_test_from_the_torch_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``export --test-from``: the bundled input is reused, the expected output is torch's, the ONNX matches it."""
    from tests.conftest import REPO
    from zoo.train import multilevel

    torch.manual_seed(0)
    state = tmp_path / "state"
    state.mkdir()
    torch.save(MultiLevelUNet().state_dict(), state / "multilevel-unet.pt")
    src = REPO / "models/multilevel-unet/1.0.0/test_input.npz"
    out = tmp_path / "out"
    out.mkdir()
    assert multilevel.main(["export", "--state", str(state), "--out", str(out), "--test-from", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["bundled_test_max_abs_diff_onnx_vs_torch"] < 1e-4
    with np.load(out / "test_input.npz") as got, np.load(src) as want:
        assert set(got.files) == {"image", "context"}
        np.testing.assert_array_equal(got["image"], want["image"])
    expected = np.load(out / "test_expected.npy")
    assert expected.shape == (1, 4, 256, 256) and np.allclose(expected.sum(1), 1.0, atol=1e-4)


def test_patch_head_dense_is_the_patch_classifier_at_every_window() -> None:
    """Dense at a location = the patch classifier on the window around it, temperature applied, the threshold at 0.5."""
    from zoo.train.patch_head import PatchHead

    torch.manual_seed(0)
    head = PatchHead(8)
    deep = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        logits = head.patch_logits(deep)  # the whole 5 x 5 field: the window around the centre location
        d = logits[:, 1] - logits[:, 0]
        head.temperature.fill_(2.0)
        head.threshold.fill_(float(torch.sigmoid(d[0] / 2.0)))  # sample 0 sits exactly at the threshold
        dense = head.dense(deep, (5, 5))
    assert dense.shape == (2, 1, 5, 5) and float(dense.min()) > 0 and float(dense.max()) < 1
    thr = head.threshold
    want = torch.sigmoid(d / 2.0 - torch.log(thr / (1 - thr)))
    torch.testing.assert_close(dense[:, 0, 2, 2], want, atol=1e-5, rtol=0)
    assert abs(float(dense[0, 0, 2, 2]) - 0.5) < 1e-5


def test_compose_splits_the_segmenters_tissue_by_the_head() -> None:
    from zoo.train.patch_head import compose

    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 4, 3, 3, generator=gen), 1)
    t = torch.rand(2, 1, 3, 3, generator=gen)
    out = compose(probs, t)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 3, 3))
    torch.testing.assert_close(out[:, 2], (probs[:, 1] + probs[:, 2]) * t[:, 0])
    torch.testing.assert_close(out[:, [0, 3]], probs[:, [0, 3]])


def test_train_head_freezes_the_encoder_and_exports_the_composed_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train-head of each family: 2 encoder steps on real PCam patches, 2 segmenter steps with the encoder and head
    frozen (weights and batch-norm statistics unchanged), held-out figures; the export runs on every engine."""
    import onnxruntime as ort

    from zoo.engines.torch_graph import load_graph
    from zoo.train import cd_unet, multiclass_recipe, multilevel

    real_fit = multiclass_recipe.fit

    def checked_fit(net: torch.nn.Module, *args: object, **kwargs: object) -> dict[str, object]:
        clf = multiclass_recipe.encoder_of(net)  # encoder, colour deconvolution and head; not the decoder
        frozen = ("unet.down.", "pre.", "head.")
        before = {k: v.clone() for k, v in clf.state_dict().items() if k.startswith(frozen)}
        decoder = {k: v.clone() for k, v in clf.state_dict().items() if k.startswith("unet.up.")}
        out = real_fit(net, *args, **kwargs)  # type: ignore[arg-type]
        after = clf.state_dict()
        assert any(k.startswith("unet.down.") for k in before) and any(k.startswith("head.") for k in before)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not all(torch.equal(decoder[k], after[k]) for k in decoder)  # the rest did learn
        return out

    monkeypatch.setattr(multiclass_recipe, "fit", checked_fit)
    zip_path, slide = shared("pcam", "pcam-ai4all-trainval.zip"), shared("slides", "kidney-48-5.tif")
    for name, net, ctx, module in (
        ("cd-unet", CDUNet(base=8, patch_head=True), 0, cd_unet),
        ("multilevel-unet", MultiLevelUNet(base=8, patch_head=True), 4, multilevel),
    ):
        s = multiclass_recipe.train_head(net, name, ctx, zip_path, slide, shared("images"), tmp_path / name, 1, 2, 2,
                                         64, 0, eval_composites=1, canvas_px=256, limit=300)  # fmt: skip
        head = s["encoder_pretraining"]["patch_head"]
        assert 0 < head["threshold_select"] < 1 and head["report"]["patches"] > 0
        assert s["segmenter"]["tumour_learned_as_tissue"] is True
        saved = json.loads((tmp_path / name / "train.json").read_text())
        assert 0 <= saved["evaluation_report_composites"]["tumour_called_on_tumour_free_tissue"] <= 1
        state = torch.load(tmp_path / name / f"{name}.pt")
        assert float(state["tumour.threshold"]) == pytest.approx(head["threshold_select"])
        if ctx:  # tune-head: window and threshold chosen on select composites, saved in the state
            tuned = tmp_path / "tuned"
            t = multiclass_recipe.tune(MultiLevelUNet(base=8, patch_head=True), name, ctx, zip_path, slide,
                                       shared("images"), tmp_path / name, tuned, 64, 0, select_composites=1,
                                       eval_composites=1, canvas_px=256, limit=300)  # fmt: skip
            chosen, rows = t["tune_head"]["chosen"], t["tune_head"]["candidates"]
            assert chosen in rows and len(rows) >= 3 * 3 and t["tune_head"]["split"] == "select"
            again = torch.load(tuned / f"{name}.pt")
            assert int(again["tumour.window"]) == chosen["window"]
            assert float(again["tumour.threshold"]) == pytest.approx(chosen["threshold"])
            assert t["started_from"]["segmenter"]["tumour_learned_as_tissue"] is True
        # the export of a full-size network with a head: ONNX Runtime and the torch engine agree with torch
        full = CDUNet(patch_head=True) if name == "cd-unet" else MultiLevelUNet(patch_head=True)
        full.tumour.threshold.fill_(0.3)  # type: ignore[union-attr]
        (tmp_path / "full").mkdir(exist_ok=True)
        torch.save(full.state_dict(), tmp_path / "full" / f"{name}.pt")
        diff = module.export(tmp_path / "full", tmp_path / "full")[name]
        assert diff < 1e-4
        onnx_path = tmp_path / "full" / f"{name}.onnx"
        size = 512 if name == "cd-unet" else 256
        feeds = {"image": np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}
        if ctx:
            feeds["context"] = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
        want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(want.sum(1), 1.0, atol=1e-4)
        graph = load_graph(str(onnx_path), str(onnx_path))
        with torch.no_grad():
            got = graph(*[torch.from_numpy(feeds[k]) for k in ("image", "context") if k in feeds])[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
