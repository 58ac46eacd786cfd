"""Registry validation, lookup, checksum refusal and the bundled reproducibility tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zoo.errors import ChecksumMismatchError, ModelNotFoundError, RegistryError, WeightsNotFoundError
from zoo.registry import load_registry, semver_key, verified_weights
from zoo.verify import verify_model


def test_bundled_registry_loads() -> None:
    reg = load_registry()
    assert reg.default_model in reg.names()
    for m in reg.models:
        assert m.id == f"{m.name}@{m.version}"
        assert m.weights.sha256 and m.licence and m.provenance
        assert reg.resolve(m.weights.uri).exists()


def test_get_by_name_version_and_errors() -> None:
    reg = load_registry()
    default = reg.get(None)
    assert reg.get(default.name).id == default.id
    assert reg.get(default.id) is default
    with pytest.raises(ModelNotFoundError) as exc:
        reg.get("no-such-model")
    assert isinstance(exc.value, KeyError) and "zoo list" in str(exc.value)
    with pytest.raises(ModelNotFoundError, match=r"no version '9\.9\.9'"):
        reg.get(f"{default.name}@9.9.9")


def test_semver_ordering() -> None:
    assert sorted(["1.10.0", "1.2.0", "1.2.0-rc.1"], key=semver_key) == ["1.2.0-rc.1", "1.2.0", "1.10.0"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("version: 0.1.0", "version: one"), "not semver"),
        (("licence: MIT", "licence_typo: MIT"), "licence"),
        (("threshold: 0.2", "threshold: 2"), "threshold"),
        (("default_model: darkness", "default_model: other"), "default_model"),
    ],
)
def test_malformed_entries_are_refused(darkness_registry: Path, edit: tuple[str, str], message: str) -> None:
    text = darkness_registry.read_text().replace(*edit)
    darkness_registry.write_text(text)
    with pytest.raises(RegistryError, match=message) as exc:
        load_registry(darkness_registry)
    assert str(darkness_registry) in str(exc.value)


def test_yaml_syntax_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(bad)
    with pytest.raises(RegistryError, match="not found"):
        load_registry(tmp_path / "absent.yaml")


def test_checksum_mismatch_is_refused(tampered_registry: Path) -> None:
    reg = load_registry(tampered_registry)
    with pytest.raises(ChecksumMismatchError, match="does not match") as exc:
        verified_weights(reg.get(None), reg)
    assert isinstance(exc.value, ValueError)


def test_missing_weights(darkness_registry: Path) -> None:
    (darkness_registry.parent / "darkness.onnx").unlink()
    reg = load_registry(darkness_registry)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        verified_weights(reg.get("darkness"), reg)


@pytest.mark.parametrize("model", [m.id for m in load_registry().models])
def test_bundled_models_reproduce(model: str) -> None:
    reg = load_registry()
    result = verify_model(reg.get(model), reg)
    assert result["ok"], result


def test_registry_import_is_light() -> None:
    code = (
        "import sys, zoo.registry, zoo.slide, bridge.geojson, bridge.fpl; "
        "print('onnxruntime' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
