"""Never lose data, never pass garbage (issue #10): result paths, collisions, corrupt tiles, resume, leftovers.

Each test builds its own broken input in tmp_path from the small real slides.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import REPO, darkness_registry_text, run_zoo
from zoo.errors import OutputError
from zoo.jobs import JobConfig, result_dirs, run_many, safe_name
from zoo.runner import RunOptions


def _zoo(registry: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_zoo("--registry", str(registry), *args, **kw)


SUMMARY = {"summary.csv", "summary.html"}


def _results(out: Path) -> list[str]:
    """The entries of ``out`` other than the batch summary, sorted."""
    return sorted(p.name for p in out.iterdir() if p.name not in SUMMARY)


def _run_dark(registry: Path, slide: Path | str, out: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`zoo run darkness SLIDE --out OUT EXTRA...` with the test registry."""
    return _zoo(registry, "run", "darkness", str(slide), "--out", str(out), *extra)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1, 2: names


@pytest.mark.parametrize("stem", [".", "..", "...", "", "a/b", "x" * 300, "name with spaces & ü", "-rf"])
def test_safe_name_never_leaves_the_folder(stem: str, tmp_path: Path) -> None:
    name = safe_name(stem)
    assert name and name not in (".", "..") and "/" not in name and not name.startswith(".")
    assert len(name) <= 80
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize("name", ["..svs", "...svs", ".svs.svs", "....tif"])
def test_dot_named_slide_deletes_nothing(
    name: str, kidney_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    """Issue #10.1: a slide named ``...svs`` made the result folder ``..`` and rmtree'd the working folder."""
    root = tmp_path / "r"
    (root / "slides").mkdir(parents=True)
    shutil.copy(kidney_slide, root / "slides" / name)
    (root / "keep.txt").write_text("x")
    before = _tree(root)
    r = _run_dark(darkness_registry, str(root / "slides" / name), str(root), "--no-progress")
    assert r.returncode == 0, r.stderr
    after = _tree(root)
    assert all(after[k] == v for k, v in before.items()), "a file that was there before was changed"
    new_dirs = {p.parent.name for p in (root / k for k in after if k not in before) if p.name not in SUMMARY}
    assert len(new_dirs) == 1 and not next(iter(new_dirs)).startswith(".")
    run = json.loads((root / next(iter(new_dirs)) / "run.json").read_text())
    assert run["source"]["resolved_path"] == str((root / "slides" / name).resolve())


def test_same_stem_gets_separate_folders(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    """Issue #10.2: a/slide.svs and b/slide.svs, case1.svs and case1.tif, Case.svs and case.svs."""
    slides = []
    for rel in ("a/slide.svs", "b/slide.svs", "c/case1.svs", "c/case1.tif", "d/Case.svs", "d/case.svs"):
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cmu_slide, p)
        slides.append(p)
    out = tmp_path / "out"
    r = _zoo(darkness_registry, "run", "darkness", *map(str, slides), "--out", str(out), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["status"] for x in results] == ["ok"] * 6
    dirs = {x["out"] for x in results}
    assert len(dirs) == 6
    for x in results:
        run = json.loads((Path(x["out"]) / "run.json").read_text())
        assert run["source"]["resolved_path"] == str(Path(x["slide"]).resolve())
    # the assignment is deterministic: the same batch maps to the same folders, and a rerun reuses them
    again = json.loads(
        _zoo(darkness_registry, "run", "darkness", *map(str, slides), "--out", str(out), "--json").stdout
    )
    assert [x["status"] for x in again] == ["skipped"] * 6 and {x["out"] for x in again} == dirs


def test_foreign_folder_is_never_written_into(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    mine = out / cmu_slide.stem
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own file")
    r = _run_dark(darkness_registry, str(cmu_slide), str(out), "--json")
    assert r.returncode == 0, r.stderr
    dest = Path(json.loads(r.stdout)[0]["out"])
    assert dest != mine and dest.name.startswith(cmu_slide.stem + "-")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_rerun_replaces_only_its_own_files(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run_dark(darkness_registry, str(cmu_slide), str(out)).returncode == 0
    (out / cmu_slide.stem / "corrected.tiff").write_bytes(b"pathologist's work")
    r = _run_dark(darkness_registry, str(cmu_slide), str(out), "--force", "--json")
    assert json.loads(r.stdout)[0]["status"] == "ok"
    assert (out / cmu_slide.stem / "corrected.tiff").read_bytes() == b"pathologist's work"


def test_interrupted_replacement_is_redone(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    """A run killed while replacing its own files leaves run.json as a marker: the next run redoes the slide."""
    out = tmp_path / "out"
    assert _run_dark(darkness_registry, str(cmu_slide), str(out)).returncode == 0
    run = json.loads((out / cmu_slide.stem / "run.json").read_text())
    marker = {"source": run["source"], "status": "being replaced; rerun to finish"}
    (out / cmu_slide.stem / "run.json").write_text(json.dumps(marker))  # what a kill mid-replacement leaves
    r = _run_dark(darkness_registry, str(cmu_slide), str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)[0]
    assert res["status"] == "ok" and res["out"] == str(out / cmu_slide.stem)
    assert json.loads((out / cmu_slide.stem / "run.json").read_text())["request"]


def test_lock_named_file_that_zoo_did_not_write_survives(
    cmu_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f".{cmu_slide.stem}.zoo-lock"
    mine.write_text("a user's file that happens to have this name")
    assert _run_dark(darkness_registry, cmu_slide, out).returncode == 0
    assert mine.read_text() == "a user's file that happens to have this name"
    assert not list(out.glob(".*.zoo-lock")) or list(out.glob(".*.zoo-lock")) == [mine]  # zoo's own are removed


@pytest.mark.parametrize("kind", ["run.json without a source", "symlink"])
def test_folders_that_are_not_this_slides_are_never_written_into(
    kind: str, cmu_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    from zoo.jobs import JobConfig, run_slide

    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.json").write_text('{"written by": "another tool"}')
    (elsewhere / "mask.tiff").write_bytes(b"precious")
    out.mkdir()
    plain = out / cmu_slide.stem
    if kind == "symlink":
        plain.symlink_to(elsewhere, target_is_directory=True)
    else:
        shutil.copytree(elsewhere, plain)
    r = _run_dark(darkness_registry, cmu_slide, out, "--json")
    assert r.returncode == 0, r.stderr
    assert Path(json.loads(r.stdout)[0]["out"]).name.startswith(cmu_slide.stem + "-")  # a folder of its own
    assert (elsewhere / "mask.tiff").read_bytes() == b"precious" and (plain / "mask.tiff").read_bytes() == b"precious"
    cfg = JobConfig(model="darkness", registry_path=str(darkness_registry), out_dir=str(out))
    with pytest.raises(OutputError, match="does not hold this slide's results"):
        run_slide(cmu_slide, cfg, dest=plain)  # even when told to write there
    assert (elsewhere / "mask.tiff").read_bytes() == b"precious"


# --------------------------------------------------------------------------- 3: corrupt tiles


def _damaged_copy(src: Path, dst: Path, how: str) -> tuple[int, int]:
    """Copy ``src`` and damage its middle level-0 tile; return that tile's (column, row)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as t:
        p = t.pages[0]
        k = len(p.dataoffsets) // 2
        off, cnt = p.dataoffsets[k], p.databytecounts[k]
        across = -(-p.imagewidth // p.tilewidth)
    data = bytearray(dst.read_bytes())
    if how == "flip":
        for i in range(64):
            data[off + cnt // 2 + i] ^= 0xFF
    else:
        data[off : off + cnt] = bytes(cnt)
    dst.write_bytes(bytes(data))
    return k % across, k // across


@pytest.mark.parametrize("how", ["flip", "zero"])
def test_corrupt_tile_fails_the_slide_in_one_line(how: str, darkness_registry: Path, tmp_path: Path) -> None:
    slide = tmp_path / "damaged.svs"
    col, row = _damaged_copy(REPO / "zoo" / "data" / "cmu-1-small-region.svs", slide, how)
    out = tmp_path / "out"
    r = _run_dark(darkness_registry, str(slide), str(out), "--all-tiles", "--no-progress")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert str(slide) in lines[0] and f"column {col}, row {row}" in lines[0] and "--on-bad-tile skip" in lines[0]
    assert not any(p for p in out.iterdir() if not p.name.startswith(".zoo-write")) if out.exists() else True


def test_corrupt_tile_skipped_is_recorded_and_unknown(darkness_registry: Path, tmp_path: Path) -> None:
    from zoo.outputs import read_mask_tiff

    slide = tmp_path / "damaged.svs"
    _damaged_copy(REPO / "zoo" / "data" / "cmu-1-small-region.svs", slide, "flip")
    out = tmp_path / "out"
    r = _run_dark(darkness_registry, str(slide), str(out), "--all-tiles", "--on-bad-tile", "skip")
    assert r.returncode == 0, r.stderr
    assert "undecodable tile" in r.stderr
    run = json.loads((out / "damaged" / "run.json").read_text())
    bad = run["stats"]["bad_tiles"]
    assert len(bad) == 1 and "Corrupt JPEG data" in bad[0]["error"]
    mask, _, _ = read_mask_tiff(out / "damaged" / "mask.tiff")
    x0, y0, x1, y1 = (round(v / run["resolution"]["mask_downsample"]) for v in bad[0]["level0_box_px"])
    assert (mask[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] == 255).all()
    assert (mask == 255).mean() < 0.05


# --------------------------------------------------------------------------- 4: memory


def test_disk_backed_mask_gives_the_same_result(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    """Issue #10.4: past the in-memory limit the label mask lives in a scratch file; results are identical."""
    import zoo.labelmask as lm

    def run(out: Path) -> dict[str, object]:
        cfg = JobConfig(model="darkness", registry_path=str(darkness_registry), out_dir=str(out))
        cfg.run.progress = False
        (res,) = run_many([cmu_slide], cfg)
        assert res.status == "ok", res.error
        return json.loads((Path(res.out or "") / "run.json").read_text())

    mem = run(tmp_path / "mem")
    limit = lm.IN_MEMORY_LIMIT_PX
    lm.IN_MEMORY_LIMIT_PX = 0
    try:
        disk = run(tmp_path / "disk")
    finally:
        lm.IN_MEMORY_LIMIT_PX = limit
    assert mem["classes"] == disk["classes"]
    a = tifffile.imread(tmp_path / "mem" / cmu_slide.stem / "mask.tiff")
    b = tifffile.imread(tmp_path / "disk" / cmu_slide.stem / "mask.tiff")
    assert np.array_equal(a, b)
    fa = json.loads((tmp_path / "mem" / cmu_slide.stem / "annotations.geojson").read_text())["features"]
    fb = json.loads((tmp_path / "disk" / cmu_slide.stem / "annotations.geojson").read_text())["features"]
    assert [f["geometry"] for f in fa] == [f["geometry"] for f in fb]


# --------------------------------------------------------------------------- 5, 6: what the model loads


def _external_data_registry(tmp_path: Path, pin_bin: bool) -> Path:
    import onnx
    import onnx.external_data_helper

    from tests.conftest import make_darkness_onnx
    from zoo.registry import sha256_file

    folder = tmp_path / "models"
    folder.mkdir()
    m = onnx.load(str(make_darkness_onnx(tmp_path / "tmp.onnx")))
    for t in m.graph.initializer:  # the constant 1.0 moves to weights.bin (axes stay inline for shape inference)
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
        if t.name == "one":
            onnx.external_data_helper.set_external_data(t, "weights.bin")
    onnx.save_model(m, str(folder / "dark.onnx"))
    files = f"files: [{{path: weights.bin, sha256: {sha256_file(folder / 'weights.bin')}}}]" if pin_bin else ""
    reg = tmp_path / "registry.yaml"
    reg.write_text(darkness_registry_text("models/dark.onnx", sha256_file(folder / "dark.onnx"), "dark", files))
    return reg


def test_external_data_is_pinned(cmu_slide: Path, tmp_path: Path) -> None:
    """Issue #10.5: tampering with the ONNX file's external data must be caught, and export copies it."""
    reg = _external_data_registry(tmp_path, pin_bin=True)
    out = tmp_path / "out"
    r = _zoo(reg, "run", "dark", str(cmu_slide), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / cmu_slide.stem / "run.json").read_text())
    assert [Path(f["path"]).name for f in run["model"]["files"]] == ["dark.onnx", "weights.bin"]
    exported = _zoo(reg, "export", "fast", "dark", str(tmp_path / "fast"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "fast" / "models" / "weights.bin").read_bytes() == (
        tmp_path / "models" / "weights.bin"
    ).read_bytes()
    data = bytearray((tmp_path / "models" / "weights.bin").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "models" / "weights.bin").write_bytes(bytes(data))
    r = _zoo(reg, "run", "dark", str(cmu_slide), "--out", str(tmp_path / "out2"))
    assert r.returncode == 1 and "weights.bin" in r.stderr and "does not match" in r.stderr
    assert not (tmp_path / "out2").exists()


def test_unpinned_external_data_is_refused(cmu_slide: Path, tmp_path: Path) -> None:
    reg = _external_data_registry(tmp_path, pin_bin=False)
    r = _zoo(reg, "verify")
    assert r.returncode == 1 and "not pinned" in r.stdout


def test_weights_path_cannot_leave_the_registry(darkness_registry: Path, cmu_slide: Path) -> None:
    """Issue #10.6: ``uri: ../../etc/passwd`` is refused before any checksum."""
    text = darkness_registry.read_text().replace("uri: darkness.onnx", "uri: ../../../../etc/passwd")
    darkness_registry.write_text(text)
    r = _zoo(darkness_registry, "verify")
    assert r.returncode == 1 and "outside the registry's folder" in r.stdout
    text = text.replace("uri: ../../../../etc/passwd", "uri: /etc/passwd")
    darkness_registry.write_text(text)
    assert "file://" in _zoo(darkness_registry, "verify").stdout


# --------------------------------------------------------------------------- 7: --slide-mpp


def test_slide_mpp_does_not_override_metadata(
    cmu_slide: Path, tcga_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = _run_dark(darkness_registry, str(cmu_slide), str(out), "--slide-mpp", "0.25")
    assert r.returncode == 1 and "0.499" in r.stderr and "--force-slide-mpp" in r.stderr
    r = _run_dark(
        darkness_registry,
        str(cmu_slide),
        str(out),
        "--slide-mpp",
        "0.25",
        "--force-slide-mpp",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / cmu_slide.stem / "run.json").read_text())["resolution"]
    assert res["slide_mpp"] == 0.25 and res["slide_mpp_source"] == "--slide-mpp" and not res["slide_mpp_assumed"]
    r = _run_dark(darkness_registry, str(tcga_slide), str(out), "--slide-mpp", "0.25")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / tcga_slide.stem / "run.json").read_text())["resolution"]
    assert res["slide_mpp_source"] == "--slide-mpp" and res["slide_mpp"] == 0.25


# --------------------------------------------------------------------------- 8: resume


def test_resume_only_when_request_slide_and_outputs_match(
    cmu_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    slide = tmp_path / "s.svs"
    shutil.copy(cmu_slide, slide)
    out = tmp_path / "out"

    def status(*extra: str) -> tuple[str, str]:
        r = _run_dark(darkness_registry, str(slide), str(out), "--json", *extra)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)[0]
        return res["status"], json.dumps(res["summary"])

    assert status()[0] == "ok"
    assert status()[0] == "skipped"
    st, why = status("--mpp", "4")
    assert st == "ok" and "target_mpp" in why
    st, why = status("--mpp", "4", "--format", "geojson")
    assert st == "ok" and "formats" in why
    (out / "s" / "annotations.geojson").unlink()
    st, why = status("--mpp", "4", "--format", "geojson")
    assert st == "ok" and "annotations.geojson missing" in why
    os.utime(slide, ns=(time.time_ns(), time.time_ns() + 10**9))
    st, why = status("--mpp", "4", "--format", "geojson")
    assert st == "ok" and "slide file changed" in why
    assert status("--mpp", "4", "--format", "geojson")[0] == "skipped"


# --------------------------------------------------------------------------- 9: leftovers, signals, concurrency


def test_stale_partials_of_own_slide_are_removed(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = out / f".{cmu_slide.stem}.abcd1234.partial"
    stale.mkdir(parents=True)
    (stale / ".zoo-partial").write_text("12345\n")
    (stale / "mask.tiff").write_bytes(b"half")
    foreign = out / f".{cmu_slide.stem}.zzzz9999.partial"  # looks alike but zoo did not make it
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    other = out / ".other.abcd1234.partial"  # another slide's, maybe live
    other.mkdir()
    (other / ".zoo-partial").write_text("1\n")
    r = _run_dark(darkness_registry, str(cmu_slide), str(out))
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and (foreign / "data").read_text() == "keep" and other.exists()
    assert "partial result folder" in r.stderr


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_leaves_no_partial(
    sig: int, code: int, word: str, cmu_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    """A signal mid-run exits with 128+N, one line, and leaves nothing in --out.

    The signal lands 0.5 s after the run takes its lock, often while a third-party library imports;
    some wrap optional imports in a bare ``except`` that swallows the handler's exception. The run
    must still stop (it re-raises a remembered stop signal between batches), never finish.
    """
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", "--registry", str(darkness_registry), "run", "darkness",
         str(cmu_slide), "--out", str(out), "--mpp", "0.5", "--all-tiles"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.glob(".*.zoo-lock")):
        time.sleep(0.05)
    time.sleep(0.5)
    assert p.poll() is None, "the run ended before it could be signalled"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(word)
    assert [x.name for x in out.iterdir()] == [], "partial output left behind"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_swallowed_stop_signal_still_stops_the_run(
    sig: int, code: int, cmu_slide: Path, darkness_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library that catches the handler's exception (a bare ``except``) cannot make a run ignore the signal:
    the runner raises it again after that batch, and the run stops with nothing in --out."""
    from zoo import cli, errors, runner

    predict, calls = runner.OnnxModel.predict, []

    def swallowing(self: runner.OnnxModel, x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        try:
            errors.on_stop_signal(sig)  # the signal lands inside a library...
        except BaseException:  # ... that swallows whatever is raised
            pass
        return predict(self, x)

    monkeypatch.setattr(runner.OnnxModel, "predict", swallowing)
    monkeypatch.setattr(errors, "_signals_received", [])  # what this test records never reaches another test
    out = tmp_path / "out"
    rc = cli.main(
        ["--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(out), "--mpp", "1"]
    )
    assert rc == code and len(calls) == 1, f"exit {rc} after {len(calls)} batches: the run went on"
    assert not out.exists() or [x.name for x in out.iterdir()] == [], "partial output left behind"


def test_concurrent_runs_into_one_folder(
    cmu_slide: Path, kidney_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zoo.cli", "--registry", str(darkness_registry), "run", "darkness",
           str(cmu_slide), str(kidney_slide), "--out", str(out), "--json"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    statuses = [r["status"] for o, _ in outs for r in json.loads(o)]
    assert statuses.count("ok") == 2 and statuses.count("skipped") == 6
    assert _results(out) == sorted([cmu_slide.stem, kidney_slide.stem])


# --------------------------------------------------------------------------- 11: one line, never a traceback


def _small_tiff(path: Path, data: np.ndarray, **kw: object) -> Path:
    tifffile.imwrite(path, data, **kw)  # type: ignore[arg-type]
    return path


def _one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.returncode == 1 and len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr
    assert all(n in r.stderr for n in needles), r.stderr
    return lines[0]


def test_grey_alpha_and_bilevel_tiffs_read_correctly(tmp_path: Path) -> None:
    from zoo.slide import open_slide

    grey = np.full((128, 96, 2), 255, np.uint8)
    grey[:64, :, 0] = 40  # dark top half, opaque
    grey[:, :48, 1] = 0  # left half transparent: white
    ga = _small_tiff(tmp_path / "ga.tif", grey, photometric="minisblack", extrasamples=["unassalpha"], tile=(64, 64))
    bits = np.zeros((128, 96), bool)
    bits[:, 48:] = True
    bl = _small_tiff(tmp_path / "bl.tif", bits, photometric="minisblack")
    with open_slide(ga) as s:
        rgb = s.read_region((0, 0), 0, (96, 128))
    assert (rgb[:64, 48:] == 40).all() and (rgb[:, :48] == 255).all() and (rgb[64:, 48:] == 255).all()
    with open_slide(bl) as s:
        rgb = s.read_region((0, 0), 0, (96, 128))
    assert (rgb[:, :48] == 0).all() and (rgb[:, 48:] == 255).all()


def test_header_claiming_missing_tiles_is_refused(tmp_path: Path, darkness_registry: Path) -> None:
    path = _small_tiff(tmp_path / "huge.tif", np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as t:
        t.pages[0].tags["ImageWidth"].overwrite(10**6)
        t.pages[0].tags["ImageLength"].overwrite(10**6)
    t0 = time.perf_counter()
    r = _run_dark(darkness_registry, str(path), str(tmp_path / "o"))
    assert time.perf_counter() - t0 < 60
    _one_error_line(r, str(path))


@pytest.mark.parametrize("mpp", ["1.2.3", "0"])
def test_bad_aperio_mpp_is_treated_as_missing(mpp: str, tmp_path: Path, darkness_registry: Path) -> None:
    desc = f"Aperio Image Library v12.0.0 \r\n256x256 [0,0 256x256] (64x64) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
    img = np.full((256, 256, 3), 230, np.uint8)
    img[64:192, 64:192] = (150, 80, 160)
    path = _small_tiff(tmp_path / "s.svs", img, tile=(64, 64), photometric="rgb", compression="jpeg", description=desc)
    r = run_zoo("inspect", str(path), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    info = json.loads(r.stdout)
    assert info["mpp"] is None and mpp in info["mpp_note"]
    r = _run_dark(darkness_registry, str(path), str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stderr
    assert "no resolution metadata" in r.stderr


def test_registry_env_pointing_at_a_folder_or_binary(tmp_path: Path) -> None:
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    for target, needle in ((tmp_path, "is a folder"), (bad, "not UTF-8")):
        r = run_zoo("list", env={**os.environ, "ZOO_REGISTRY": str(target)})
        _one_error_line(r, needle)


def test_verify_with_missing_test_file_or_folder_weights(darkness_registry: Path, tmp_path: Path) -> None:
    text = darkness_registry.read_text()
    darkness_registry.write_text(text + "    test: {input: nothere.npy, expected: nothere2.npy}\n")
    r = _zoo(darkness_registry, "verify")
    assert r.returncode == 1 and "nothere.npy" in r.stdout and "Traceback" not in r.stderr
    (tmp_path / "wdir").mkdir()
    darkness_registry.write_text(text.replace("uri: darkness.onnx", "uri: wdir"))
    r = _zoo(darkness_registry, "verify")
    assert r.returncode == 1 and "is a folder" in r.stdout


def test_level_out_of_range_is_one_line(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    r = _run_dark(darkness_registry, str(cmu_slide), str(tmp_path / "o"), "--level", "99")
    _one_error_line(r, "--level 99 does not exist", "0..0")


def test_no_space_left_is_one_line(
    cmu_slide: Path,
    darkness_registry: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import errno

    from zoo import cli

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", full)
    out = tmp_path / "out"
    rc = cli.main(
        ["--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "no space left" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # nothing partial


def test_convert_onto_a_folder_and_export_into_a_file(tmp_path: Path, cmu_slide: Path, darkness_registry: Path) -> None:
    out = tmp_path / "o"
    assert _run_dark(darkness_registry, str(cmu_slide), str(out)).returncode == 0
    folder = tmp_path / "existing"
    folder.mkdir()
    r = run_zoo("convert", str(out / cmu_slide.stem / "mask.tiff"), "--to", "geojson", "--out", str(folder))
    _one_error_line(r, "is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _zoo(darkness_registry, "export", "fast", "darkness", str(blocker / "fp"))
    _one_error_line(r, "cannot write")


def test_unreachable_scheduler_is_one_line(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed", reason="dask[distributed] not installed (pip install '.[dask]')")
    r = _run_dark(
        darkness_registry,
        str(cmu_slide),
        str(tmp_path / "o"),
        "--scheduler",
        "tcp://127.0.0.1:9",
    )
    _one_error_line(r, "cannot reach the Dask scheduler")


def test_out_checked_before_inference(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("")
    t0 = time.perf_counter()
    r = _run_dark(darkness_registry, str(cmu_slide), str(blocker))
    _one_error_line(r, "is a file, not a folder")
    assert time.perf_counter() - t0 < 30


# --------------------------------------------------------------------------- 12: --json stdout


def test_json_stdout_is_only_json(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    base = ["run", "darkness", str(cmu_slide), "--out", str(tmp_path / "o")]
    r = _zoo(darkness_registry, *base, "--providers", "FooExecutionProvider", "--json")
    assert r.returncode == 1 and r.stdout == "" and "FooExecutionProvider" in r.stderr
    r = _zoo(darkness_registry, *base, "--providers", "CUDAExecutionProvider")
    if r.returncode == 1:
        assert "pip install" in r.stderr  # no silent CPU fallback when CUDA was asked for
    r = _run_dark(darkness_registry, str(cmu_slide), str(tmp_path / "o"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["status"] == "ok"


def test_result_dirs_stay_inside_out(tmp_path: Path) -> None:
    slides = [tmp_path / n for n in ("..svs", "...svs", "a.svs", "A.svs")]
    dirs = result_dirs(slides, tmp_path / "out")
    assert len(set(dirs.values())) == 4
    assert all(d.resolve().parent == (tmp_path / "out").resolve() for d in dirs.values())
    assert dirs[slides[2]].name != "a" and dirs[slides[3]].name != "A"  # case-only difference: both tagged
    cfg = JobConfig(out_dir=str(tmp_path / "out"), run=RunOptions())
    assert cfg.on_bad_tile == "fail"


def _mixed_folder(root: Path, cmu: Path, kidney: Path, tcga: Path, broken: Path) -> dict[str, bool]:
    """A folder of good and bad slides; name -> whether it should succeed."""
    root.mkdir(parents=True)
    shutil.copy(cmu, root / "case1.svs")
    shutil.copy(kidney, root / "case1.tif")  # same stem as case1.svs
    shutil.copy(kidney, root / "...svs")  # dot name
    shutil.copy(tcga, root / "no-resolution.svs")
    shutil.copy(broken, root / "broken.svs")
    data = cmu.read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    _damaged_copy(cmu, root / "corrupt-tile.svs", "flip")
    (root / "empty.svs").write_bytes(b"")
    return {
        "case1.svs": True,
        "case1.tif": True,
        "...svs": True,
        "no-resolution.svs": True,
        "broken.svs": False,
        "truncated.svs": False,
        "corrupt-tile.svs": False,
        "empty.svs": False,
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_folder_serial_and_on_dask(
    workers: int, cmu_slide: Path, kidney_slide: Path, tcga_slide: Path, broken_slide: Path, darkness_registry: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The issue's acceptance run: every good slide complete, every bad one one line, nothing else touched."""
    if workers:
        pytest.importorskip("dask.distributed", reason="dask[distributed] not installed (pip install '.[dask]')")
    expect = _mixed_folder(tmp_path / "slides", cmu_slide, kidney_slide, tcga_slide, broken_slide)
    before = _tree(tmp_path / "slides")
    out = tmp_path / "out"
    args = ["run", "darkness", str(tmp_path / "slides"), "--out", str(out), "--all-tiles", "--json"]
    r = _zoo(darkness_registry, *args, "--workers", str(workers))
    assert r.returncode == 1
    results = {Path(x["slide"]).name: x for x in json.loads(r.stdout)}
    assert set(results) == set(expect)
    for name, good in expect.items():
        assert (results[name]["status"] == "ok") is good, (name, results[name])
        if good:
            d = Path(results[name]["out"])
            assert d.parent == out and {"mask.tiff", "annotations.geojson", "run.json"} <= {p.name for p in d.iterdir()}
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 4 and all(any(n in e for e in errors) for n, g in expect.items() if not g)
    assert _tree(tmp_path / "slides") == before
    assert set(_results(out)) == {Path(x["out"]).name for x in results.values() if x["status"] == "ok"}
    again = json.loads(_zoo(darkness_registry, *args).stdout)
    assert sorted(x["status"] for x in again) == ["failed"] * 4 + ["skipped"] * 4


def test_kill_9_then_rerun_finishes_the_rest(
    cmu_slide: Path, kidney_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for k in range(3):
        shutil.copy(cmu_slide, slides / f"s{k}.svs")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zoo.cli", "--registry", str(darkness_registry), "run", "darkness", str(slides),
           "--out", str(out), "--mpp", "1", "--all-tiles"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "s0" / "run.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # now inside s1
    p.kill()
    p.communicate()
    first = json.loads((out / "s0" / "run.json").read_text())["created"]
    r = _run_dark(darkness_registry, str(slides), str(out), "--mpp", "1", "--all-tiles", "--json")
    assert r.returncode == 0, r.stderr
    status = {Path(x["slide"]).name: x["status"] for x in json.loads(r.stdout)}
    assert status["s0.svs"] == "skipped" and status["s2.svs"] == "ok"
    assert json.loads((out / "s0" / "run.json").read_text())["created"] == first
    assert _results(out) == ["s0", "s1", "s2"]  # the killed run's partial is gone


# --------------------------------------------------------------------------- two models, one slide (issue 22, 2)


@pytest.fixture()
def two_model_registry(tmp_path: Path) -> Path:
    """Two pointwise models (``darkness``, ``lightness``) in one registry."""
    from tests.conftest import darkness_registry_text, make_darkness_onnx
    from zoo.registry import sha256_file

    w = make_darkness_onnx(tmp_path / "darkness.onnx")
    first = darkness_registry_text(w.name, sha256_file(w), "darkness")
    second = darkness_registry_text(w.name, sha256_file(w), "lightness").replace("threshold: 0.2", "threshold: 0.5")
    reg = tmp_path / "two.yaml"
    reg.write_text(first + second.split("models:\n", 1)[1], encoding="utf-8")
    return reg


def _complete(folder: Path, model: str) -> None:
    run = json.loads((folder / "run.json").read_text())
    assert run["model"]["id"].startswith(model + "@"), (folder, run["model"]["id"])
    names = {p.name for p in folder.iterdir()}
    assert {"mask.tiff", "annotations.geojson", "classes.csv", "overview.png", "probability_Tissue.tiff"} <= names


def test_second_model_on_the_same_slide_keeps_the_first(
    cmu_slide: Path, two_model_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    a = _zoo(two_model_registry, "run", "darkness", str(cmu_slide), "--out", str(out), "--json")
    first = _tree(out / cmu_slide.stem)
    b = _zoo(two_model_registry, "run", "lightness", str(cmu_slide), "--out", str(out), "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    da, db = Path(json.loads(a.stdout)[0]["out"]), Path(json.loads(b.stdout)[0]["out"])
    assert da != db and db.name == f"{cmu_slide.stem}-lightness"
    assert {k: v for k, v in _tree(da).items()} == first  # the first model's result is untouched
    _complete(da, "darkness")
    _complete(db, "lightness")
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted(r["model"] for r in rows) == ["darkness@0.1.0", "lightness@0.1.0"]
    # resume works for both: each rerun is skipped into its own folder
    for model, folder in (("darkness", da), ("lightness", db)):
        again = json.loads(_zoo(two_model_registry, "run", model, str(cmu_slide), "--out", str(out), "--json").stdout)
        assert again[0]["status"] == "skipped" and Path(again[0]["out"]) == folder


def test_two_models_at_once_on_one_slide(cmu_slide: Path, two_model_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zoo.cli",
                "--registry",
                str(two_model_registry),
                "run",
                m,
                str(cmu_slide),
                "--out",
                str(out),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in ("darkness", "lightness", "darkness", "lightness")
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    folders = {m: {json.loads(o)[0]["out"] for (o, _), mm in zip(outs, ["darkness", "lightness"] * 2) if mm == m}
               for m in ("darkness", "lightness")}  # fmt: skip
    assert all(len(v) == 1 for v in folders.values()) and folders["darkness"] != folders["lightness"]
    for m, (folder,) in folders.items():
        _complete(Path(folder), m)


# ------------------------------------------------------------------ odd geometry, honest messages (issue 22, 8-9)


def _rgb_tiff(path: Path, h: int, w: int, mpp: float = 0.5) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 235, np.uint8)
    img[:, : max(1, w // 2)] = rng.integers(60, 160, (h, max(1, w // 2), 3), dtype=np.uint8)  # tissue-dark half
    tifffile.imwrite(path, img, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize(("h", "w"), [(1, 3000), (3000, 1), (1, 1)])
def test_thin_and_one_pixel_slides_run_in_bounded_memory(
    h: int, w: int, darkness_registry: Path, tmp_path: Path
) -> None:
    slide = _rgb_tiff(tmp_path / f"thin_{h}x{w}.tif", h, w)
    out = tmp_path / "out"
    r = _run_dark(darkness_registry, slide, out, "--json", "--mpp", "0.5")
    assert "out of memory" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    res = Path(json.loads(r.stdout)[0]["out"])
    from PIL import Image

    with Image.open(res / "overview.png") as im:  # the canvas is bounded whatever the aspect
        assert im.size[0] <= 970 and im.size[1] <= 2030, im.size


def test_coarse_reads_go_in_strips(cmu_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model region far coarser than any level is read in strips of bounded size, with the same pixels."""
    from zoo import slide as slide_mod
    from zoo.slide import box_reduce, choose_level, level_region, open_slide, read_scaled

    with open_slide(cmu_slide) as s:
        choice = choose_level(s, target_mpp=16.0)  # one level: a factor of 32 on level 0
        assert choice.factor >= 16
        whole = box_reduce(level_region(s, choice, 0, 0, 40, 30), choice.factor)
        sizes: list[int] = []
        real = s.read_region

        def counting(loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
            sizes.append(size[0] * size[1] * 3)
            return real(loc, level, size)

        monkeypatch.setattr(s, "read_region", counting)
        monkeypatch.setattr(slide_mod, "MAX_REGION_BYTES", 1 << 20)
        strips = read_scaled(s, choice, 0, 0, 40, 30)
    assert np.array_equal(strips, whole) and len(sizes) > 1 and max(sizes) <= 1 << 20


def test_resolution_warnings_are_printed_and_recorded(cmu_slide: Path, tmp_path: Path) -> None:
    """--mpp finer than the slide, or far from what the model was trained at: a warning line, and run.json says so."""
    from tests.conftest import make_darkness_onnx
    from zoo.registry import sha256_file

    w = make_darkness_onnx(tmp_path / "d.onnx")
    text = darkness_registry_text(w.name, sha256_file(w)).replace(
        "target_mpp: 2.0}", "target_mpp: 2.0, trained_mpp: [2.0]}"
    )
    reg = tmp_path / "r.yaml"
    reg.write_text(text)
    for mpp, words in (("0.1", "finer than this slide's finest level"), ("64", "far from what it was trained at")):
        out = tmp_path / f"out{mpp}"
        r = _zoo(reg, "run", "darkness", str(cmu_slide), "--out", str(out), "--mpp", mpp, "--json")
        assert r.returncode == 0, r.stderr
        assert any(ln.startswith("warning:") and words in ln for ln in r.stderr.splitlines()), r.stderr
        run = json.loads((Path(json.loads(r.stdout)[0]["out"]) / "run.json").read_text())
        assert any(words in x for x in run["warnings"])


@pytest.mark.parametrize("task", ["tissue-segmentation", "tumour-segmentation"])
def test_found_none_hint_is_for_tissue_models_only(task: str, cmu_slide: Path, tmp_path: Path) -> None:
    from tests.conftest import make_darkness_onnx
    from zoo.registry import sha256_file

    w = make_darkness_onnx(tmp_path / "d.onnx")
    text = darkness_registry_text(w.name, sha256_file(w)).replace("threshold: 0.2", "threshold: 0.99")
    reg = tmp_path / "r.yaml"
    reg.write_text(text.replace("task: tissue-segmentation", f"task: {task}"))
    r = _zoo(reg, "run", "darkness", str(cmu_slide), "--out", str(tmp_path / "o"), "--mpp", "2")
    assert r.returncode == 0, r.stderr
    hint = [ln for ln in r.stderr.splitlines() if "found none" in ln]
    if task == "tumour-segmentation":
        assert hint == []  # "no tumour" is an answer, not a hint to go finer
    else:
        assert (len(hint) == 1 and "at 2 µm/px" in hint[0]) or "at 1.996 µm/px" in hint[0], hint


def test_cascade_mask_is_never_finer_than_the_slide(cmu_slide: Path, tmp_path: Path) -> None:
    from zoo.slide import open_slide

    with open_slide(cmu_slide) as s:
        crop = s.read_region((600, 600), 0, (256, 256))
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, crop, photometric="rgb", resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    r = run_zoo("run", "tumour-h2g", str(small), "--out", str(out), "--json", "--mpp", "0.5")
    assert r.returncode == 0, r.stderr
    run = json.loads((Path(json.loads(r.stdout)[0]["out"]) / "run.json").read_text())
    assert run["resolution"]["mask_mpp"] >= run["resolution"]["slide_mpp"] * 0.999


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_models_and_slides_serial_and_on_dask(
    workers: int, cmu_slide: Path, broken_slide: Path, tmp_path: Path
) -> None:
    """Issue 22's acceptance run: good, NaN and mismatched models over odd slides; every good result complete,
    every bad one one line, no input changed, nothing written for a model whose entry disagrees with its graph."""
    if workers:
        pytest.importorskip("dask.distributed", reason="dask[distributed] not installed (pip install '.[dask]')")
    from tests.conftest import classifier_registry_text, make_broken_onnx, make_darkness_onnx
    from zoo.registry import sha256_file

    good, nan = make_darkness_onnx(tmp_path / "good.onnx"), make_broken_onnx(tmp_path / "nan.onnx", "nan-classifier")
    entries = [
        darkness_registry_text(good.name, sha256_file(good), "darkness"),
        classifier_registry_text(nan.name, sha256_file(nan), "nanclf"),
        darkness_registry_text(good.name, sha256_file(good), "mismatch").replace(
            "input_name: image,", "input_name: image, layout: NHWC,"
        ),
    ]
    reg = tmp_path / "r.yaml"
    reg.write_text(entries[0] + "".join(e.split("models:\n", 1)[1] for e in entries[1:]))
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_slide, slides / "case 1 ü & co.svs")
    shutil.copy(broken_slide, slides / "broken.svs")
    _rgb_tiff(slides / "one-pixel.tif", 1, 1)
    _rgb_tiff(slides / "thin.tif", 1, 3000)
    before = _tree(slides)
    flags = ["--all-tiles", "--json", "--workers", str(workers)]
    for model, ok in (("darkness", {"case 1 ü & co.svs", "one-pixel.tif", "thin.tif"}), ("nanclf", set())):
        out = tmp_path / f"out-{model}"
        r = _zoo(reg, "run", model, str(slides), "--out", str(out), *flags)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        results = {Path(x["slide"]).name: x for x in json.loads(r.stdout)}
        assert {n for n, x in results.items() if x["status"] == "ok"} == ok, results
        for name, x in results.items():
            if name in ok:
                _complete(Path(x["out"]), model)
            else:
                assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:") and name in ln]) == 1
        assert set(_results(out)) == {Path(x["out"]).name for x in results.values() if x["status"] == "ok"}
    out = tmp_path / "out-mismatch"
    r = _zoo(reg, "run", "mismatch", str(slides), "--out", str(out), *flags)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "input.layout" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())
    assert _tree(slides) == before


def test_all_failed_batch_prints_no_picture_line(broken_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    slides = tmp_path / "s"
    slides.mkdir()
    for k in range(2):
        shutil.copy(broken_slide, slides / f"b{k}.svs")
    r = _run_dark(darkness_registry, slides, tmp_path / "out")
    assert r.returncode == 1 and "pictures of every slide" not in r.stderr, r.stderr
    assert "2 of 2 slides failed" in r.stderr


def test_cascade_later_stage_is_checked_before_any_slide(cmu_slide: Path, tmp_path: Path) -> None:
    """A tampered refinement stage fails once, up front, not once per slide of the batch."""
    from zoo.registry import load_registry

    reg = load_registry()
    dst = tmp_path / "reg"
    for family in ("tumour-h2g", "tumour-tiles"):  # 1.1.0's patch stage is tumour-tiles 1.2.0's file
        shutil.copytree(reg.root / "models" / family, dst / "models" / family)
    text = (reg.root / "registry.yaml").read_text()
    (dst / "registry.yaml").write_text(text)
    refine = dst / "models/tumour-h2g/1.0.0/refine.onnx"
    data = bytearray(refine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    refine.write_bytes(bytes(data))
    slides = tmp_path / "slides"
    slides.mkdir()
    for k in range(2):
        shutil.copy(cmu_slide, slides / f"s{k}.svs")
    reg_path = str(dst / "registry.yaml")
    r = run_zoo("--registry", reg_path, "run", "tumour-h2g", str(slides), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "refine.onnx" in r.stderr, r.stderr
