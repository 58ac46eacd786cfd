"""The model registry: typed, versioned entries in ``registry.yaml`` with pinned weights.

Import cost is pydantic + yaml only (no onnxruntime, no side effects). Weights are
resolved relative to the registry file (``models/...``; a relative path may not leave
the registry's folder), as explicit absolute ``file://`` paths, or ``https://`` URLs
fetched into a cache on first use. Every file a model loads is pinned: the ONNX file
and each external-data file it references (``weights.files``), each checked against
its sha256 before use; an ONNX file that references an unpinned file, or one outside
its own folder, is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zoo.errors import ChecksumMismatchError, ModelNotFoundError, RegistryError, WeightsNotFoundError

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
RGB = Annotated[tuple[int, int, int], Field(description="colour as (red, green, blue), 0-255")]
MAX_PATCH_PX = 16384


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(_Strict):
    """One output class: its label value in masks, its name (QuPath classification) and colour."""

    index: int = Field(ge=0, le=255)
    name: str = Field(min_length=1)
    color: RGB
    qupath_name: str | None = Field(
        None, description="QuPath classification if not ``name`` (e.g. 'Ignore*' for regions to leave out)"
    )

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"colour {v} has a channel outside 0-255")
        return v


class CiteSpec(_Strict):
    """A work to cite with the model (its paper, its training data), with a DOI or a URL."""

    text: str = Field(min_length=1)
    doi: str | None = Field(None, pattern=r"^10\.[0-9]{4,}/\S+$", description="DOI without the https://doi.org/")
    url: str | None = Field(None, pattern=r"^https?://\S+$")

    @model_validator(mode="after")
    def _doi_or_url(self) -> CiteSpec:
        if not (self.doi or self.url):
            raise ValueError(f"cite {self.text!r}: give a doi or a url")
        return self


class InputSpec(_Strict):
    """What the network expects.

    ``mode: tiled`` runs overlapping ``patch_size_px`` tiles at ``target_mpp`` (or a
    pyramid level); ``mode: whole-slide`` resizes the whole slide to ``patch_size_px``.
    Pixel values fed are ``(rgb * scale - mean) / std`` per channel.
    """

    mode: Literal["tiled", "whole-slide"] = "tiled"
    patch_size_px: tuple[int, int] = Field(description="(width, height)")
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the patch shared with a neighbour")
    channels: int = Field(3, ge=1, le=4)
    channel_order: Literal["RGB", "BGR", "grey"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input_name: str
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    target_mpp: float | None = Field(None, gt=0, description="µm per pixel the model runs at by default")
    trained_mpp: list[float] = Field(default_factory=list, description="resolutions (µm/px) seen in training")
    multiresolution: bool = False
    batch_dynamic: bool = True

    @field_validator("patch_size_px")
    @classmethod
    def _positive_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(not 1 <= s <= MAX_PATCH_PX for s in v):
            raise ValueError(f"patch_size_px {list(v)} must be 1-{MAX_PATCH_PX} px on each side")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.mode == "tiled" and self.target_mpp is None:
            raise ValueError("a tiled model needs target_mpp")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, one per channel")
        return self


class OutputSpec(_Strict):
    """What the network returns: per-class maps after ``activation``, thresholded at ``threshold``."""

    output_name: str
    activation: Literal["sigmoid", "softmax", "none"]
    layout: Literal["NCHW", "NHWC", "NC"] = Field("NCHW", description="NC: one vector per patch (classifiers)")
    channels: int = Field(1, ge=1)
    threshold: float = Field(
        0.5, gt=0, lt=1,
        description="probability from which a pixel is the class (sigmoid; softmax over background and one class)",
    )  # fmt: skip
    already_activated: bool = Field(True, description="the ONNX graph ends with the activation")


class WeightFile(_Strict):
    """A file the ONNX model loads beside itself (external tensor data), pinned by sha256."""

    path: str = Field(description="relative to the ONNX file's folder, as the ONNX file names it")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class WeightsSpec(_Strict):
    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = Field(None, gt=0)
    format: Literal["onnx"] = "onnx"
    files: list[WeightFile] = Field(default_factory=list, description="external-data files the ONNX file loads")

    @field_validator("files")
    @classmethod
    def _inside(cls, v: list[WeightFile]) -> list[WeightFile]:
        for f in v:
            p = Path(f.path)
            if p.is_absolute() or ".." in p.parts or not p.parts:
                raise ValueError(f"weights file {f.path!r} must be a relative path inside the model's folder")
        return v


Precision = Literal["fp32", "bf16", "fp16", "int8"]


class PrecisionSpec(_Strict):
    """A precision the model may run at, on which engines, and what it must reproduce.

    Verified on the bundled test input against the float32 reference output: the label
    mask's Dice (per foreground class, thresholded/argmaxed as the runner does), the share of
    label pixels that agree, and the largest absolute difference of the probabilities. A
    threshold below the defaults says why in ``reason`` (what was measured on held-out data).
    """

    engines: list[str] = Field(default_factory=lambda: ["onnxruntime"], min_length=1)
    min_dice: float = Field(1.0, ge=0, le=1, description="label-mask Dice against float32 on the bundled test")
    min_agreement: float = Field(
        0.0, ge=0, le=1, description="share of the bundled test's label pixels equal to float32's"
    )
    max_abs_diff: float = Field(1e-4, gt=0, description="largest |probability difference| against float32")
    reason: str | None = Field(None, description="why these thresholds hold: the held-out figures they rest on")
    weights: WeightsSpec | None = Field(
        None, description="a converted copy of the network this precision runs (int8: quantised), pinned by sha256"
    )
    made_by: str | None = Field(None, description="the command that made ``weights`` from the fp32 file")

    @model_validator(mode="after")
    def _lower_thresholds_say_why(self) -> PrecisionSpec:
        if (self.min_dice < 0.999 or 0 < self.min_agreement < 0.999) and not self.reason:
            raise ValueError(
                f"min_dice {self.min_dice} / min_agreement {self.min_agreement} are below 0.999: add a reason "
                "naming the held-out figures (and their command) that show the precision keeps the model's quality"
            )
        if self.weights is not None and not self.made_by:
            raise ValueError(
                f"weights {self.weights.uri!r} need made_by: the command that made them from the fp32 file"
            )
        return self

    @field_validator("engines")
    @classmethod
    def _known_engines(cls, v: list[str]) -> list[str]:
        from zoo.engines import ENGINES  # the engine names only: no engine is imported

        unknown = [e for e in v if e not in ENGINES]
        if unknown:
            raise ValueError(f"unknown engine(s) {unknown}; use {', '.join(ENGINES)}")
        return v


class TestSpec(_Strict):
    """Bundled reproducibility check for ``zoo verify``."""

    input: str = Field(description="npy file: one batch in the model's input layout, already normalised")
    expected: str = Field(description="npy file: the model's output for it")
    atol: float = Field(1e-4, gt=0)


class EntropyRails(_Strict):
    """Seed 001's tile selector: keep a tile only if its grey-level entropy (bits) lies on or between the rails."""

    min_bits: float = Field(ge=0, le=8)
    max_bits: float = Field(ge=0, le=8)
    source: str = Field(description="where the rails were learned")

    @model_validator(mode="after")
    def _ordered(self) -> EntropyRails:
        if self.min_bits > self.max_bits:
            raise ValueError(f"entropy rails min_bits {self.min_bits} > max_bits {self.max_bits}")
        return self


class SelectionSpec(_Strict):
    """Which tiles are classified: the tissue pre-mask (glass skipped) and optional entropy rails."""

    tissue_premask: bool = True
    entropy_rails: EntropyRails | None = None


class StageSource(_Strict):
    """One input of a cascade stage: the slide, or one class's probability map from an earlier stage."""

    source: str = Field(description="'slide' or the name of an earlier stage")
    class_name: str | None = Field(None, description="for a stage source: which class's probability")
    input_name: str | None = Field(
        None,
        description="the ONNX input it feeds (default: the stage's input.input_name); "
        "sources of one input are concatenated",
    )

    @property
    def channels(self) -> int:
        """Channels it feeds: RGB for the slide, one probability map for a stage's class."""
        return 3 if self.source == "slide" else 1


class StageSpec(_Strict):
    """A later stage of a cascade: its own network, input spec, pinned weights and bundled test.

    Each source is resized to the stage's ``input.patch_size_px`` (``mode: whole-slide``): the slide as
    RGB 0-255, an earlier stage's class probability as 0-1. As in FAST, every channel is then
    ``(value * scale - mean) / std`` (``mean``/``std`` list the channels of all sources in order), and
    sources feeding the same ONNX input (``input_name``) are concatenated along channels.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    summary: str
    sources: list[StageSource] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    weights: WeightsSpec
    test: TestSpec | None = None
    precisions: dict[Precision, PrecisionSpec] | None = Field(
        None, description="as the entry's precisions (default: the entry's fp32 only)"
    )

    def feeds(self, src: StageSource) -> str:
        """The ONNX input ``src`` feeds."""
        return src.input_name or self.input.input_name


class ContextInput(_Strict):
    """A second input of a multi-input model: a tile of ``patch_size_px`` at ``target_mpp`` centred on
    the main tile's centre (seed 002's low-resolution context), scaled like the main input; white
    (255) where it reaches beyond the slide."""

    input_name: str
    patch_size_px: tuple[int, int] = Field(description="(width, height)")
    target_mpp: float = Field(gt=0, description="µm per pixel of the context tile")


ModelKind = Literal["segmentation", "patch-classification", "cascade", "multi-input"]


class ModelEntry(_Strict):
    """One versioned model.

    ``kind`` picks the runner module (:mod:`zoo.kinds`): ``segmentation`` (tiles or the whole slide
    to per-pixel probabilities), ``patch-classification`` (one probability per class per tile,
    averaged where tiles overlap), ``cascade`` (this entry's network is the first stage, named
    ``stage_name``; ``stages`` follow, each fed by the slide and/or earlier stages), ``multi-input``
    (tiles to pixels with centred context tiles at other resolutions, ``context_inputs``).
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    version: str
    kind: ModelKind = "segmentation"
    task: Literal["tissue-segmentation", "semantic-segmentation", "patch-classification", "tumour-segmentation"]
    summary: str
    architecture: str
    classes: list[ClassSpec] = Field(min_length=2)
    input: InputSpec
    output: OutputSpec
    weights: WeightsSpec
    licence: str
    provenance: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    test: TestSpec | None = None
    card: str | None = Field(None, description="model card (markdown), relative to the registry")
    cite: list[CiteSpec] = Field(
        default_factory=list, description="works to cite with the model (papers, data), for bioimage.io and cards"
    )
    warning: str | None = Field(
        None, description="what a user must know before trusting it (shown by `zoo list`, `zoo info` and `zoo run`)"
    )
    selection: SelectionSpec = Field(default_factory=SelectionSpec, description="which tiles are classified")
    stage_name: str = Field("main", pattern=r"^[a-z0-9][a-z0-9-]*$", description="this network's stage name")
    stages: list[StageSpec] = Field(default_factory=list, description="cascade: the stages after this one")
    context_inputs: list[ContextInput] = Field(
        default_factory=list, description="multi-input: centred tiles at other resolutions, each its own ONNX input"
    )
    precisions: dict[Precision, PrecisionSpec] = Field(
        default_factory=lambda: dict[Precision, PrecisionSpec](
            {
                "fp32": PrecisionSpec(
                    min_dice=1.0, min_agreement=0.0, max_abs_diff=1e-4, reason=None, weights=None, made_by=None
                )
            }
        ),
        description="precisions (and engines) the model may run at, each with the tolerance it must meet",
    )

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER.match(v):
            raise ValueError(f"version {v!r} is not semver (MAJOR.MINOR.PATCH)")
        return v

    @model_validator(mode="after")
    def _classes(self) -> ModelEntry:
        idx = [c.index for c in self.classes]
        if len(set(idx)) != len(idx):
            raise ValueError(f"duplicate class index in {idx}")
        _check_class_names(self.classes)
        _check_output_channels(self.output, self.classes, "output")
        if "fp32" not in self.precisions:
            raise ValueError("precisions must include fp32 (the reference every other precision is checked against)")
        _check_precision_weights(self.precisions, "precisions")
        if set(self.precisions) - {"fp32"} and self.test is None:
            raise ValueError("precisions other than fp32 need a bundled test to be verified against")
        if self.kind == "patch-classification" or (self.kind == "cascade" and self.output.layout == "NC"):
            if self.input.mode != "tiled" or self.output.layout != "NC":
                raise ValueError(f"{self.kind} needs input.mode 'tiled' and output.layout 'NC' (one vector per tile)")
        elif self.output.layout == "NC":
            raise ValueError(
                f"output.layout 'NC' (one vector per tile) needs kind patch-classification, not {self.kind}"
            )
        if self.selection.entropy_rails is not None and self.input.mode != "tiled":
            raise ValueError("entropy rails select tiles: they need input.mode 'tiled'")
        if self.kind == "multi-input":
            if not self.context_inputs or self.input.mode != "tiled":
                raise ValueError("a multi-input model needs input.mode 'tiled' and at least one context_inputs entry")
            names = [self.input.input_name, *(c.input_name for c in self.context_inputs)]
            if len(set(names)) != len(names):
                raise ValueError(f"multi-input: input names {names} must differ")
        elif self.context_inputs:
            raise ValueError(f"context_inputs are for kind 'multi-input', not {self.kind!r}")
        if self.kind == "cascade":
            self._check_stages()
        elif self.stages:
            raise ValueError(f"stages are for kind 'cascade', not {self.kind!r}")
        return self

    def _check_stages(self) -> None:
        if not self.stages:
            raise ValueError("a cascade needs at least one entry in stages")
        names = [self.stage_name]
        channels = {self.stage_name: [c.name for c in self.classes]}
        for st in self.stages:
            where = f"stage {st.name!r}"
            if st.name in names:
                raise ValueError(f"{where}: duplicate stage name")
            if st.input.mode != "whole-slide":
                raise ValueError(
                    f"{where}: a later stage takes the slide and maps resized to its input size; "
                    "set input.mode 'whole-slide'"
                )
            fed = 0
            for src in st.sources:
                if src.source == "slide":
                    if st.input.channel_order == "grey":
                        raise ValueError(f"{where}: a slide source is fed as RGB or BGR, not grey")
                elif src.source in channels:
                    if src.class_name not in channels[src.source]:
                        raise ValueError(
                            f"{where}: stage {src.source!r} has no class {src.class_name!r}; "
                            f"use one of {channels[src.source]}"
                        )
                else:
                    raise ValueError(f"{where}: source {src.source!r} is neither 'slide' nor an earlier stage {names}")
                fed += src.channels
            if fed != st.input.channels:
                raise ValueError(f"{where}: its sources give {fed} channels but input.channels is {st.input.channels}")
            if len(st.input.mean) != st.input.channels:
                raise ValueError(f"{where}: mean/std need {st.input.channels} values")
            if st.precisions is not None and "fp32" not in st.precisions:
                raise ValueError(f"{where}: precisions must include fp32")
            _check_precision_weights(st.precisions or {}, f"{where} precisions")
            if st.output.layout == "NC":
                raise ValueError(f"{where}: a later stage must output maps (NCHW/NHWC), not one vector")
            _check_output_channels(st.output, self.classes, f"{where} output")
            names.append(st.name)
            channels[st.name] = [c.name for c in self.classes]

    def networks(self) -> list[tuple[str, ModelEntry]]:
        """(stage name, entry view) per network, first stage first; a view carries the stage's input,
        output, weights and test, so engines, verification and exports treat it as a single model."""
        out: list[tuple[str, ModelEntry]] = [(self.stage_name, self)]
        for st in self.stages:
            # the view's input spec describes the ONNX input named input.input_name: its channels only
            idx, k = [], 0
            for src in st.sources:
                if st.feeds(src) == st.input.input_name:
                    idx += list(range(k, k + src.channels))
                k += src.channels
            main_input = st.input.model_copy(
                update={
                    "channels": len(idx),
                    "mean": tuple(st.input.mean[i] for i in idx),
                    "std": tuple(st.input.std[i] for i in idx),
                }
            )
            view = self.model_copy(
                update={
                    "kind": "segmentation",
                    "stage_name": st.name,
                    "stages": [],
                    "input": main_input,
                    "output": st.output,
                    "weights": st.weights,
                    "test": st.test,
                    "precisions": st.precisions or {"fp32": self.precisions["fp32"]},
                    "selection": SelectionSpec(tissue_premask=False),
                }
            )
            out.append((st.name, view))
        return out

    @property
    def id(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def foreground(self) -> list[ClassSpec]:
        """Classes other than index 0 (background)."""
        return [c for c in self.classes if c.index != 0]

    def weights_for(self, precision: str = "fp32") -> WeightsSpec:
        """The file ``precision`` runs: its own converted copy (int8's quantised network), else the fp32 file."""
        spec = self.precisions.get(precision)  # type: ignore[call-overload]
        return spec.weights if spec is not None and spec.weights is not None else self.weights

    def pinned_sha256(self) -> list[str]:
        """sha256 of the ONNX file, then of each external-data file, in ``weights.files`` order, for every stage."""
        out = []
        for w in [self.weights, *(st.weights for st in self.stages)]:
            out += [w.sha256, *(f.sha256 for f in w.files)]
        return out


def _check_precision_weights(precisions: dict[Precision, PrecisionSpec], where: str) -> None:
    """fp32 runs the entry's own file; int8 needs its quantised copy (an engine cannot make one on the fly)."""
    if "fp32" in precisions and precisions["fp32"].weights is not None:
        raise ValueError(f"{where}.fp32: the reference runs the entry's weights; remove its weights")
    if "int8" in precisions and precisions["int8"].weights is None:
        raise ValueError(
            f"{where}.int8 needs weights: a quantised copy pinned by sha256 "
            "(make one with python -m zoo.train.quantise)"
        )


def _file_key(name: str) -> str:
    """How a class name appears in file names (``probability_<name>.tiff``), case-folded."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:80].rstrip(".") or "slide").casefold()


def _check_class_names(classes: list[ClassSpec]) -> None:
    """Refuse names that would merge on import or in file names: duplicates, names equal once sanitised
    (``probability_<name>.tiff``), and a ``qupath_name`` that is another class's name or ``qupath_name``."""
    names = [c.name for c in classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate class name(s) {dup}; each class needs its own name")
    by_file: dict[str, str] = {}
    for c in classes:
        k = _file_key(c.name)
        if k in by_file:
            raise ValueError(
                f"class names {by_file[k]!r} and {c.name!r} give the same file name probability_{k}.tiff "
                "(case and characters other than letters, digits, '._-' are folded); rename one"
            )
        by_file[k] = c.name
    owner: dict[str, str] = {}
    for c in classes:
        for label in {c.name, c.qupath_name or c.name}:
            if owner.get(label, c.name) != c.name:
                raise ValueError(
                    f"classes {owner[label]!r} and {c.name!r} both answer to {label!r} (name or qupath_name); "
                    "QuPath objects of that class could not be mapped back: give each its own"
                )
            owner[label] = c.name


def _check_output_channels(out: OutputSpec, classes: list[ClassSpec], where: str) -> None:
    """A softmax gives one channel per class; a sigmoid one per foreground class (or 1 for a binary mask)."""
    n, fg = len(classes), len(classes) - 1
    if out.activation == "softmax" and out.channels != n:
        raise ValueError(f"{where}.channels {out.channels}: a softmax over {n} classes needs {n} channels")
    if out.activation == "sigmoid" and out.channels not in (1, fg):
        raise ValueError(
            f"{where}.channels {out.channels}: a sigmoid output needs 1 channel or one per foreground class ({fg})"
        )


class Registry(_Strict):
    schema_version: Literal[1] = 1
    default_model: str
    models: list[ModelEntry]
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        ids = [m.id for m in self.models]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate model ids {sorted(dup)}")
        if self.default_model not in {m.name for m in self.models}:
            raise ValueError(f"default_model {self.default_model!r} is not a model in the registry")
        return self

    @property
    def root(self) -> Path:
        """Folder that relative URIs are resolved against."""
        return (self.path or default_registry_path()).parent

    def names(self) -> list[str]:
        return sorted({m.name for m in self.models})

    def versions(self, name: str) -> list[str]:
        return sorted((m.version for m in self.models if m.name == name), key=semver_key)

    def get(self, spec: str | None = None) -> ModelEntry:
        """Entry for ``name``, ``name@version`` or None (the default model, newest version)."""
        spec = spec or self.default_model
        name, _, version = spec.partition("@")
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names())
            raise ModelNotFoundError(f"model {name!r} is not in the registry; known models: {known} (see `zoo list`)")
        version = version or versions[-1]
        for m in self.models:
            if m.name == name and m.version == version:
                return m
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r}; available: {', '.join(versions)} (see `zoo info {name}`)"
        )

    def resolve(self, relative: str) -> Path:
        """A registry-relative path (weights, test data, card) as an absolute path.

        Raises:
            RegistryError: a relative path leads outside the registry's folder.
        """
        return resolve_uri(relative, self.root)


def semver_key(v: str) -> tuple[int, int, int, int, str]:
    """Sort key: releases after their pre-releases."""
    m = SEMVER.match(v)
    if not m:
        return (-1, -1, -1, -1, v)
    pre = m.group(4)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre or "")


def default_registry_path() -> Path:
    """``$ZOO_REGISTRY``, else the registry shipped in the package, else the one beside it in a checkout."""
    env = os.environ.get("ZOO_REGISTRY")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "registry.yaml", here.parent / "registry.yaml"):
        if cand.exists():
            return cand
    return here / "registry.yaml"


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate a registry file.

    Raises:
        RegistryError: the file is missing, not YAML, or an entry is malformed.
    """
    p = Path(path) if path else default_registry_path()
    try:
        # libyaml's safe loader where PyYAML was built with it: the same documents, 5-7x faster (0.05 s a run)
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError as err:
        raise RegistryError(f"{p}: registry file not found; set ZOO_REGISTRY or pass --registry") from err
    except IsADirectoryError as err:
        raise RegistryError(f"{p}: is a folder; point ZOO_REGISTRY or --registry at its registry.yaml") from err
    except UnicodeDecodeError as err:
        raise RegistryError(f"{p}: not UTF-8 text (byte {err.start}); point ZOO_REGISTRY at a registry.yaml") from err
    except OSError as err:
        raise RegistryError(
            f"{p}: cannot read the registry ({err.strerror}); check ZOO_REGISTRY or --registry"
        ) from err
    except yaml.YAMLError as err:
        raise RegistryError(f"{p}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from err
    if not isinstance(raw, dict):
        raise RegistryError(f"{p}: expected a mapping with 'default_model' and 'models'")
    try:
        return Registry(**raw, path=p)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        if where.startswith("models.") and isinstance(raw.get("models"), list):
            i = int(first["loc"][1])
            entry = raw["models"][i] if i < len(raw["models"]) else {}
            who = f"{entry.get('name', '?')}@{entry.get('version', '?')}" if isinstance(entry, dict) else f"#{i}"
            where = f"entry {who}: " + ".".join(str(x) for x in first["loc"][2:])
        raise RegistryError(f"{p}: {where}: {first['msg']}; fix this field ({err.error_count()} error(s))") from err


def cache_root() -> Path:
    """zoo's own cache (downloaded weights, remembered engine checks): ``$ZOO_CACHE``, else
    ``~/.cache/pathology-zoo``."""
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "pathology-zoo"))


#: True inside :func:`checked_afresh` (``zoo verify``): nothing remembered is used or written
_AFRESH: ContextVar[bool] = ContextVar("zoo_checked_afresh", default=False)


@contextmanager
def checked_afresh() -> Iterator[None]:
    """Within this block every check runs afresh, as if ``ZOO_CHECK_CACHE=0`` (``zoo verify``)."""
    token = _AFRESH.set(True)
    try:
        yield
    finally:
        _AFRESH.reset(token)


def check_cache_dir() -> Path | None:
    """Where passed checks are remembered between runs (``$ZOO_CACHE/checks``); None when
    ``ZOO_CHECK_CACHE=0`` or inside :func:`checked_afresh`."""
    if os.environ.get("ZOO_CHECK_CACHE", "1") == "0" or _AFRESH.get():
        return None
    return cache_root() / "checks"


def remembered(name: str) -> dict[str, Any] | None:
    """What :func:`remember_pass` kept for the check ``name`` (a key that hashes everything its result
    depends on), or None: not passed here yet, remembering off, or unreadable."""
    import json

    folder = check_cache_dir()
    if folder is None:
        return None
    try:
        kept = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and kept.get("ok") is True else None


def remember_pass(name: str, detail: dict[str, Any] | None = None) -> None:
    """Keep ``detail`` as the passed check ``name``, with when (nothing when remembering is off or the cache
    cannot be written)."""
    import time

    from zoo.outputs import write_json

    folder = check_cache_dir()
    if folder is None:
        return
    try:
        checked = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(folder / f"{name}.json", {**(detail or {}), "ok": True, "checked": checked})
    except OSError:  # OutputError too: a read-only home, and the check simply runs again next time
        pass


def resolve_uri(uri: str, root: Path) -> Path:
    """Local path for a weights/test URI (relative to ``root``, ``file://`` or ``https://``)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(parsed.path).name
    if parsed.scheme == "file":
        p = Path(parsed.path)
        if not p.is_absolute():
            raise RegistryError(f"{uri}: a file:// URI must be absolute (file:///path/to/model.onnx)")
        return p
    if parsed.scheme:
        raise RegistryError(
            f"{uri}: unsupported URI scheme {parsed.scheme!r}; use a relative path, file:// or https://"
        )
    p = Path(uri)
    if p.is_absolute():
        raise RegistryError(f"{uri}: absolute paths must be written as file://{uri} (explicitly)")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise RegistryError(
            f"{uri}: leads outside the registry's folder {root}; keep model files beside registry.yaml "
            "or name them explicitly with file:///absolute/path"
        )
    return root / p


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        tmp.replace(dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WeightsNotFoundError(
            f"{url}: download failed ({err}); check the network or use a local file:// URI"
        ) from err


def verified_weights(entry: ModelEntry, registry: Registry, precision: str = "fp32") -> Path:
    """Path to the ONNX file ``precision`` runs after checking it and every file it loads (see
    :func:`verified_model_files`)."""
    return verified_model_files(entry, registry, precision)[0]


#: (entry id, pinned sha256s, (path, size, mtime_ns, inode) of each file) -> the checked files: one check per
#: file and process (a run checks each file before any output, then again where it loads it)
_VERIFIED: dict[tuple[Any, ...], list[Path]] = {}


def _file_state(path: Path) -> tuple[str, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def verified_model_files(entry: ModelEntry, registry: Registry, precision: str = "fp32") -> list[Path]:
    """The ONNX file ``precision`` runs (:meth:`ModelEntry.weights_for`), then each external-data file, after
    checking every sha256 (once per process while the files are unchanged on disk).

    Raises:
        WeightsNotFoundError: a file is missing, a folder, or cannot be downloaded.
        ChecksumMismatchError: a file's sha256 is not the pinned one.
        RegistryError: the ONNX file loads a file that is not pinned in ``weights.files``,
            or one outside its own folder.
    """
    weights = entry.weights_for(precision)
    field = "weights" if weights is entry.weights else f"precisions.{precision}.weights"
    path = registry.resolve(weights.uri)
    files = [path, *(path.parent / f.path for f in weights.files)]
    memo = (entry.id, repr(entry.input), repr(entry.output), repr(entry.context_inputs), weights.sha256,
            *(f.sha256 for f in weights.files), *(_file_state(f) for f in files))  # fmt: skip
    if None not in memo and memo in _VERIFIED and not _AFRESH.get():
        return list(_VERIFIED[memo])
    checked = _verify_model_files(entry, registry, weights, field, path)
    if None not in memo:
        _VERIFIED[memo] = checked
    return list(checked)


def _verify_model_files(
    entry: ModelEntry, registry: Registry, weights: WeightsSpec, field: str, path: Path
) -> list[Path]:
    """:func:`verified_model_files` without the memo."""
    if not path.exists() and urlparse(weights.uri).scheme in ("http", "https"):
        _download(weights.uri, path)
    _check_pinned(path, weights.sha256, entry, registry, f"{field}.uri")
    extra = [path.parent / f.path for f in weights.files]
    for f, p in zip(weights.files, extra):
        _check_pinned(p, f.sha256, entry, registry, f"{field}.files {f.path!r}")
    # what follows reads the graph (and imports onnx, ~0.5 s): it depends only on the files' content and the
    # entry's declared inputs and outputs, so once passed it is remembered under their hash
    from zoo import __version__

    parts = [weights.sha256, *(f"{f.path}={f.sha256}" for f in weights.files), repr(entry.input), repr(entry.output),
             repr(entry.context_inputs), entry.stage_name, __version__]  # fmt: skip
    remembered_as = "graph-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    if remembered(remembered_as) is not None:
        return [path, *extra]
    pinned = {Path(f.path).as_posix() for f in weights.files}
    for loc in onnx_external_data(path):
        lp = Path(loc)
        inside = (path.parent / lp).resolve().is_relative_to(path.parent.resolve())
        if lp.is_absolute() or ".." in lp.parts or not inside:
            raise RegistryError(
                f"{path}: {entry.id} loads external data from {loc!r}, outside its folder; "
                "re-save the model with its data beside it"
            )
        if lp.as_posix() not in pinned:
            raise RegistryError(
                f"{path}: {entry.id} loads external data {loc!r} that is not pinned; add it to weights.files "
                f"with its sha256 in {registry.path}"
            )
    check_graph_contract(entry, path)
    remember_pass(remembered_as, {"model": entry.id, "file": str(path)})
    return [path, *extra]


def _graph_io(path: Path) -> tuple[dict[str, list[int | str | None]], dict[str, list[int | str | None]]]:
    """{name: shape} of an ONNX file's graph inputs (initialisers excluded) and outputs; a dim is an int,
    a symbolic name, or None."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others
        raise RegistryError(f"{path}: not a readable ONNX file ({err}); restore the model file") from err

    def shape(v: Any) -> list[int | str | None]:
        dims = v.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]

    inits = {t.name for t in model.graph.initializer}
    ins = {v.name: shape(v) for v in model.graph.input if v.name not in inits}
    return ins, {v.name: shape(v) for v in model.graph.output}


def check_graph_contract(entry: ModelEntry, path: Path) -> None:
    """Compare ``entry``'s declared inputs and outputs (names, channels, layout, fixed sizes) with the ONNX graph.

    Raises:
        RegistryError: one line naming the entry, the stage and the registry field that disagrees.
    """
    ins, outs = _graph_io(path)
    who = entry.id if entry.stage_name == "main" else f"{entry.id} stage {entry.stage_name!r}"
    if not ins or not outs:
        raise RegistryError(f"{path}: {who}: the ONNX graph has no inputs or outputs; restore or re-export the model")
    spec_in, spec_out = entry.input, entry.output

    def check_input(name: str, field: str, channels: int, size_px: tuple[int, int]) -> None:
        if name not in ins:
            raise RegistryError(
                f"{path}: {who}: {field} {name!r} is not an input of the graph {sorted(ins)}; fix {field}"
            )
        dims = ins[name]
        if len(dims) != 4:
            raise RegistryError(
                f"{path}: {who}: input {name!r} has rank {len(dims)}, not 4 (N, C, H, W or N, H, W, C); "
                "re-export the model"
            )
        w, h = size_px
        want = [channels, h, w] if spec_in.layout == "NCHW" else [h, w, channels]
        what = ["channels", "height", "width"] if spec_in.layout == "NCHW" else ["height", "width", "channels"]
        for got, exp, label in zip(dims[1:], want, what, strict=True):
            if isinstance(got, int) and got > 0 and got != exp:
                raise RegistryError(
                    f"{path}: {who}: input {name!r} is {dims} but the registry declares {spec_in.layout} with {label} "
                    f"{exp}; fix input.layout, input.channels or patch_size_px"
                )

    check_input(spec_in.input_name, "input.input_name", spec_in.channels, spec_in.patch_size_px)
    for c in entry.context_inputs:
        check_input(c.input_name, "context_inputs.input_name", spec_in.channels, c.patch_size_px)
    if spec_out.output_name not in outs:
        raise RegistryError(
            f"{path}: {who}: output.output_name {spec_out.output_name!r} is not an output of the graph "
            f"{sorted(outs)}; fix output.output_name"
        )
    dims = outs[spec_out.output_name]
    rank = 2 if spec_out.layout == "NC" else 4
    if dims and len(dims) != rank:
        raise RegistryError(
            f"{path}: {who}: output {spec_out.output_name!r} has rank {len(dims)} but output.layout "
            f"{spec_out.layout!r} means rank {rank}; fix output.layout"
        )
    if dims:
        ch = dims[1] if spec_out.layout in ("NC", "NCHW") else dims[3]
        if isinstance(ch, int) and ch > 0 and ch != spec_out.channels:
            raise RegistryError(
                f"{path}: {who}: output {spec_out.output_name!r} has {ch} channels ({spec_out.layout} {dims}) but "
                f"output.channels is {spec_out.channels} ({spec_out.activation} over {len(entry.classes)} classes); "
                "fix output.channels/activation/layout or the classes"
            )


def _check_pinned(path: Path, sha256: str, entry: ModelEntry, registry: Registry, field_name: str) -> None:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise WeightsNotFoundError(
            f"{path}: {field_name} of {entry.id} {what}; reinstall the package or fix {field_name} in {registry.path}"
        )
    got = sha256_file(path)
    if got != sha256:
        raise ChecksumMismatchError(
            f"{path}: sha256 {got[:16]}… does not match {sha256[:16]}… pinned for {entry.id} ({field_name}); "
            "the file is corrupt or was replaced: restore the original, or register the new file "
            "as a new version"
        )


def onnx_external_data(path: Path) -> list[str]:
    """Locations of the external tensor data an ONNX file references (its ``location`` entries)."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others
        raise RegistryError(f"{path}: not a readable ONNX file ({err}); restore the model file") from err
    locations: set[str] = set()

    def visit(graph: Any) -> None:
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in t.external_data if e.key == "location")
        for node in graph.node:
            for a in node.attribute:
                if a.g is not None and a.HasField("g"):
                    visit(a.g)
                for g in a.graphs:
                    visit(g)

    visit(model.graph)
    return sorted(locations)
