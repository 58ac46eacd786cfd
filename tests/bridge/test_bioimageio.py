"""bioimage.io packages: every eligible registered model passes bioimage.io's own `bioimageio test`
(ONNX and TorchScript weights, from the package's test tensors), and nothing a user made is replaced."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from bridge.bioimageio import MANIFEST, RDF, check_eligible, export_bioimageio
from tests.conftest import REPO, run_zoo
from zoo.errors import ExportError, OutputExistsError
from zoo.registry import ModelEntry, load_registry

pytest.importorskip("torch", reason="the TorchScript weights are traced with torch (extra 'train')")

REG = load_registry()
#: bioimage.io's checker, in its own venv (scripts/setup.sh makes it from .ci/bioimageio-requirements.txt)
BIOIMAGEIO = Path(os.environ.get("ZOO_BIOIMAGEIO", REPO / ".venv-bioimageio" / "bin" / "bioimageio"))


def _eligible(entry: ModelEntry) -> bool:
    try:
        check_eligible(entry)
    except ExportError:
        return False
    return True


ELIGIBLE = [e.id for e in REG.models if _eligible(e)]
INELIGIBLE = [e.id for e in REG.models if not _eligible(e)]


def test_the_segmentation_models_are_eligible() -> None:
    assert {"tissue-multires@1.0.0", "cd-unet@1.0.0", "peer-tissue-unet@1.0.0"} <= set(ELIGIBLE)


@pytest.mark.parametrize("model", ELIGIBLE)
def test_package_passes_bioimageio_test(model: str, tmp_path: Path) -> None:
    entry = REG.get(model)
    dest = export_bioimageio(entry, REG, tmp_path)
    rdf = yaml.safe_load((dest / RDF).read_text())
    # every file the description names is there with its sha256
    named = [t["test_tensor"] for t in rdf["inputs"] + rdf["outputs"]] + list(rdf["weights"].values())
    for item in named:
        assert hashlib.sha256((dest / item["source"]).read_bytes()).hexdigest() == item["sha256"]
    space = [a for a in rdf["inputs"][0]["axes"] if a["type"] == "space"]
    if entry.input.target_mpp:
        assert {a["unit"] for a in space} == {"micrometer"} and {a["scale"] for a in space} == {entry.input.target_mpp}
    assert "# Validation" in (dest / "README.md").read_text()
    if not BIOIMAGEIO.exists():
        pytest.skip(f"bioimage.io's checker is not at {BIOIMAGEIO}: run scripts/setup.sh (or set ZOO_BIOIMAGEIO)")
    summary = tmp_path / "summary.json"
    r = subprocess.run(
        [str(BIOIMAGEIO), "test", str(dest / RDF), "--summary", str(summary)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["status"] == "passed", json.dumps(result)[:3000]
    tested = {d["name"] for d in result["details"]}
    assert any("(onnx)" in n for n in tested) and any("(torchscript)" in n for n in tested), sorted(tested)


def test_test_input_is_the_registrys_test_as_pixels(tmp_path: Path) -> None:
    entry = REG.get("tissue-multires")
    dest = export_bioimageio(entry, REG, tmp_path)
    pixels = np.load(dest / "test_input.npy")
    assert entry.test is not None
    registry_x = np.load(REG.resolve(entry.test.input))[:1]
    assert pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels * entry.input.scale, registry_x, atol=1e-6)


@pytest.mark.parametrize("model", INELIGIBLE)
def test_others_are_refused_with_one_line(model: str, tmp_path: Path) -> None:
    r = run_zoo("export", "bioimageio", model, "--out", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    entry = REG.get("tissue-multires")
    mine = tmp_path / f"{entry.name}-{entry.version}"
    mine.mkdir()
    (mine / RDF).write_text("name: my own package\n")
    for force in (False, True):
        with pytest.raises(OutputExistsError):
            export_bioimageio(entry, REG, tmp_path, force=force)
    assert (mine / RDF).read_text() == "name: my own package\n" and not (mine / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
