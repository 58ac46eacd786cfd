"""FAST text pipelines: real files round-trip; rendered pipelines stay in sync and refuse what FAST can't feed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.fpl import check_exportable, export_fast_folder, parse_fpl, read_fpl, repo_pipeline_files, write_fpl
from tests.conftest import REPO, SHARED
from zoo.errors import FplError, OutputExistsError
from zoo.registry import ModelEntry, load_registry

REAL_FPL = sorted(SHARED.glob("fpl/*/*.fpl"))


@pytest.mark.skipif(not REAL_FPL, reason=f"no real .fpl files under {SHARED}/fpl")
@pytest.mark.parametrize("path", REAL_FPL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_pipelines_round_trip(path: Path) -> None:
    pipe = read_fpl(path)
    assert pipe.blocks
    again = parse_fpl(write_fpl(pipe))
    assert again == pipe
    # every Input refers to an object defined in the file or declared as pipeline input
    ids = {b.id for b in pipe.blocks}
    for b in pipe.blocks:
        for _, src, _ in b.inputs:
            assert src in ids or src in {"WSI"}, (b.id, src)


def test_h2g_net_details() -> None:
    path = SHARED / "fpl/FP-DSA-plugin/breast_tumour_segmentation.fpl"
    if not path.exists():
        pytest.skip(f"{path} absent")
    pipe = read_fpl(path)
    assert pipe.block("patch").attribute("patch-size") == "256 256"
    assert pipe.block("network").attribute("model").startswith("@@model@@")
    assert pipe.block("lowRes").inputs == [(0, "WSI", 0)]
    assert set(pipe.parameters()) == {"input", "model", "output"}
    out = next(b for b in pipe.blocks if b.kind == "PipelineOutputData" and b.id == "heatmap")
    assert out.args == ["finish", "0"]


@pytest.mark.parametrize(
    "text",
    ["Attribute x 1\n", "ProcessObject a B\nInput zero b 0\n", "Frobnicate a b\n", 'ProcessObject a "B\n'],
)
def test_malformed_fpl(text: str) -> None:
    with pytest.raises(FplError):
        parse_fpl(text, "bad.fpl")


@pytest.mark.parametrize("model", [m.id for m in load_registry().models if not m.context_inputs])
def test_kept_pipelines_match_registry(model: str) -> None:
    reg = load_registry()
    entry = reg.get(model)
    older = entry.version != reg.versions(entry.name)[-1]  # an older version keeps <name>-<version>.fpl
    for name, text in repo_pipeline_files(entry, versioned=older).items():
        kept = REPO / "pipelines" / name
        assert kept.exists(), f"{kept} missing: run `zoo export pipelines`"
        assert parse_fpl(kept.read_text()) == parse_fpl(text), f"{kept} is stale: run `zoo export pipelines`"


def test_export_folder_never_replaces_files_unless_force(tmp_path: Path) -> None:
    """A user's own pipeline of the same name is kept (nothing at all is written) until --force."""
    reg = load_registry()
    entry = reg.get(None)
    mine = tmp_path / "pipelines" / f"{entry.name}.fpl"
    mine.parent.mkdir()
    mine.write_text("PipelineName 'my own edited pipeline'\n")
    with pytest.raises(OutputExistsError, match="--force"):
        export_fast_folder(entry, reg, tmp_path)
    assert mine.read_text().startswith("PipelineName 'my own") and not (tmp_path / "models").exists()
    written = export_fast_folder(entry, reg, tmp_path, force=True)
    assert mine in written and "my own" not in mine.read_text()


def test_export_folder_layout(tmp_path: Path) -> None:
    reg = load_registry()
    entry = reg.get(None)
    written = export_fast_folder(entry, reg, tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == sorted(
        [
            f"models/{entry.name}.onnx",
            f"models/{entry.name}.txt",
            f"pipelines/{entry.name}.fpl",
            f"pipelines/{entry.name}_export.fpl",
        ]
    )
    exp = read_fpl(tmp_path / "pipelines" / f"{entry.name}_export.fpl")
    assert set(exp.parameters()) == {"wsi", "output"}
    app = read_fpl(tmp_path / "pipelines" / f"{entry.name}.fpl")
    assert any(b.kind == "PipelineInputData" and b.id == "WSI" for b in app.blocks)
    net = app.block("network")
    assert float(net.attribute("scale-factor") or 0) == pytest.approx(entry.input.scale)
    assert net.attribute("model") == f'"$CURRENT_PATH$/../models/{entry.name}.onnx"'
    cfg = (tmp_path / "models" / f"{entry.name}.txt").read_text()
    assert f"input_node:{entry.input.input_name}" in cfg and "class_names:Background;Tissue" in cfg


def _variant(**changes: object) -> ModelEntry:
    base = load_registry().get(None).model_dump()
    for key, value in changes.items():
        section, field = key.split("__")
        base[section] = {**base[section], field: value}
    return ModelEntry(**base)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"input__channel_order": "BGR"}, "FAST feeds RGB"),
        ({"input__mean": (0.1, 0.2, 0.3)}, "per-channel mean"),
        ({"output__activation": "none", "output__already_activated": False}, "needs probabilities"),
        ({"input__input_name": "in put"}, "cannot hold"),
    ],
)
def test_unexportable_models_are_refused(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(FplError, match=reason):
        check_exportable(_variant(**changes))


def test_tissue_mask_gates_only_non_tissue_models() -> None:
    from bridge.fpl import render_pipeline

    tissue = render_pipeline(load_registry().get("tissue-multires"), "export")
    assert all(b.id != "tissueSeg" for b in tissue.blocks)
    other = render_pipeline(_task("semantic-segmentation"), "export")
    assert other.block("tissueSeg").args == ["TissueSegmentation"]
    assert (1, "tissueSeg", 0) in other.block("patch").inputs
    assert other.block("patch").attribute("mask-threshold") == "0.02"


def _task(task: str) -> ModelEntry:
    return ModelEntry(**{**load_registry().get("tissue-multires").model_dump(), "task": task})


def test_export_folder_of_a_cascade_copies_every_stage(tmp_path: Path) -> None:
    reg = load_registry()
    entry = reg.get("tumour-h2g")
    written = export_fast_folder(entry, reg, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"models/tumour-h2g.onnx", "models/tumour-h2g-refine.onnx", "pipelines/tumour-h2g_export.fpl"} <= names
    pipe = parse_fpl((tmp_path / "pipelines" / "tumour-h2g.fpl").read_text())
    refine = pipe.block("refine", "ProcessObject")
    # FAST orders a network's ports by input name: heatmap (0) before image (1)
    assert refine.inputs == [(0, "heatmap", 0), (1, "lowRes", 0)]
    assert refine.attribute("model") == '"$CURRENT_PATH$/../models/tumour-h2g-refine.onnx"'


def test_cascade_fast_export_refuses_what_fast_cannot_feed() -> None:
    from zoo.errors import FplError
    from zoo.registry import ModelEntry

    data = load_registry().get("tumour-h2g").model_dump(mode="json")
    st = dict(data["stages"][0])
    st["input"] = {**st["input"], "mean": [0.5, 0.5, 0.5, 0.5]}
    data["stages"] = [st]
    with pytest.raises(FplError, match=r"stage 'refine'.*scale-factor"):
        check_exportable(ModelEntry.model_validate(data))


def test_multi_input_models_are_refused_with_the_reason() -> None:
    from zoo.errors import FplError

    entry = load_registry().get("multilevel-unet")
    with pytest.raises(FplError, match="centred context tile"):
        check_exportable(entry)
    assert not (REPO / "pipelines" / "multilevel-unet.fpl").exists()
