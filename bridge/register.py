"""Bring your own model: an ONNX file, a bioimage.io package or a WSInfer folder becomes a verified entry
of a user registry, so it runs in `zoo run` with pinning, resume and every export.

What the graph says is read from it (input name, layout, channels, fixed patch size, output name, layout,
channels, a final Softmax/Sigmoid); a bioimage.io package adds its axes' spacing, its ``scale_linear``
normalisation and channel names, a WSInfer folder its classes, spacing and transforms (its TorchScript is
converted to ONNX with torch and checked against it). Only what none of them says is asked for: classes,
um/px, normalisation. Then every sha256 is computed, the bundled test is made from the bundled slide, a
draft card is written and the entry is appended to the user registry (``--registry``), which is loaded
back and verified. Anything that cannot be verified is refused with one line, and nothing is left behind:
the model folder is new (an existing one is never touched), and the registry file is only replaced by a
copy with the one entry appended.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from zoo.errors import OutputExistsError, RegisterError
from zoo.outputs import atomic_path
from zoo.registry import (
    ModelEntry,
    Registry,
    check_graph_contract,
    default_registry_path,
    load_registry,
    sha256_file,
)

#: colours given to registered classes in order (index 0 is background, white)
PALETTE = [(255, 255, 255), (200, 0, 0), (0, 160, 0), (0, 0, 200), (200, 160, 0), (160, 0, 160), (0, 160, 160)]
#: bioimage.io spatial units to micrometer
_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}
BUNDLED_SLIDE = Path(__file__).resolve().parents[1] / "zoo" / "data" / "cmu-1-small-region.svs"


@dataclass
class Request:
    """What the user said (None: read it from the model, or fail naming the option)."""

    name: str
    version: str
    classes: list[str] | None = None
    mpp: float | None = None
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    activation: str | None = None
    mode: str = "tiled"
    patch_size_px: tuple[int, int] | None = None
    licence: str | None = None
    summary: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    #: entry fields a zoo export carried along (bioimage.io ``config: pathology-zoo``), merged over the draft
    overrides: dict[str, Any] = field(default_factory=dict)


def _graph(path: Path) -> Any:
    import onnx

    try:
        return onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise RegisterError(f"{path}: not a readable ONNX file ({err}); give the model's .onnx file") from err


def _dims(v: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]


def _opset(model: Any) -> int | str:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")


#: ops that move or crop values without changing them, looked through to find a graph's final activation
_PASSTHROUGH = {"Identity", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast"}


def _activation_of(model: Any, output: str) -> str | None:
    """'softmax' / 'sigmoid' when ``output`` is made by that op, through crops and reshapes (tf2onnx's Cropping2D)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type in _PASSTHROUGH:
        node = producers.get(node.input[0])
    return {"Softmax": "softmax", "Sigmoid": "sigmoid"}.get(node.op_type) if node is not None else None


def draft_entry(onnx_path: Path, req: Request) -> dict[str, Any]:
    """A registry entry (as a dict) for ``onnx_path``: read from the graph, completed by ``req``.

    Raises:
        RegisterError: something the graph does not say and ``req`` does not give; the message names the option.
    """
    model = _graph(onnx_path)
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise RegisterError(
            f"{onnx_path}: {len(inputs)} graph inputs {[v.name for v in inputs]}; `zoo register` takes single-input "
            "models (write a multi-input entry by hand, see registry.yaml's multilevel-unet)"
        )
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise RegisterError(
            f"{onnx_path}: input {inputs[0].name!r} has rank {len(dims)}, not 4 (N, C, H, W or N, H, W, C)"
        )
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        layout, channels, hw = "NCHW", dims[1], (dims[2], dims[3])
    elif dims[3] in (1, 3):
        layout, channels, hw = "NHWC", dims[3], (dims[1], dims[2])
    else:
        raise RegisterError(f"{onnx_path}: input {inputs[0].name!r} {dims} has no axis of 3 (RGB) channels")
    if channels != 3:
        raise RegisterError(f"{onnx_path}: {channels} input channel(s); the runner feeds RGB (3)")
    size = req.patch_size_px or ((hw[1], hw[0]) if hw[0] and hw[1] else None)
    if size is None:
        raise RegisterError(f"{onnx_path}: the graph's patch size is not fixed ({dims}); pass --patch-size W H")
    out = model.graph.output[0]
    out_dims = _dims(out)
    if len(out_dims) == 2:
        out_layout, out_channels = "NC", out_dims[1]
    elif len(out_dims) == 4:
        out_layout = layout
        out_channels = out_dims[1] if layout == "NCHW" else out_dims[3]
    else:
        raise RegisterError(f"{onnx_path}: output {out.name!r} has rank {len(out_dims)}; expected 2 (NC) or 4 (maps)")
    if out_channels is None:
        raise RegisterError(f"{onnx_path}: output {out.name!r} {out_dims} has no fixed channel count")
    in_graph = _activation_of(model, out.name)
    activation = req.activation or in_graph
    if activation is None:
        raise RegisterError(
            f"{onnx_path}: the graph does not end with Softmax or Sigmoid; pass --activation softmax|sigmoid "
            "(what its outputs are logits of)"
        )
    if req.classes is None:
        raise RegisterError(f"{onnx_path}: pass --classes, e.g. --classes Background,Tissue (index 0 first)")
    want = len(req.classes) if activation == "softmax" else len(req.classes) - 1  # sigmoid: one per foreground
    if out_channels != want:
        raise RegisterError(
            f"{onnx_path}: output {out.name!r} has {out_channels} channel(s) but --classes gives {len(req.classes)} "
            f"({activation}: {want} channel(s)); fix --classes or --activation"
        )
    if req.mode == "tiled" and req.mpp is None:
        raise RegisterError(f"{onnx_path}: pass --mpp, the um/px the model was trained at (e.g. --mpp 0.5)")
    kind = "patch-classification" if out_layout == "NC" else "segmentation"
    scale = req.scale if req.scale is not None else 1.0 / 255.0
    mean = req.mean if req.mean is not None else [0.0, 0.0, 0.0]
    std = req.std if req.std is not None else [1.0, 1.0, 1.0]
    entry: dict[str, Any] = {
        "name": req.name,
        "version": req.version,
        "kind": kind,
        "task": "patch-classification" if kind == "patch-classification" else "semantic-segmentation",
        "summary": req.summary or f"{req.name}, registered with zoo register from {req.source or onnx_path.name}",
        "architecture": f"ONNX graph, {len(model.graph.node)} nodes, opset {_opset(model)}; not described",
        "classes": [
            {"index": i, "name": c, "color": list(PALETTE[i % len(PALETTE)])} for i, c in enumerate(req.classes)
        ],
        "input": {
            "mode": req.mode,
            "patch_size_px": list(size),
            "overlap": 0.0 if kind == "patch-classification" or req.mode == "whole-slide" else 0.25,
            "channels": 3,
            "channel_order": "RGB",
            "layout": layout,
            "input_name": inputs[0].name,
            "scale": scale,
            "mean": mean,
            "std": std,
            "batch_dynamic": dims[0] is None,
            **({"target_mpp": req.mpp, "trained_mpp": [req.mpp]} if req.mpp is not None else {}),
        },
        "output": {
            "output_name": out.name,
            "activation": activation,
            "layout": out_layout,
            "channels": out_channels,
            "already_activated": in_graph is not None and req.activation in (None, in_graph),
        },
        "licence": req.licence or "not stated by the source: check it before sharing results",
    }
    entry["input"]["mean"] = [m + 0.0 for m in entry["input"]["mean"]]  # no -0.0
    for key, value in req.overrides.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    return entry


# -- other tools' formats -------------------------------------------------------------------------------------


def request_from_bioimageio(rdf_path: Path, req: Request) -> tuple[Path, Request]:
    """(the package's ONNX file, ``req`` completed from ``rdf.yaml``: spacing, normalisation, classes).

    Raises:
        RegisterError: no ONNX weights, a sha256 that does not match, or preprocessing this runner cannot do.
    """
    rdf_path = rdf_path / "rdf.yaml" if rdf_path.is_dir() else rdf_path
    try:
        rdf = yaml.safe_load(rdf_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RegisterError(f"{rdf_path}: not a readable rdf.yaml ({err}); give the package's rdf.yaml") from err
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise RegisterError(f"{rdf_path}: not a bioimage.io model description (type: model)")
    onnx = (rdf.get("weights") or {}).get("onnx")
    if not onnx:
        raise RegisterError(f"{rdf_path}: no ONNX weights in the package; export them (bioimageio.core can convert)")
    path = rdf_path.parent / onnx["source"]
    if "sha256" in onnx and sha256_file(path) != onnx["sha256"]:
        raise RegisterError(f"{path}: sha256 differs from the package's rdf.yaml; the package is damaged")
    ipt, opt = rdf["inputs"][0], rdf["outputs"][0]
    space = [a for a in ipt["axes"] if a.get("type") == "space"]
    mpp = req.mpp
    if mpp is None and space and "scale" in space[0] and space[0].get("unit") in _UM:
        mpp = float(space[0]["scale"]) * _UM[space[0]["unit"]]
    scale, mean, std = _bioimageio_normalisation(rdf_path, ipt.get("preprocessing") or [])
    channels = next((a.get("channel_names") for a in opt["axes"] if a.get("type") == "channel"), None)
    classes = req.classes
    if classes is None and channels:
        classes = list(channels) if len(channels) > 1 else ["Background", *channels]
    done = Request(
        **{**req.__dict__, "mpp": mpp, "classes": classes, "source": f"bioimage.io package {rdf_path}",
           "summary": req.summary or rdf.get("description"), "licence": req.licence or rdf.get("license")}
    )  # fmt: skip
    if req.scale is None:
        done.scale, done.mean, done.std = scale, mean, std
    zoo = (rdf.get("config") or {}).get("pathology-zoo")
    if isinstance(zoo, dict) and req.classes is None:  # a zoo export: what bioimage.io has no field for
        done.overrides = {k: zoo[k] for k in ("classes", "input", "output", "selection") if k in zoo}
        done.notes.append(f"runner settings from the package's config.pathology-zoo ({zoo.get('model', '?')})")
    return path, done


def _bioimageio_normalisation(where: Path, steps: list[dict[str, Any]]) -> tuple[float, list[float], list[float]]:
    """``scale_linear`` (after optional ``ensure_dtype``) as the registry's scale, mean, std."""
    gain: list[float] = [1.0, 1.0, 1.0]
    offset: list[float] = [0.0, 0.0, 0.0]
    for step in steps:
        op, kw = step.get("id") or step.get("name"), step.get("kwargs") or {}
        if op == "ensure_dtype":
            continue
        if op != "scale_linear":
            raise RegisterError(
                f"{where}: preprocessing {op!r} is not one the runner can do (ensure_dtype, scale_linear); "
                "register the ONNX file with --scale/--mean/--std instead"
            )

        def three(v: Any) -> list[float]:
            return [float(x) for x in v] if isinstance(v, list) else [float(v)] * 3

        g, o = three(kw.get("gain", 1.0)), three(kw.get("offset", 0.0))
        gain = [a * b for a, b in zip(gain, g, strict=True)]
        offset = [a * b + c for a, b, c in zip(offset, g, o, strict=True)]
    # x = p * gain + offset  ==  (p * scale - mean) / std  with scale = 1/255, std = scale / gain, mean = -offset * std
    scale = 1.0 / 255.0
    std = [scale / g for g in gain]
    return scale, [-o * s for o, s in zip(offset, std, strict=True)], std


def _declare_output_dims(onnx_path: Path, dims: list[int | str]) -> None:
    """Write ``dims`` as the first output's declared shape (an int fixes an axis, a str names a free one).

    Tracing through reshapes (a dihedral TTA's view average, say) can leave the exported output's shape unknown
    though the model's class count is fixed; the caller checks ``dims`` against what the model returned.
    """
    import onnx

    model = onnx.load_model(str(onnx_path))
    shape = model.graph.output[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, int):
            shape.dim.add().dim_value = d
        else:
            shape.dim.add().dim_param = d
    onnx.save_model(model, str(onnx_path))


def request_from_wsinfer(folder: Path, req: Request, work: Path) -> tuple[Path, Request]:
    """(an ONNX file converted from the folder's TorchScript into ``work``, ``req`` completed from config.json).

    WSInfer models return logits (WSInfer applies the softmax), so the entry says ``softmax`` not yet applied.

    Raises:
        RegisterError: no config.json / torchscript_model.pt, or the converted ONNX disagrees with the TorchScript.
    """
    import torch

    cfg_path, ts_path = folder / "config.json", folder / "torchscript_model.pt"
    if not cfg_path.is_file() or not ts_path.is_file():
        raise RegisterError(f"{folder}: a WSInfer model folder has config.json and torchscript_model.pt")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RegisterError(f"{cfg_path}: not readable JSON ({err})") from err
    size = int(cfg["patch_size_pixels"])
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    for t in cfg.get("transform", []):
        if t.get("name") == "Normalize":
            mean, std = list(t["arguments"]["mean"]), list(t["arguments"]["std"])
    ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    onnx_path = work / f"{req.name}.onnx"
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.onnx.export(
            ts, (x,), str(onnx_path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
        expected = ts(x).numpy()
    n_classes = len(cfg.get("class_names") or []) or int(cfg.get("num_classes", 0))
    if expected.ndim != 2 or expected.shape[1] != n_classes:
        raise RegisterError(
            f"{ts_path}: returns shape {list(expected.shape)} for 2 patches, not (2, {n_classes}) as config.json's "
            "class_names say; fix config.json or the model"
        )
    _declare_output_dims(onnx_path, ["batch", n_classes])
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= 1e-4:
        raise RegisterError(f"{ts_path}: the ONNX converted from it differs by {diff:.3g}; it cannot be registered")
    done = Request(
        **{**req.__dict__, "classes": req.classes or list(cfg["class_names"]),
           "mpp": req.mpp or float(cfg["spacing_um_px"]), "activation": "softmax", "patch_size_px": (size, size),
           "source": f"WSInfer folder {folder}"}
    )  # fmt: skip
    if req.scale is None:
        done.scale, done.mean, done.std = 1.0 / 255.0, mean, std
    done.notes.append(f"TorchScript converted to ONNX with torch {torch.__version__} (max |diff| {diff:.2g})")
    return onnx_path, done


# -- writing --------------------------------------------------------------------------------------------------


def _card(entry: ModelEntry, req: Request, onnx_sha256: str) -> str:
    lines = [
        f"# {entry.name} {entry.version} (draft card, written by `zoo register`)",
        "",
        f"Source: {req.source or '?'}; ONNX sha256 `{onnx_sha256}`.",
        "",
        f"- kind: {entry.kind}; classes: {', '.join(c.name for c in entry.classes)}",
        f"- input: {entry.input.patch_size_px[0]}x{entry.input.patch_size_px[1]} px "
        + (f"at {entry.input.target_mpp} um/px" if entry.input.target_mpp else "(whole slide)")
        + f", (RGB * {entry.input.scale:.6g} - {list(entry.input.mean)}) / {list(entry.input.std)}",
        f"- output: {entry.output.activation} "
        + ("(in the graph)" if entry.output.already_activated else "(applied by the runner)"),
        f"- licence: {entry.licence}",
        *(f"- {n}" for n in req.notes),
        "",
        "## What is not known",
        "",
        "Training data, labels and measured quality were not given: no metrics are claimed. Measure the model on",
        "slides like yours before trusting it, and fill in this card.",
        "",
        "The bundled test (test_input.npy, test_expected.npy) is the centre patch of the bundled CMU-1-Small-Region",
        "slide and this model's output for it, so `zoo verify` can tell if the weights or an engine ever change it.",
        "",
    ]
    return "\n".join(lines)


class _Dumper(yaml.SafeDumper):
    """Short lists of numbers or names on one line ([255, 255, 255]), as registry.yaml writes them."""


def _flow_short_lists(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = len(data) <= 8 and all(isinstance(v, (int, float, str)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _flow_short_lists)


def _append_entry(registry_path: Path, entry: dict[str, Any]) -> str:
    """The registry file's text with ``entry`` appended (its comments kept), or a new registry's text."""
    block = yaml.dump([entry], Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
    block = "".join(f"  {ln}\n" if ln else "\n" for ln in block.splitlines())
    if not registry_path.exists():
        head = "# A user registry written by `zoo register`. Paths are relative to this file.\nschema_version: 1\n"
        return f"{head}default_model: {entry['name']}\n\nmodels:\n{block}"
    text = registry_path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    return f"{text}\n{block}"


def register(onnx_path: Path, req: Request, registry_path: Path, slide: Path | None = None) -> ModelEntry:
    """Add ``onnx_path`` to the registry at ``registry_path`` as ``req.name@req.version`` and verify it.

    The model's files go to ``<registry folder>/models/<name>/<version>/`` (which must not exist yet): the ONNX
    copy, the bundled test made from ``slide`` (default: the bundled slide) and a draft card.

    Raises:
        RegisterError: something to pass or fix (the message names it).
        OutputExistsError: that name@version or its folder exists already (never replaced).
        RegistryError: the entry does not validate against the graph.
    """
    from zoo.verify import verify_network, write_test_io

    registry_path = registry_path.resolve()
    if registry_path == default_registry_path().resolve():
        raise RegisterError(f"{registry_path}: is the package's own registry; pass --registry my-models.yaml")
    old = load_registry(registry_path) if registry_path.exists() else None
    if old is not None and any(m.name == req.name and m.version == req.version for m in old.models):
        raise OutputExistsError(f"{registry_path}: has {req.name}@{req.version} already; give another --version")
    folder = registry_path.parent / "models" / req.name / req.version
    if folder.exists():
        raise OutputExistsError(f"{folder}: exists already (not written by this run); give another --version")
    raw = draft_entry(onnx_path, req)
    rel = f"models/{req.name}/{req.version}"
    onnx_name = f"{req.name}.onnx"
    raw["weights"] = {
        "uri": f"{rel}/{onnx_name}",
        "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
    }
    raw["provenance"] = {"registered_by": "zoo register", "source": req.source or str(onnx_path), "notes": req.notes}
    raw["test"] = {"input": f"{rel}/test_input.npy", "expected": f"{rel}/test_expected.npy", "atol": 1.0e-4}
    raw["card"] = f"{rel}/MODEL_CARD.md"
    try:
        entry = ModelEntry(**raw)
    except ValueError as err:
        raise RegisterError(f"{onnx_path}: the entry does not validate ({str(err).splitlines()[-1].strip()})") from err
    check_graph_contract(entry, onnx_path)
    made: list[Path] = []
    try:
        for p in reversed([folder, *folder.parents]):
            if not p.exists():
                p.mkdir()
                made.append(p)
        shutil.copyfile(onnx_path, folder / onnx_name)
        draft = Registry(default_model=req.name, models=[entry], path=registry_path)
        write_test_io(
            entry, draft, str(slide or BUNDLED_SLIDE), str(folder / "test_input.npy"), str(folder / "test_expected.npy")
        )
        (folder / "MODEL_CARD.md").write_text(_card(entry, req, raw["weights"]["sha256"]), encoding="utf-8")
        text = _append_entry(registry_path, json.loads(json.dumps(raw)))
        check = yaml.safe_load(text)
        before = len(old.models) if old is not None else 0
        if not isinstance(check, dict) or len(check.get("models") or []) != before + 1:
            raise RegisterError(
                f"{registry_path}: appending the entry would not give one more model (is 'models:' its last key?); "
                "move 'models:' to the end of the file"
            )
        Registry(**check, path=registry_path)  # the new registry validates before it replaces the old one
        result = verify_network(entry, draft)
        if not result["ok"]:
            raise RegisterError(f"{onnx_path}: the bundled test does not reproduce ({result['detail']})")
        with atomic_path(registry_path) as tmp_path:
            tmp_path.write_text(text, encoding="utf-8")
    except BaseException:
        for p in reversed(made):  # only what this run created
            shutil.rmtree(p, ignore_errors=True)
        raise
    return load_registry(registry_path).get(entry.id)


def register_any(source: Path, req: Request, registry_path: Path, slide: Path | None = None) -> ModelEntry:
    """:func:`register` for an ``.onnx`` file, a bioimage.io package (folder or rdf.yaml) or a WSInfer folder."""
    if source.suffix == ".onnx":
        return register(source, Request(**{**req.__dict__, "source": req.source or str(source)}), registry_path, slide)
    if source.name.endswith(".yaml") or (source / "rdf.yaml").is_file():
        onnx_path, done = request_from_bioimageio(source, req)
        return register(onnx_path, done, registry_path, slide)
    if (source / "config.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path, done = request_from_wsinfer(source, req, Path(tmp))
            return register(onnx_path, done, registry_path, slide)
    raise RegisterError(
        f"{source}: not an .onnx file, a bioimage.io package (rdf.yaml) or a WSInfer folder (config.json)"
    )
