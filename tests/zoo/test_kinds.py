"""Model kinds: registry validation of patch classifiers and cascades, their runner modules, and `zoo run`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from tests.conftest import run_zoo
from zoo.engines.model import OnnxModel
from zoo.kinds.patch_classification import classify_tiles, grey_entropy_bits
from zoo.registry import ModelEntry, load_registry, sha256_file
from zoo.runner import RunOptions
from zoo.slide import open_slide


def _entry(name: str, **changes: Any) -> dict[str, Any]:
    data = load_registry().get(name).model_dump(mode="json")
    data.update(changes)
    return data


# --------------------------------------------------------------------------- registry


def test_registered_kinds_and_stages() -> None:
    reg = load_registry()
    assert reg.get("tumour-tiles").kind == "patch-classification"
    h2g = reg.get("tumour-h2g")
    assert h2g.kind == "cascade"
    assert [n for n, _ in h2g.networks()] == ["patches", "refine"]
    refine = dict(h2g.networks())["refine"]
    # the view describes the ONNX input "image" only (3 of the stage's 4 channels)
    assert (refine.input.input_name, refine.input.channels) == ("image", 3)
    assert len(h2g.pinned_sha256()) == 2


def _stage(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    st = dict(data["stages"][0])
    st.update(changes)
    data["stages"] = [st]
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: _stage(d, sources=[{"source": "slide", "input_name": "image"}]), "stage 'refine'.*3 channels.*4"),
        (
            lambda d: _stage(d, sources=[{"source": "slide"}, {"source": "later", "class_name": "Tumor"}]),
            "neither 'slide'",
        ),
        (
            lambda d: _stage(d, sources=[{"source": "slide"}, {"source": "patches", "class_name": "Tumour"}]),
            "no class 'Tumour'",
        ),
        (lambda d: _stage(d, name="patches"), "duplicate stage name"),
        (lambda d: _stage(d, input={**d["stages"][0]["input"], "mode": "tiled", "target_mpp": 4.0}), "whole-slide"),
        (lambda d: {**d, "stages": []}, "at least one entry in stages"),
        (lambda d: {**d, "kind": "segmentation"}, "layout 'NC'"),
    ],
)
def test_incompatible_cascades_are_refused_naming_the_stage(change: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelEntry.model_validate(change(_entry("tumour-h2g")))


def test_patch_classifier_and_rails_validation() -> None:
    data = _entry("tumour-tiles")
    with pytest.raises(ValidationError, match="layout 'NC'"):
        ModelEntry.model_validate({**data, "output": {**data["output"], "layout": "NCHW"}})
    rails = {"min_bits": 7.0, "max_bits": 2.0, "source": "test"}
    with pytest.raises(ValidationError, match=r"min_bits 7\.0 > max_bits 2\.0"):
        ModelEntry.model_validate({**data, "selection": {"tissue_premask": True, "entropy_rails": rails}})
    with pytest.raises(ValidationError, match="stages are for kind 'cascade'"):
        ModelEntry.model_validate({**data, "stages": _entry("tumour-h2g")["stages"]})


# --------------------------------------------------------------------------- entropy


def test_grey_entropy_bits() -> None:
    flat = np.full((1, 8, 8, 3), 200, np.uint8)
    half = np.zeros((1, 8, 8, 3), np.uint8)
    half[:, :4] = 255
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    h = grey_entropy_bits(np.concatenate([flat, half, np.zeros_like(flat)]))
    assert h.tolist() == [0.0, 1.0, 0.0]
    assert 7.0 < float(grey_entropy_bits(noise)[0]) <= 8.0


# --------------------------------------------------------------------------- runner module


def _darkness_classifier(path: Path) -> Path:
    """A real ONNX patch classifier: p(dark) = mean(1 - RGB) per patch, out (N, 2) = [1 - p, p]."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 96, 96])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Sub", ["one", "image"], ["dark"]),
        helper.make_node("ReduceMean", ["dark"], ["p"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["p", "ax1"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["q1"]),
        helper.make_node("Concat", ["q1", "p1"], ["probabilities"], axis=1),
    ]
    ax1 = helper.make_tensor("ax1", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "darkness_classifier", [x], [y], [one, ax1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_patch_classification_averages_overlapping_tiles(cmu_slide: Path, tmp_path: Path) -> None:
    onnx_path = _darkness_classifier(tmp_path / "dark.onnx")
    data = _entry(
        "tumour-tiles",
        weights={"uri": str(onnx_path), "sha256": sha256_file(onnx_path)},
        test=None,
        precisions={"fp32": {"engines": ["onnxruntime"]}},
    )
    entry = ModelEntry.model_validate(data)
    model = OnnxModel(onnx_path, entry, providers=["CPUExecutionProvider"])
    with open_slide(cmu_slide) as slide:
        grid = classify_tiles(slide, entry, model, RunOptions(progress=False, batch_size=16))
        # rows read by several threads are classified in the same order: the very same grid
        again = classify_tiles(slide, entry, model, RunOptions(progress=False, batch_size=16, reader_threads=3))
    np.testing.assert_array_equal(again.prob, grid.prob)
    np.testing.assert_array_equal(again.count, grid.count)
    s = grid.stats
    assert s["tiles_total"] == s["tiles_removed_by_premask"] + s["tiles_removed_by_entropy_rails"] + s["tiles_run"]
    assert s["tiles_run"] > 0 and s["tiles_removed_by_premask"] > 0
    w, h = s["model_dimensions_px"]
    assert grid.prob.shape == (2, math.ceil(h / 48), math.ceil(w / 48))
    covered = grid.count > 0
    # probabilities of the two classes sum to 1 wherever a tile was classified, 0 elsewhere
    np.testing.assert_allclose(grid.prob.sum(axis=0)[covered], 1.0, atol=1e-5)
    assert not grid.prob[:, ~covered].any()
    # 96 px tiles at stride 48: an interior cell is covered by up to 4 tiles (2 x 2); along the last
    # row/column the tile flush with the slide's edge adds a third
    assert grid.count[:-3, :-3].max() == 4
    assert grid.count.max() <= 9


# --------------------------------------------------------------------------- zoo run / list / verify


def _zoo_run_of_kind(model: str, slide: Path, out: Path) -> tuple[Path, dict]:
    """``zoo run MODEL SLIDE``: its result folder and run.json, after checking it ran as the entry's kind."""
    r = run_zoo("run", model, str(slide), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = out / slide.stem
    run = json.loads((res / "run.json").read_text())
    assert run["model"]["kind"] == load_registry().get(model).kind
    return res, run


@pytest.mark.parametrize("model", ["tumour-tiles", "tumour-h2g"])
def test_zoo_run_tumour_models(model: str, cmu_slide: Path, tmp_path: Path) -> None:
    res, run = _zoo_run_of_kind(model, cmu_slide, tmp_path)
    assert (res / "probability_Tumor.tiff").exists() and (res / "mask.tiff").exists()
    fc = json.loads((res / "annotations.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in fc["features"]}
    assert names <= {"Tumor"}
    stats = run["stats"]
    if model == "tumour-h2g":
        assert set(stats["seconds_per_stage"]) == {"patches", "refine"}
        assert stats["stages"]["refine"]["inputs"] == {"image": [1, 3, 1024, 1024], "heatmap": [1, 1, 1024, 1024]}
        refine = stats["stages"]["refine"]
        assert 0 < refine["seconds_inference"] <= refine["seconds"]  # benchmarks count it as inference
        assert len(run["model"]["files"]) == 2
    else:
        assert isinstance(stats["tiles_removed_by_entropy_rails"], int)
        assert stats["entropy_rails_bits"] == [1.8849, 7.9228]


def test_list_shows_kinds() -> None:
    r = run_zoo("list", "--json")
    assert r.returncode == 0, r.stderr
    kinds = {m["id"]: (m["kind"], m["stages"]) for m in json.loads(r.stdout)}
    assert kinds["tumour-h2g@1.0.0"] == ("cascade", ["patches", "refine"])
    assert kinds["tumour-tiles@1.0.0"][0] == "patch-classification"
    assert kinds["tissue-multires@1.0.0"][0] == "segmentation"


def test_verify_checks_every_stage() -> None:
    r = run_zoo("verify", "tumour-h2g", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res = out[0] if isinstance(out, list) else out
    assert set(res["stages"]) == {"patches", "refine"}
    assert all(s["ok"] for s in res["stages"].values())


def test_tampered_stage_weights_fail_before_output(cmu_slide: Path, tmp_path: Path) -> None:
    reg = load_registry()
    dst = tmp_path / "reg"
    for family in ("tumour-h2g", "tumour-tiles"):  # 1.1.0's patch stage is tumour-tiles 1.2.0's file
        shutil.copytree(reg.root / "models" / family, dst / "models" / family)
    shutil.copy(reg.root / "registry.yaml", dst / "registry.yaml")
    for m in reg.models:
        if m.name != "tumour-h2g":
            (dst / m.weights.uri).parent.mkdir(parents=True, exist_ok=True)
    refine = dst / reg.get("tumour-h2g").stages[0].weights.uri
    blob = bytearray(refine.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    refine.write_bytes(bytes(blob))
    r = run_zoo(
        "--registry", str(dst / "registry.yaml"), "run", "tumour-h2g", str(cmu_slide), "--out", str(tmp_path / "o"),
        "--no-progress",
    )  # fmt: skip
    assert r.returncode == 1
    assert "sha256" in r.stderr and "refine.onnx" in r.stderr
    assert not (tmp_path / "o" / cmu_slide.stem).exists()


# --------------------------------------------------------------------------- multi-input


def test_multi_input_validation() -> None:
    data = _entry("multilevel-unet")
    with pytest.raises(ValidationError, match="context_inputs entry"):
        ModelEntry.model_validate({**data, "context_inputs": []})
    with pytest.raises(ValidationError, match="must differ"):
        ModelEntry.model_validate(
            {**data, "context_inputs": [{"input_name": "image", "patch_size_px": [256, 256], "target_mpp": 4.0}]}
        )
    with pytest.raises(ValidationError, match="context_inputs are for kind 'multi-input'"):
        ModelEntry.model_validate({**_entry("cd-unet"), "context_inputs": data["context_inputs"]})


def test_context_tile_is_centred_and_white_beyond_the_slide(cmu_slide: Path) -> None:
    from zoo.registry import ContextInput
    from zoo.runner import context_tile
    from zoo.slide import box_reduce, choose_level, level_region

    with open_slide(cmu_slide) as slide:
        choice = choose_level(slide, target_mpp=1.0)
        same = ContextInput(input_name="c", patch_size_px=(64, 64), target_mpp=1.0)
        # at the same resolution, the context tile centred on a tile's centre is that tile
        got = context_tile(slide, choice, choice, same, 300 + 32, 200 + 32)
        np.testing.assert_array_equal(got, box_reduce(level_region(slide, choice, 300, 200, 64, 64), choice.factor))
        # near the top-left corner, the part beyond the slide is white
        corner = context_tile(slide, choice, choice, same, 0, 0)
        assert (corner[:32, :32] == 255).all() and not (corner[32:, 32:] == 255).all()
        coarse_choice = choose_level(slide, target_mpp=4.0)
        coarse = ContextInput(input_name="c", patch_size_px=(64, 64), target_mpp=4.0)
        assert context_tile(slide, choice, coarse_choice, coarse, 500, 700).shape == (64, 64, 3)


@pytest.mark.parametrize("model", ["cd-unet", "multilevel-unet"])
def test_zoo_run_multiclass_models(model: str, cmu_slide: Path, tmp_path: Path) -> None:
    res, _ = _zoo_run_of_kind(model, cmu_slide, tmp_path)
    for c in ("Tissue", "Tumor", "Exclude"):
        assert (res / f"probability_{c}.tiff").exists()
    fc = json.loads((res / "annotations.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in fc["features"]}
    # Exclude goes to QuPath as its Ignore* class, so QuPath users can filter it
    assert names <= {"Tissue", "Tumor", "Ignore*"} and "Tissue" in names
    assert "Exclude" in (res / "classes.csv").read_text()


def test_multiclass_model_far_coarser_than_any_level(cmu_slide: Path, tmp_path: Path) -> None:
    """cd-unet at 64 um/px on a single-level slide: one 512 px tile would be a 65,536² px read (12.6 GB before);
    now only the part on the slide is read, in strips, and the far-from-trained resolution is warned about."""
    r = run_zoo("run", "cd-unet", str(cmu_slide), "--out", str(tmp_path), "--mpp", "64", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)[0]
    assert res["summary"]["peak_rss_mb"] < 1500, res["summary"]["peak_rss_mb"]
    assert any("far from what it was trained at" in ln for ln in r.stderr.splitlines() if ln.startswith("warning:"))
