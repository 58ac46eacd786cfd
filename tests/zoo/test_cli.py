"""The `zoo` CLI end to end: outputs, provenance, exit codes and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_zoo
from zoo.cli import main


def test_list_info_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["default"] for r in rows)
    assert main(["info", rows[0]["id"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["sha256"] and info["versions"]
    assert main(["info", "tumour-tiles@1.2.0"]) == 0  # a precision with its own file names it
    assert "int8 (openvino, onnxruntime; models/tumour-tiles/1.2.0/tumour-tiles-int8.onnx" in capsys.readouterr().out
    assert main(["verify", "--json"]) == 0
    assert all(r["ok"] for r in json.loads(capsys.readouterr().out))


def test_help_shows_defaults() -> None:
    r = run_zoo("run", "--help")
    flat = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: as many pixels as 8 tiles of 256 px" in flat and "--mpp" in r.stdout


def test_run_writes_mask_geojson_and_provenance(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(
        ["--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    res = out / cmu_slide.stem
    assert sorted(p.name for p in res.iterdir()) == [
        "annotations.geojson",
        "classes.csv",
        "mask.tiff",
        "overview.png",
        "probability_Tissue.tiff",
        "run.json",
    ]
    run = json.loads((res / "run.json").read_text())
    assert run["model"]["id"] == "darkness@0.1.0" and len(run["model"]["sha256"]) == 64
    assert run["providers"] == ["CPUExecutionProvider"]
    assert run["versions"]["onnxruntime"] and run["arguments"]["out_dir"] == str(out)
    assert run["resolution"]["mask_mpp"] == pytest.approx(0.499 * 4)
    assert 0 < run["classes"]["Tissue"]["area_mm2"] < 1.65  # the slide is 1.1 x 1.5 mm
    fc = json.loads((res / "annotations.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    # per-object measurements QuPath shows, and the per-class table
    for f in fc["features"]:
        m = f["properties"]["measurements"]
        assert m["Area µm^2"] > 0 and m["Perimeter µm"] > 0 and 0.0 <= m["Mean class probability"] <= 1.0
    rows = (res / "classes.csv").read_text().splitlines()
    assert rows[0] == "class,area_mm2,fraction,objects,mean_probability"
    assert rows[2].startswith("Tissue,") and int(rows[2].split(",")[3]) == len(fc["features"])
    tissue = run["classes"]["Tissue"]
    assert 0.2 < tissue["mean_probability"] <= 1.0 and tissue["objects"] == len(fc["features"])
    import tifffile

    with tifffile.TiffFile(res / "probability_Tissue.tiff") as t:
        heat = t.pages[0].asarray()
        mask = tifffile.imread(res / "mask.tiff")
        assert heat.shape == mask.shape and len(t.pages) >= 1
        # the darkness model's threshold is 0.2: labelled pixels have probability >= 0.2, the others below
        assert heat[mask == 1].min() >= round(0.2 * 255) - 1 and heat[mask == 0].max() <= round(0.2 * 255) + 1
    # no temporary leftovers: the result folder and the batch summary
    assert sorted(p.name for p in out.iterdir()) == [cmu_slide.stem, "summary.csv", "summary.html"]


def test_second_run_is_skipped_unless_forced(
    cmu_slide: Path, darkness_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--registry",
        str(darkness_registry),
        "run",
        "darkness",
        str(cmu_slide),
        "--out",
        str(tmp_path / "o"),
        "--json",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "skipped"
    assert main([*args, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "ok"


def test_batch_continues_past_a_broken_slide(
    cmu_slide: Path, broken_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run_zoo(
        "--registry",
        str(darkness_registry),
        "run",
        "darkness",
        str(broken_slide),
        str(cmu_slide),
        "--out",
        str(out),
        "--no-progress",
    )
    assert r.returncode == 1
    assert (out / cmu_slide.stem / "mask.tiff").exists()
    assert not (out / broken_slide.stem).exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(broken_slide) in errors[0]
    assert "1 of 2 slides failed" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [cmu_slide.stem, "summary.csv", "summary.html"]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["run", "no-such-model", "x.svs"], 1, "not in the registry"),
        (["run", "peer-tissue-unet@7.0.0", "x.svs"], 1, "has no version"),
        (["run", "peer-tissue-unet", "/nonexistent/slide.svs"], 1, "no such file"),
        (["run"], 2, "usage"),
        (["run", "peer-tissue-unet", "x.svs", "--batch-size", "many"], 2, "not a whole number"),
        (["frobnicate"], 2, "invalid choice"),
        # issue #10 item 11: values that were accepted silently, or failed later without a message
        (["run", "peer-tissue-unet", "x.svs", "--mpp", "0"], 2, "greater than 0"),
        (["run", "peer-tissue-unet", "x.svs", "--mpp", "-1"], 2, "greater than 0"),
        (["run", "peer-tissue-unet", "x.svs", "--mpp", "nan"], 2, "greater than 0"),
        (["run", "peer-tissue-unet", "x.svs", "--slide-mpp", "-1"], 2, "greater than 0"),
        (["run", "peer-tissue-unet", "x.svs", "--level", "-1"], 2, "0 or more"),
        (["run", "peer-tissue-unet", "x.svs", "--min-area-um2", "-5"], 2, "0 or more"),
        (["convert", "a.geojson", "--to", "tiff", "--out", "m.tiff", "--class-map", "Tumor"], 2, "NAME=CLASS"),
        (["edits", "mask.tiff", "e.geojson", "--class-map", "Tumor"], 2, "NAME=CLASS"),
    ],
)
def test_bad_input_exit_codes(args: list[str], code: int, needle: str) -> None:
    r = run_zoo(*args)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_checksum_mismatch_refused(tampered_registry: Path, cmu_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_zoo("--registry", str(tampered_registry), "run", "peer-tissue-unet", str(cmu_slide), "--out", str(out))
    assert r.returncode == 1 and "sha256" in r.stderr and "does not match" in r.stderr
    assert not out.exists()
    r = run_zoo("--registry", str(tampered_registry), "verify")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_unwritable_output(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"  # a file where the output folder should be
    blocker.write_text("")
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(blocker / "x"))
    assert r.returncode == 1 and "writable" in r.stderr
    assert blocker.read_text() == ""


def test_demo_runs_default_model_on_bundled_slide(tmp_path: Path) -> None:
    r = run_zoo("demo", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "cmu-1-small-region" / "run.json").read_text())
    assert run["slide"]["path"].endswith("cmu-1-small-region.svs")


def test_run_at_a_pyramid_level(tcga_slide: Path, tmp_path: Path) -> None:
    r = run_zoo("run", "tissue-multires", str(tcga_slide), "--level", "1", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / tcga_slide.stem / "run.json").read_text())
    assert run["resolution"]["level"] == 1 and run["resolution"]["extra_downsample"] == 1
    assert run["resolution"]["slide_mpp_assumed"] is True
    assert run["slide"]["backend"] == "tifffile"
