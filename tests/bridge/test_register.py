"""Bring your own model: `zoo register` of a third-party ONNX, of a bioimage.io package and of a WSInfer
folder gives a verified entry that runs; a zoo export registered back gives the same result; whatever
cannot be verified is refused with one line and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_zoo
from zoo.outputs import read_mask_tiff
from zoo.registry import load_registry

pytest.importorskip("torch", reason="the exports registered back are traced with torch (extra 'train')")

PEER = REPO / "models" / "peer-tissue-unet" / "1.0.0" / "best_unet.onnx"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_third_party_onnx_registers_with_one_command_and_runs(tmp_path: Path, cmu_slide: Path) -> None:
    mine = tmp_path / "peer.onnx"
    shutil.copyfile(PEER, mine)
    reg = tmp_path / "my-models.yaml"
    r = run_zoo("register", str(mine), "--registry", str(reg), "--name", "peer", "--classes", "Background,Tissue",
                "--mode", "whole-slide", "--licence", "MIT")  # fmt: skip
    assert r.returncode == 0, r.stderr
    entry = load_registry(reg).get("peer")
    assert entry.output.activation == "sigmoid" and entry.output.already_activated  # found behind the crop
    assert entry.input.layout == "NHWC" and entry.input.patch_size_px == (500, 500)
    assert entry.weights.sha256 == hashlib.sha256(PEER.read_bytes()).hexdigest()
    assert (tmp_path / "models/peer/0.1.0/MODEL_CARD.md").read_text().count("no metrics are claimed") == 1
    v = run_zoo("--registry", str(reg), "verify", "peer", "--json")
    assert v.returncode == 0 and json.loads(v.stdout)[0]["ok"], v.stdout + v.stderr
    run = run_zoo("--registry", str(reg), "run", "peer", str(cmu_slide), "--out", str(tmp_path / "out"), "--json")
    assert run.returncode == 0, run.stderr
    assert 0.1 < json.loads(run.stdout)[0]["summary"]["classes"]["Tissue"]["fraction"] < 0.9


def test_bioimageio_export_registered_back_gives_the_same_mask(tmp_path: Path, cmu_slide: Path) -> None:
    exported = run_zoo("export", "bioimageio", "tissue-multires", "--out", str(tmp_path / "bio"))
    assert exported.returncode == 0, exported.stderr
    reg = tmp_path / "mine.yaml"
    r = run_zoo("register", exported.stdout.strip(), "--registry", str(reg), "--name", "tissue-back")
    assert r.returncode == 0, r.stderr
    back = load_registry(reg).get("tissue-back")
    original = load_registry().get("tissue-multires")
    assert back.input.overlap == original.input.overlap and back.input.target_mpp == original.input.target_mpp
    assert [c.color for c in back.classes] == [c.color for c in original.classes]
    masks = []
    for registry, model in ((None, "tissue-multires"), (reg, "tissue-back")):
        head = ["--registry", str(registry)] if registry else []
        out = tmp_path / model
        run = run_zoo(*head, "run", model, str(cmu_slide), "--out", str(out), "--engine", "onnxruntime",
                      "--precision", "fp32", "--json")  # fmt: skip
        assert run.returncode == 0, run.stderr
        masks.append(read_mask_tiff(Path(json.loads(run.stdout)[0]["out"]) / "mask.tiff")[0])
    np.testing.assert_array_equal(masks[0], masks[1])


def test_wsinfer_export_registered_back_gives_the_same_probabilities(tmp_path: Path, cmu_slide: Path) -> None:
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights
    from zoo.slide import choose_level, open_slide, read_scaled

    exported = run_zoo("export", "wsinfer", "tumour-tiles", "--out", str(tmp_path / "ws"))
    assert exported.returncode == 0, exported.stderr
    reg = tmp_path / "mine.yaml"
    r = run_zoo("register", exported.stdout.strip(), "--registry", str(reg), "--name", "tiles-back")
    assert r.returncode == 0, r.stderr
    back, back_reg = load_registry(reg).get("tiles-back"), load_registry(reg)
    assert back.output.activation == "softmax" and not back.output.already_activated  # WSInfer models give logits
    orig_reg = load_registry()
    orig = orig_reg.get("tumour-tiles")
    with open_slide(cmu_slide) as slide:
        choice = choose_level(slide, 0.972)
        tiles = np.stack([read_scaled(slide, choice, x, 300, 96, 96) for x in range(0, 960, 96)])
    probs = []
    for entry, registry in ((orig, orig_reg), (back, back_reg)):
        m = OnnxModel(verified_weights(entry, registry), entry, providers=["CPUExecutionProvider"])
        probs.append(m.predict(m.preprocess(tiles)))
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "--classes"),
        (["--classes", "Background,Tissue,Tumor", "--mode", "whole-slide"], "channel"),
        (["--classes", "Background,Tissue", "--mode", "tiled"], "--mpp"),
    ],
)
def test_what_cannot_be_verified_is_refused_and_leaves_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    mine = tmp_path / "in" / "peer.onnx"
    mine.parent.mkdir()
    shutil.copyfile(PEER, mine)
    reg = tmp_path / "reg" / "mine.yaml"
    r = run_zoo("register", str(mine), "--registry", str(reg), "--name", "peer", *(args or ["--mode", "whole-slide"]))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr
    assert not (tmp_path / "reg").exists() or list((tmp_path / "reg").iterdir()) == []


def test_never_replaces_an_entry_a_folder_or_the_bundled_registry(tmp_path: Path) -> None:
    reg = tmp_path / "mine.yaml"
    base = ["register", str(PEER), "--registry", str(reg), "--name", "peer", "--classes", "Background,Tissue",
            "--mode", "whole-slide"]  # fmt: skip
    assert run_zoo(*base).returncode == 0
    reg.write_text("# my own notes, kept\n" + reg.read_text())  # the user's edit
    assert run_zoo(*base, "--version", "0.3.0").returncode == 0
    assert reg.read_text().startswith("# my own notes, kept\n") and len(load_registry(reg).models) == 2
    before = _digest(tmp_path)
    again = run_zoo(*base, "--version", "0.3.0")
    assert again.returncode == 1 and "already" in again.stderr
    assert _digest(tmp_path) == before
    (tmp_path / "models" / "peer" / "0.2.0").mkdir()
    (tmp_path / "models" / "peer" / "0.2.0" / "mine.txt").write_text("my file")
    before = _digest(tmp_path)
    folder = run_zoo(*base, "--version", "0.2.0")
    assert folder.returncode == 1 and "exists already" in folder.stderr
    assert _digest(tmp_path) == before  # neither the registry nor that folder changed
    bundled = run_zoo("register", str(PEER), "--registry", str(REPO / "registry.yaml"), "--name", "peer",
                      "--classes", "Background,Tissue", "--mode", "whole-slide")  # fmt: skip
    assert bundled.returncode == 1 and "package's own registry" in bundled.stderr


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00not an onnx graph" * 10)
    r = run_zoo("register", str(bad), "--registry", str(tmp_path / "r.yaml"), "--name", "bad", "--classes", "A,B")
    assert r.returncode == 1 and "not a readable ONNX file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
