"""FAST text pipelines (``.fpl``): parse, write, and render them from a registry entry.

Grammar (FAST's doc/pages/FAST-Text-Pipelines.md): line based; ``#`` starts a
comment; a block starts with ``ProcessObject <id> <Type>``, ``Renderer <id> <Type>``
or ``View <id> <renderer>...``; ``Attribute <name> <value...>`` and
``Input <port> <object> [<output port>]`` lines belong to the block above them;
``PipelineName``, ``PipelineDescription``, ``PipelineInputData <id> "<desc>"`` and
``PipelineOutputData <id> <object> <port>`` (which may carry attributes too) are
header lines. ``@@name[=default]@@`` are parameters. Attribute values are kept as
the raw text after the name, so writing a parsed pipeline preserves its meaning.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from zoo.errors import FplError, OutputError
from zoo.outputs import guard_outputs
from zoo.registry import ModelEntry, Registry, verified_model_files

BLOCK_KINDS = ("ProcessObject", "Renderer", "View", "PipelineInputData", "PipelineOutputData")
PARAM = re.compile(r"@@([A-Za-z0-9_.-]+)(?:=([^@]*))?@@")


@dataclass
class Block:
    """One object (or input/output declaration) of a pipeline."""

    kind: str
    id: str
    args: list[str] = field(default_factory=list)
    attributes: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[tuple[int, str, int]] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        for k, v in self.attributes:
            if k == name:
                return v
        return None


@dataclass
class Pipeline:
    """A parsed ``.fpl``: name, description and blocks in file order."""

    name: str = ""
    description: str = ""
    blocks: list[Block] = field(default_factory=list)

    def block(self, block_id: str, kind: str | None = None) -> Block:
        for b in self.blocks:
            if b.id == block_id and (kind is None or b.kind == kind):
                return b
        raise KeyError(block_id)

    def parameters(self) -> dict[str, str | None]:
        """``@@name=default@@`` parameters and their defaults (None: required)."""
        out: dict[str, str | None] = {}
        for b in self.blocks:
            for _, v in b.attributes:
                for m in PARAM.finditer(v):
                    out.setdefault(m.group(1), m.group(2))
        return out


def _split(line: str, source: str, lineno: int) -> list[str]:
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as err:
        raise FplError(f"{source}:{lineno}: cannot tokenise {line!r} ({err}); check the quotes") from err


def parse_fpl(text: str, source: str = "<fpl>") -> Pipeline:
    """Parse FAST text-pipeline source.

    Raises:
        FplError: a line outside any block, an unknown keyword or a malformed line.
    """
    pipe = Pipeline()
    current: Block | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "PipelineName":
            pipe.name = " ".join(_split(rest, source, lineno))
        elif keyword == "PipelineDescription":
            pipe.description = " ".join(_split(rest, source, lineno))
        elif keyword in BLOCK_KINDS:
            toks = _split(rest, source, lineno)
            if not toks:
                raise FplError(f"{source}:{lineno}: {keyword} needs an id; write `{keyword} <id> ...`")
            current = Block(keyword, toks[0], toks[1:])
            pipe.blocks.append(current)
        elif keyword == "Attribute":
            if current is None:
                raise FplError(f"{source}:{lineno}: Attribute before any object; put it under its ProcessObject")
            name, _, value = rest.partition(" ")
            current.attributes.append((name, value.strip()))
        elif keyword == "Input":
            if current is None:
                raise FplError(f"{source}:{lineno}: Input before any object; put it under its ProcessObject")
            toks = _split(rest, source, lineno)
            if len(toks) not in (2, 3) or not toks[0].isdigit() or (len(toks) == 3 and not toks[2].isdigit()):
                raise FplError(f"{source}:{lineno}: expected `Input <port> <object> [<port>]`, got {line!r}")
            current.inputs.append((int(toks[0]), toks[1], int(toks[2]) if len(toks) == 3 else 0))
        else:
            raise FplError(
                f"{source}:{lineno}: unknown keyword {keyword!r}; expected one of "
                f"PipelineName, PipelineDescription, {', '.join(BLOCK_KINDS)}, Attribute, Input"
            )
    return pipe


def read_fpl(path: str | Path) -> Pipeline:
    """Parse a ``.fpl`` file (see :func:`parse_fpl`)."""
    p = Path(path)
    try:
        return parse_fpl(p.read_text(encoding="utf-8"), str(p))
    except FileNotFoundError as err:
        raise FplError(f"{p}: no such file; check the path") from err


def _quote(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def write_fpl(pipe: Pipeline) -> str:
    """FAST text-pipeline source for ``pipe`` (blocks separated by blank lines)."""
    lines: list[str] = []
    if pipe.name:
        lines.append(f"PipelineName {_quote(pipe.name)}")
    if pipe.description:
        lines.append(f"PipelineDescription {_quote(pipe.description)}")
    for b in pipe.blocks:
        if b.kind in ("ProcessObject", "Renderer", "View") or (lines and not lines[-1].startswith("Pipeline")):
            lines.append("")
        args = " ".join(_quote(a) if (" " in a or a == "") else a for a in b.args)
        lines.append(f"{b.kind} {b.id}{' ' + args if args else ''}")
        lines.extend(f"Attribute {k} {v}".rstrip() for k, v in b.attributes)
        lines.extend(f"Input {port} {src} {src_port}" for port, src, src_port in b.inputs)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rendering from the registry


def check_exportable(entry: ModelEntry) -> None:
    """Refuse models FAST cannot feed, with the reason.

    FAST's NeuralNetwork feeds one RGB (or grey) image per patch, scaled by a single
    scale-factor (and one mean/std), in the layout the ONNX graph declares.

    Raises:
        FplError: the entry's input cannot be produced by a FAST pipeline.
    """
    spec = entry.input
    if spec.channel_order == "BGR":
        raise FplError(f"{entry.id}: FAST feeds RGB; a BGR model cannot be exported (re-export it taking RGB)")
    if len(set(spec.mean)) > 1 or len(set(spec.std)) > 1:
        raise FplError(
            f"{entry.id}: per-channel mean/std {spec.mean}/{spec.std} cannot be expressed by FAST's single "
            "scale-factor/mean/std; fold the normalisation into the ONNX graph and register scale only"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.:/-]+", spec.input_name + entry.output.output_name):
        raise FplError(
            f"{entry.id}: node names {spec.input_name!r}/{entry.output.output_name!r} contain characters "
            "FAST's attribute syntax cannot hold; rename the ONNX nodes"
        )
    if entry.output.activation == "none":
        raise FplError(f"{entry.id}: FAST needs probabilities; export the model with its sigmoid/softmax")
    if entry.context_inputs:
        raise FplError(
            f"{entry.id}: FAST cannot feed a tile together with a centred context tile at another resolution "
            "(each PatchGenerator streams its own patches, and NeuralNetwork does not pair two streams by "
            "position); run it with `zoo run`"
        )
    if entry.kind not in ("segmentation", "multi-input"):
        check_exportable_stages(entry)


def _magnification(mpp: float) -> float:
    """Objective magnification FAST associates with ``mpp`` (10x = 1.0 µm/px)."""
    return round(10.0 / mpp, 4)


def check_exportable_stages(entry: ModelEntry) -> None:
    """Refuse patch-classification and cascade entries FAST cannot run, with the reason.

    FAST's PatchStitcher stitches one classification vector per patch into a heatmap; a later stage
    is a network fed by the slide's lowest pyramid level and/or the first stage's heatmap, each
    resized by FAST to the network's input size and multiplied by one scale-factor.
    """
    for st in entry.stages:
        where = f"{entry.id} stage {st.name!r}"
        if len(set(st.input.mean)) > 1 or len(set(st.input.std)) > 1 or st.input.mean[0] != 0 or st.input.std[0] != 1:
            raise FplError(
                f"{where}: FAST feeds later stages with one scale-factor only; fold mean/std into the ONNX graph"
            )
        for src in st.sources:
            if src.source not in ("slide", entry.stage_name):
                raise FplError(f"{where}: FAST pipelines here feed later stages from the slide or the first stage only")
        names = [st.feeds(src) for src in st.sources]
        if len(set(names)) != len(names):
            raise FplError(f"{where}: FAST feeds one image per network input; give each source its own input_name")


def _stage_model_paths(entry: ModelEntry, model_path: str | dict[str, str] | None) -> dict[str, str]:
    if isinstance(model_path, dict):
        return model_path
    if model_path is not None:
        return {entry.stage_name: model_path}
    return {name: f"$CURRENT_PATH$/../models/{_model_file(entry, name)}" for name, _ in entry.networks()}


def _model_file(entry: ModelEntry, stage: str) -> str:
    """File name of a stage's ONNX in a FastPathology folder."""
    return f"{entry.name}.onnx" if stage == entry.stage_name else f"{entry.name}-{stage}.onnx"


def _render_patchwise(entry: ModelEntry, variant: str, engine: str, paths: dict[str, str]) -> Pipeline:
    """Patch classification (and a cascade's later stages) as FAST objects; see :func:`render_pipeline`."""
    check_exportable_stages(entry)
    spec = entry.input
    assert spec.target_mpp is not None
    w, h = spec.patch_size_px
    order = sorted(entry.classes, key=lambda c: c.index)
    fg = [k for k, c in enumerate(order) if c.index != 0]
    blocks: list[Block] = []
    if variant == "fastpathology":
        blocks.append(Block("PipelineInputData", "WSI", ["Whole-slide image"]))
    else:
        blocks.append(Block("ProcessObject", "WSI", ["WholeSlideImageImporter"], [("filename", "@@wsi@@")]))
    blocks += [
        Block("ProcessObject", "tissueSeg", ["TissueSegmentation"], inputs=[(0, "WSI", 0)]),
        # FAST's PatchStitcher cannot stitch overlapping classification vectors (it stops with "Width
        # must be larger than 0"), and it has no entropy-rails selector: every tissue tile, no overlap.
        Block(
            "ProcessObject",
            "patch",
            ["PatchGenerator"],
            [
                ("patch-size", f"{w} {h}"),
                ("patch-magnification", repr(_magnification(spec.target_mpp))),
                ("patch-overlap", "0.0"),
                ("mask-threshold", "0.02"),
            ],
            [(0, "WSI", 0), (1, "tissueSeg", 0)],
        ),
        Block(
            "ProcessObject",
            "network",
            ["NeuralNetwork"],
            [
                ("model", _quote(paths[entry.stage_name])),
                ("scale-factor", repr(spec.scale)),
                ("inference-engine", engine),
            ],
            [(0, "patch", 0)],
        ),
        Block("ProcessObject", "stitcher", ["PatchStitcher"], inputs=[(0, "network", 0)]),
        Block("ProcessObject", "finish", ["RunUntilFinished"], inputs=[(0, "stitcher", 0)]),
        Block("ProcessObject", "heatmap", ["TensorToImage"], [("channels", str(fg[0]))], [(0, "finish", 0)]),
    ]
    result, result_is_heatmap = "heatmap", True
    for st in entry.stages:
        feeds: list[tuple[str, str]] = []
        for src in st.sources:
            if src.source == "slide":
                blocks.append(
                    Block("ProcessObject", "lowRes", ["ImagePyramidLevelExtractor"], [("level", "-1")], [(0, "WSI", 0)])
                )
                feeds.append((st.feeds(src), "lowRes"))
            else:
                feeds.append((st.feeds(src), "heatmap"))
        # FAST orders a network's input ports by input name
        inputs = [(port, obj, 0) for port, (_, obj) in enumerate(sorted(feeds))]
        blocks.append(
            Block(
                "ProcessObject",
                st.name,
                ["SegmentationNetwork"],
                [
                    ("model", _quote(paths[st.name])),
                    ("scale-factor", repr(st.input.scale)),
                    ("inference-engine", engine),
                ],
                inputs,
            )
        )
        result, result_is_heatmap = st.name, False
    if variant == "export":
        blocks.append(
            Block("ProcessObject", "exporter", ["MetaImageExporter"], [("filename", "@@output@@")], [(0, result, 0)])
        )
    else:
        blocks.append(
            Block(
                "PipelineOutputData",
                "segmentation" if not result_is_heatmap else "heatmap",
                [result if not result_is_heatmap else "stitcher", "0"],
                [("classes", _quote(";".join(c.name for c in order)))],
            )
        )
        blocks += [
            Block("Renderer", "imgRenderer", ["ImagePyramidRenderer"], inputs=[(0, "WSI", 0)]),
            Block("Renderer", "heatmapRenderer", ["HeatmapRenderer"], inputs=[(0, "stitcher", 0)]),
        ]
        if not result_is_heatmap:
            blocks.append(_segmentation_renderer(entry, result))
    name = f"{entry.name} {entry.version}" + (" (export)" if variant == "export" else "")
    return Pipeline(name, entry.summary, blocks)


def render_pipeline(
    entry: ModelEntry,
    variant: str = "fastpathology",
    engine: str = "ONNXRuntime",
    model_path: str | dict[str, str] | None = None,
) -> Pipeline:
    """A FAST pipeline that runs ``entry`` as the runner does.

    Args:
        variant: ``fastpathology`` (the WSI comes from the app, results are rendered) or
            ``export`` (headless: ``@@wsi@@`` in, TIFF pyramid ``@@output@@`` out).
        engine: FAST inference engine (ONNXRuntime, OpenVINO, TensorRT).
        model_path: model file as FAST should see it (default: the FastPathology folder layout);
            for a cascade, stage name -> path.

    Patch-classification and cascade entries export a heatmap (``.mhd``, first foreground class)
    or the last stage's label image (``.mhd``) in the ``export`` variant.
    """
    check_exportable(entry)
    if entry.kind in ("patch-classification", "cascade"):
        return _render_patchwise(entry, variant, engine, _stage_model_paths(entry, model_path))
    assert not isinstance(model_path, dict)
    spec, out = entry.input, entry.output
    model_attr = _quote(model_path or f"$CURRENT_PATH$/../models/{entry.name}.onnx")
    blocks: list[Block] = []
    if variant == "fastpathology":
        blocks.append(Block("PipelineInputData", "WSI", ["Whole-slide image"]))
        classes = _quote(";".join(c.name for c in sorted(entry.classes, key=lambda c: c.index)))
        blocks.append(
            Block(
                "PipelineOutputData",
                "segmentation",
                ["stitcher" if spec.mode == "tiled" else "network", "0"],
                [("classes", classes)],
            )
        )
    else:
        blocks.append(Block("ProcessObject", "WSI", ["WholeSlideImageImporter"], [("filename", "@@wsi@@")]))
    net_attrs = [
        ("model", model_attr),
        ("scale-factor", repr(spec.scale)),
        ("inference-engine", engine),
        ("threshold", repr(out.threshold)),
    ]
    if spec.mean[0] != 0.0:
        net_attrs.append(("mean-intensity", repr(spec.mean[0])))
    if spec.std[0] != 1.0:
        net_attrs.append(("std-intensity", repr(spec.std[0])))
    if spec.mode == "tiled":
        assert spec.target_mpp is not None
        w, h = spec.patch_size_px
        patch_attrs = [
            ("patch-size", f"{w} {h}"),
            ("patch-magnification", repr(_magnification(spec.target_mpp))),
            ("patch-overlap", repr(spec.overlap)),
        ]
        patch_inputs = [(0, "WSI", 0)]
        if entry.task != "tissue-segmentation":
            # Skip glass with FAST's tissue detector. Not for tissue models: they are the tissue
            # detector, and FAST's threshold drops pale tissue (Dice 0.80 vs 0.99 with `zoo run`).
            blocks.append(Block("ProcessObject", "tissueSeg", ["TissueSegmentation"], inputs=[(0, "WSI", 0)]))
            patch_attrs.append(("mask-threshold", "0.02"))
            patch_inputs.append((1, "tissueSeg", 0))
        blocks += [
            Block("ProcessObject", "patch", ["PatchGenerator"], patch_attrs, patch_inputs),
            Block("ProcessObject", "network", ["SegmentationNetwork"], net_attrs, [(0, "patch", 0)]),
            Block("ProcessObject", "stitcher", ["PatchStitcher"], inputs=[(0, "network", 0)]),
        ]
        result = "stitcher"
        if variant == "export":
            # Headless: wait for the last patch, then export once (FAST streams patches otherwise).
            blocks.append(Block("ProcessObject", "finish", ["RunUntilFinished"], inputs=[(0, "stitcher", 0)]))
            result = "finish"
    else:
        blocks += [
            Block("ProcessObject", "lowRes", ["ImagePyramidLevelExtractor"], [("level", "-1")], [(0, "WSI", 0)]),
            Block("ProcessObject", "network", ["SegmentationNetwork"], net_attrs, [(0, "lowRes", 0)]),
        ]
        result = "network"
    if variant == "export":
        exporter = "TIFFImagePyramidExporter" if spec.mode == "tiled" else "ImageFileExporter"
        blocks.append(Block("ProcessObject", "exporter", [exporter], [("filename", "@@output@@")], [(0, result, 0)]))
    else:
        blocks += [
            Block("Renderer", "imgRenderer", ["ImagePyramidRenderer"], inputs=[(0, "WSI", 0)]),
            _segmentation_renderer(entry, result),
        ]
    name = f"{entry.name} {entry.version}" + (" (export)" if variant == "export" else "")
    return Pipeline(name, entry.summary, blocks)


def _segmentation_renderer(entry: ModelEntry, source: str) -> Block:
    """FAST's SegmentationRenderer with the entry's class colours (background not drawn)."""
    colours = " ".join(f'"{c.index}" "{_hex(c.color)}"' for c in entry.classes if c.index != 0)
    return Block(
        "Renderer",
        "segRenderer",
        ["SegmentationRenderer"],
        [("opacity", "0.4"), ("border-opacity", "0.8"), ("label-colors", colours)],
        [(0, source, 0)],
    )


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def fast_folder_files(entry: ModelEntry, dest: Path) -> list[Path]:
    """Every file :func:`export_fast_folder` writes for ``entry`` into ``dest``."""
    models = [dest / "models" / f"{entry.name}.onnx"]
    models += [dest / "models" / _model_file(entry, name) for name, _ in entry.networks()[1:]]
    models += [dest / "models" / spec.path for spec in entry.weights.files]
    pipes = [dest / "pipelines" / f"{entry.name}{suffix}.fpl" for suffix in ("", "_export")]
    return [*models, *pipes, dest / "models" / f"{entry.name}.txt"]


def export_fast_folder(
    entry: ModelEntry, registry: Registry, dest: Path, engine: str = "ONNXRuntime", force: bool = False
) -> list[Path]:
    """Write a FastPathology model folder for ``entry``.

    Layout: ``pipelines/<name>.fpl`` (for the app), ``pipelines/<name>_export.fpl``
    (headless, ``@@wsi@@``/``@@output@@``), ``models/<name>.onnx`` (sha256-verified copy)
    and ``models/<name>.txt`` (FastPathology's legacy key:value model config).

    Raises:
        OutputExistsError: one of those files exists already and ``force`` is off (nothing is written).
    """
    files = verified_model_files(entry, registry)
    check_exportable(entry)
    guard_outputs(fast_folder_files(entry, dest), files, force)
    written: list[Path] = []
    try:
        (dest / "pipelines").mkdir(parents=True, exist_ok=True)
        (dest / "models").mkdir(parents=True, exist_ok=True)
        onnx_dest = dest / "models" / f"{entry.name}.onnx"
        shutil.copyfile(files[0], onnx_dest)
        written.append(onnx_dest)
        for name, view in entry.networks()[1:]:
            stage_dest = dest / "models" / _model_file(entry, name)
            shutil.copyfile(verified_model_files(view, registry)[0], stage_dest)
            written.append(stage_dest)
        for spec, src in zip(entry.weights.files, files[1:]):  # external data, at the path the ONNX file names
            p = dest / "models" / spec.path
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, p)
            written.append(p)
        for variant, suffix in (("fastpathology", ""), ("export", "_export")):
            p = dest / "pipelines" / f"{entry.name}{suffix}.fpl"
            p.write_text(write_fpl(render_pipeline(entry, variant, engine)), encoding="utf-8")
            written.append(p)
        cfg = dest / "models" / f"{entry.name}.txt"
        cfg.write_text(model_config_txt(entry, engine), encoding="utf-8")
        written.append(cfg)
    except OSError as err:
        raise OutputError(
            f"{dest}: cannot write the FastPathology folder ({err.strerror}); choose a writable folder"
        ) from err
    return written


def model_config_txt(entry: ModelEntry, engine: str = "ONNXRuntime") -> str:
    """FastPathology's legacy ``key:value`` model config (as in NoCodeSeg's example)."""
    spec = entry.input
    w, h = spec.patch_size_px
    classes = sorted(entry.classes, key=lambda c: c.index)
    rows = {
        "model_name": entry.name,
        "name": entry.name,
        "task": entry.summary,
        "problem": "classification" if entry.kind == "patch-classification" else "segmentation",
        "resolution": "high" if spec.mode == "tiled" else "low",
        "magnification_level": f"{_magnification(spec.target_mpp):g}" if spec.target_mpp else "",
        "mask_threshold": "0.02",
        "patch_overlap": f"{spec.overlap:g}",
        "batch_size": "1",
        "input_img_size_x": str(w),
        "input_img_size_y": str(h),
        "nb_channels": str(spec.channels),
        "nb_classes": str(len(classes)),
        "input_node": spec.input_name,
        "output_node": entry.output.output_name,
        "class_colors": ";".join(",".join(str(v) for v in c.color) for c in classes),
        "class_names": ";".join(c.name for c in classes),
        "interpolation": "0",
        "scale_factor": f"{spec.scale!r}",
        "cpu": "1",
        "IE": engine,
    }
    return "\n".join(f"{k}:{v}" for k, v in rows.items()) + "\n"


def repo_pipeline_files(entry: ModelEntry, engine: str = "ONNXRuntime", versioned: bool = False) -> dict[str, str]:
    """The ``pipelines/`` files kept for ``entry``: file name -> text.

    ``<name>.fpl`` for a model's newest version; ``versioned`` (an older version kept in the registry):
    ``<name>-<version>.fpl``, so each registered version keeps its own pipeline.
    Model paths are ``$CURRENT_PATH$/../<weights.uri>``, which resolves both in a
    checkout (``pipelines/`` beside ``models/``) and in the installed package
    (``zoo/pipelines`` beside ``zoo/models``).
    """
    model_path: str | dict[str, str] = f"$CURRENT_PATH$/../{entry.weights.uri}"
    if entry.stages:
        model_path = {name: f"$CURRENT_PATH$/../{view.weights.uri}" for name, view in entry.networks()}
    stem = f"{entry.name}-{entry.version}" if versioned else entry.name
    return {
        f"{stem}.fpl": write_fpl(render_pipeline(entry, "fastpathology", engine, model_path)),
        f"{stem}_export.fpl": write_fpl(render_pipeline(entry, "export", engine, model_path)),
    }
