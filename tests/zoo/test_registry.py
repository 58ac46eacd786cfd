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


# --------------------------------------------------------------------------- the entry/ONNX contract (issue 22, 4)


TISSUE_LINE = "      - {index: 1, name: Tissue, color: [0, 160, 0]}"
BUNDLED_SLIDE = Path(__file__).parents[2] / "zoo" / "data" / "cmu-1-small-region.svs"


def _contract_registry(tmp_path: Path, edit: dict[str, str], onnx_kind: str = "darkness") -> Path:
    from tests.conftest import darkness_registry_text, make_darkness_onnx
    from zoo.registry import sha256_file

    w = make_darkness_onnx(tmp_path / "m.onnx") if onnx_kind == "darkness" else tmp_path / "m.onnx"
    if onnx_kind == "empty":
        w.write_bytes(b"")
    text = darkness_registry_text(w.name, sha256_file(w))
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    reg = tmp_path / "registry.yaml"
    reg.write_text(text)
    return reg


@pytest.mark.parametrize(
    ("edit", "onnx_kind", "words"),
    [
        # 3 classes declared on a 1-channel sigmoid graph
        (
            {
                TISSUE_LINE: TISSUE_LINE + "\n      - {index: 2, name: Tumor, color: [200, 0, 0]}",
                "activation: sigmoid": "activation: sigmoid, channels: 2",
            },
            "darkness",
            "output.channels",
        ),
        (
            {"activation: sigmoid": "activation: softmax, channels: 2"},
            "darkness",
            "output.channels",
        ),  # softmax-2 on 1 channel
        ({"input_name: image,": "input_name: image, layout: NHWC,"}, "darkness", "input.layout"),
        ({"input_name: image,": "input_name: pixels,"}, "darkness", "input.input_name"),
        ({"output_name: prob": "output_name: probabilities"}, "darkness", "output.output_name"),
        ({"patch_size_px: [64, 64]": "patch_size_px: [128, 128]"}, "darkness", "patch_size_px"),
        ({}, "empty", "ONNX"),  # a 0-byte .onnx file and no bundled test
    ],
)
def test_entry_that_disagrees_with_its_graph_is_refused(
    edit: dict[str, str], onnx_kind: str, words: str, tmp_path: Path
) -> None:
    """`zoo verify` and `zoo run` refuse with one line naming the entry and the field, never 'ok', never a traceback."""
    from tests.conftest import run_zoo

    reg = _contract_registry(tmp_path, edit, onnx_kind)
    for args in (["verify"], ["run", "darkness", str(BUNDLED_SLIDE), "--out", str(tmp_path / "out")]):
        r = run_zoo("--registry", str(reg), *args)
        text = r.stdout + r.stderr
        assert r.returncode != 0 and "Traceback" not in text and "unexpected error" not in text, text
        assert "ok  " not in r.stdout and words in text and "darkness@0.1.0" in text, text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        (
            "[{index: 0, name: Background, color: [0,0,0]}, {index: 1, name: Tissue, color: [0,0,0]},"
            " {index: 2, name: Tissue, color: [0,0,0]}]",
            "duplicate class name",
        ),
        (
            '[{index: 0, name: Background, color: [0,0,0]}, {index: 1, name: "Tumour A", color: [0,0,0]},'
            ' {index: 2, name: "tumour_a", color: [0,0,0]}]',
            "same file name",
        ),
        (
            "[{index: 0, name: Background, color: [0,0,0]},"
            " {index: 1, name: Exclude, color: [0,0,0], qupath_name: Tumor},"
            " {index: 2, name: Tumor, color: [0,0,0]}]",
            "both answer to",
        ),
    ],
)
def test_class_names_that_would_merge_are_refused(classes: str, words: str, tmp_path: Path) -> None:
    reg = _contract_registry(tmp_path, {})
    text = reg.read_text()
    start = text.index("    classes:")
    end = text.index("    input:")
    reg.write_text(
        text[:start]
        + f"    classes: {classes}\n"
        + text[end:].replace("activation: sigmoid", "activation: softmax, channels: 3")
    )
    with pytest.raises(RegistryError, match=words):
        load_registry(reg)


@pytest.mark.parametrize("size", ["[0, 0]", "[-64, 64]", "[100000, 64]"])
def test_patch_size_must_be_positive(size: str, tmp_path: Path) -> None:
    reg = _contract_registry(tmp_path, {"patch_size_px: [64, 64]": f"patch_size_px: {size}"})
    with pytest.raises(RegistryError, match="patch_size_px"):
        load_registry(reg)


def test_graph_checks_are_remembered_for_the_same_files_and_declarations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the graph (external data, the declared inputs and outputs) is remembered under the files'
    sha256 and the entry's declarations: the sha256 is always checked, the graph is read again for other
    declarations or with remembering off."""
    import zoo.registry as registry

    monkeypatch.setenv("ZOO_CHECK_CACHE", "1")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_VERIFIED", {})
    reg = load_registry()
    entry = reg.get("tumour-tiles@1.2.0")
    registry.verified_model_files(entry, reg)
    assert len(list((tmp_path / "checks").glob("graph-*.json"))) == 1

    def read_again(*_: object) -> list[str]:
        raise AssertionError("the graph was read again")

    monkeypatch.setattr(registry, "onnx_external_data", read_again)
    registry._VERIFIED.clear()
    registry.verified_model_files(entry, reg)  # remembered
    changed = entry.model_copy(update={"output": entry.output.model_copy(update={"channels": 3})})
    with pytest.raises(AssertionError, match="read again"):
        registry.verified_model_files(changed, reg)
    monkeypatch.setattr(registry, "sha256_file", lambda _: "0" * 64)  # the file changed on disk
    registry._VERIFIED.clear()
    with pytest.raises(ChecksumMismatchError):
        registry.verified_model_files(entry, reg)
    monkeypatch.undo()
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "onnx_external_data", read_again)
    for off in ("ZOO_CHECK_CACHE=0", "zoo verify"):
        monkeypatch.setenv("ZOO_CHECK_CACHE", "0" if off == "ZOO_CHECK_CACHE=0" else "1")
        monkeypatch.setattr(registry, "_VERIFIED", {})
        with pytest.raises(AssertionError, match="read again"):
            if off == "zoo verify":
                verify_model(entry, reg)
            else:
                registry.verified_model_files(entry, reg)
