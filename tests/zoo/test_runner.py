"""The streaming runner: exact stitching on a pointwise model, real models on real slides, providers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from zoo.engines.model import OnnxModel
from zoo.registry import load_registry, verified_weights
from zoo.runner import RunOptions, labels_from_probabilities, plan_tiles, predict_slide
from zoo.slide import model_dimensions, open_slide, read_scaled

PROVIDERS = [
    pytest.param("CPUExecutionProvider", id="cpu"),
    pytest.param(
        "CUDAExecutionProvider",
        id="cuda",
        marks=pytest.mark.skipif(
            "CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA provider (no GPU here)"
        ),
    ),
]


def _model(registry: Path, provider: str = "CPUExecutionProvider") -> OnnxModel:
    reg = load_registry(registry)
    entry = reg.get(None)
    return OnnxModel(verified_weights(entry, reg), entry, providers=[provider])


@pytest.mark.parametrize(
    ("slide_name", "backend", "tolerance"),
    [
        ("cmu", "openslide", 0.0005),
        ("cmu", "tifffile", 0.0005),
        ("tcga", "tifffile", 0.0005),
        # OpenSlide paints this slide's level 1 (downsample 2.0005) at sub-pixel offsets that
        # differ between a tile read and a whole-level read, so pixels near the threshold flip.
        ("tcga", "openslide", 0.01),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 7])
def test_tiled_stitching_is_exact(
    darkness_registry: Path,
    request: pytest.FixtureRequest,
    slide_name: str,
    backend: str,
    tolerance: float,
    batch_size: int,
) -> None:
    """Overlap averaging of a pointwise model must equal the model applied to the whole image."""
    model = _model(darkness_registry)
    path = request.getfixturevalue(f"{slide_name}_slide")
    with open_slide(path, backend=backend) as slide:  # type: ignore[arg-type]
        pred = predict_slide(slide, model, RunOptions(skip_background=False, batch_size=batch_size, progress=False))
        choice = pred.choice
        assert choice is not None and choice.mpp_assumed == (slide_name == "tcga")  # TCGA has no mpp
        w, h = model_dimensions(slide, choice)
        whole = read_scaled(slide, choice, 0, 0, w, h).astype(np.float32) / 255.0
    expected = ((1.0 - whole.mean(axis=-1)) >= 0.2).astype(np.uint8)
    assert pred.mask.shape == (h, w)
    disagree = int((pred.mask.to_array() != expected).sum())
    assert disagree <= tolerance * expected.size  # float rounding at the threshold only
    assert pred.stats["tiles_run"] == pred.stats["tiles_total"] > 1


def test_background_skipping_runs_fewer_tiles(darkness_registry: Path, kidney_slide: Path) -> None:
    model = _model(darkness_registry)
    with open_slide(kidney_slide) as slide:
        full = predict_slide(slide, model, RunOptions(skip_background=False, progress=False, level=0))
        skip = predict_slide(slide, model, RunOptions(skip_background=True, progress=False, level=0))
    assert skip.stats["tiles_run"] < 0.5 * full.stats["tiles_total"]
    # the tissue fragment itself is still found
    assert skip.mask.class_counts()[1] > 0.5 * full.mask.class_counts()[1]


def test_plan_tiles_is_what_the_runner_runs(darkness_registry: Path, kidney_slide: Path) -> None:
    """The benchmark's decode and compute floors read exactly the runner's tile plan."""
    model = _model(darkness_registry)
    with open_slide(kidney_slide) as slide:
        for skip in (False, True):
            opts = RunOptions(skip_background=skip, progress=False, level=0)
            plan = plan_tiles(slide, model.entry, opts)
            stats = predict_slide(slide, model, opts).stats
            assert len(plan.jobs) == stats["tiles_run"]
            assert len(plan.xs) * len(plan.ys) == stats["tiles_total"]
            assert list(plan.stride_px) == stats["stride_px"]
            assert (plan.width_px, plan.height_px) == tuple(stats["model_dimensions_px"])
        pw, ph = model.entry.input.patch_size_px
        assert plan.xs[0] == 0 and plan.xs[-1] == plan.width_px - pw
        assert plan.ys[0] == 0 and plan.ys[-1] == plan.height_px - ph


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_id", [m.id for m in load_registry().models if m.task == "tissue-segmentation"])
def test_registered_models_find_tissue(cmu_slide: Path, model_id: str, provider: str) -> None:
    reg = load_registry()
    entry = reg.get(model_id)
    model = OnnxModel(verified_weights(entry, reg), entry, providers=[provider])
    assert model.providers[0] == provider
    with open_slide(cmu_slide) as slide:
        pred = predict_slide(slide, model, RunOptions(progress=False))
    frac = pred.class_fractions().get(1, 0.0)
    assert 0.2 < frac < 0.6, frac  # CMU-1-Small-Region is about a third tissue


def test_labels_from_softmax_and_multilabel() -> None:
    from zoo.registry import ModelEntry

    base = load_registry().get(None).model_dump()
    base["classes"] = [
        {"index": 0, "name": "Background", "color": [0, 0, 0]},
        {"index": 3, "name": "A", "color": [1, 2, 3]},
        {"index": 5, "name": "B", "color": [4, 5, 6]},
    ]
    base["output"] = {**base["output"], "activation": "softmax", "channels": 3}
    entry = ModelEntry(**base)
    prob = np.zeros((3, 2, 2), np.float32)
    prob[0, 0, 0] = prob[1, 0, 1] = prob[2, 1, :] = 1
    assert labels_from_probabilities(prob, entry).tolist() == [[0, 3], [5, 5]]


def test_model_input_mismatch_is_refused(darkness_registry: Path) -> None:
    from zoo.errors import RegistryError

    text = darkness_registry.read_text().replace("input_name: image", "input_name: pixels")
    darkness_registry.write_text(text)
    with pytest.raises(RegistryError, match=r"input\.input_name .pixels. is not an input"):  # checked with the pins
        _model(darkness_registry)


@pytest.mark.parametrize(
    ("slide_name", "low", "high"),
    [("cmu", 0.30, 0.45), ("tcga", 0.55, 0.70), ("kidney", 0.0005, 0.02)],
)
def test_tissue_multires_on_every_real_slide(
    request: pytest.FixtureRequest, slide_name: str, low: float, high: float
) -> None:
    """Regression guard on the shipped model: tissue fraction per real slide at the default 2 µm/px."""
    reg = load_registry()
    entry = reg.get("tissue-multires")
    model = OnnxModel(verified_weights(entry, reg), entry, providers=["CPUExecutionProvider"])
    with open_slide(request.getfixturevalue(f"{slide_name}_slide")) as slide:
        pred = predict_slide(slide, model, RunOptions(progress=False))
    assert low < pred.class_fractions().get(1, 0.0) < high


@pytest.mark.parametrize(("order", "layout"), [("RGB", "NCHW"), ("BGR", "NCHW"), ("RGB", "NHWC"), ("BGR", "NHWC")])
def test_preprocess_table_is_bit_identical_to_the_arithmetic(order: str, layout: str) -> None:
    """uint8 tiles go through a per-channel table; it must equal the per-pixel float32 arithmetic exactly."""
    entry = load_registry().get("tissue-multires")
    spec = entry.input.model_copy(
        update={"channel_order": order, "layout": layout, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    )
    model = OnnxModel.__new__(OnnxModel)  # preprocessing needs only the entry, no engine
    model.entry = entry.model_copy(update={"input": spec})
    tiles = np.random.default_rng(0).integers(0, 256, (3, 17, 11, 3), dtype=np.uint8)
    fast = model.preprocess(tiles)
    slow = model.preprocess(tiles.astype(np.int16))  # not uint8: the per-pixel path
    assert fast.dtype == np.float32 and fast.flags.c_contiguous and np.array_equal(fast, slow)


# --------------------------------------------------------------------------- garbage out is an error (issue 22, 3)


def _broken_registry(tmp_path: Path, kind: str) -> Path:
    from tests.conftest import classifier_registry_text, darkness_registry_text, make_broken_onnx
    from zoo.registry import sha256_file

    w = make_broken_onnx(tmp_path / f"{kind}.onnx", kind)
    text = (classifier_registry_text if kind == "nan-classifier" else darkness_registry_text)(w.name, sha256_file(w))
    reg = tmp_path / "registry.yaml"
    reg.write_text(text, encoding="utf-8")
    return reg


@pytest.mark.parametrize("kind", ["nan", "partly-nan", "out-of-range", "nan-classifier"])
def test_a_network_that_returns_garbage_fails_the_slide(kind: str, cmu_slide: Path, tmp_path: Path) -> None:
    """NaN, Inf or out-of-range 'probabilities' fail the slide with one line naming model and tile: no result."""
    from tests.conftest import run_zoo

    reg = _broken_registry(tmp_path, kind)
    out = tmp_path / "out"
    r = run_zoo("--registry", str(reg), "run", reg.read_text().split("default_model: ")[1].split()[0], str(cmu_slide),
                "--out", str(out), "--no-progress")  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tile at x=" in err[0] and ("NaN" in err[0] or "outside [0, 1]" in err[0]), err[0]
    assert not any(p.is_dir() for p in out.iterdir()) if out.exists() else True  # no result folder at all


def test_verify_fails_on_a_nan_network(tmp_path: Path) -> None:
    """A bundled test of a NaN network never verifies as ok (even when its 'expected' output is NaN too)."""
    from zoo.verify import verify_model

    reg_path = _broken_registry(tmp_path, "nan")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.full((1, 1, 64, 64), np.nan, np.float32))
    text = reg_path.read_text() + "    test: {input: x.npy, expected: y.npy}\n"
    reg_path.write_text(text)
    reg = load_registry(reg_path)
    res = verify_model(reg.get(None), reg)
    assert not res["ok"] and "NaN" in str(res["checks"]), res


def test_finite_probabilities_pass_the_check() -> None:
    from zoo.engines.model import to_probabilities
    from zoo.registry import load_registry

    entry = load_registry().get("tissue-multires")
    y = to_probabilities(np.full((2, 1, 4, 4), 1.0000004, np.float32), entry)  # rounding above 1 is tolerated
    assert y.shape == (2, 1, 4, 4)
