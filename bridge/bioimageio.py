"""bioimage.io model packages (format 0.5) from registry entries, for bioimage.io tools and QuPath's
bioimage.io support.

A package is a folder: ``rdf.yaml`` (typed axes with their spacing in micrometer, the registry's
normalisation as ``ensure_dtype`` + ``scale_linear`` preprocessing, test tensors, weights, each file with
its sha256), the pinned ONNX file, a TorchScript traced from it through the torch engine
(:mod:`zoo.engines.torch_graph`; QuPath's extension runs TorchScript through Deep Java Library), the test tensors
and ``README.md`` (the card, with a ``# Validation`` section). The test input is the entry's bundled test
patch as the RGB pixels it was made from (uint8, or float 0-255 where it was resampled); the expected
output is what ONNX Runtime computes from them after that preprocessing, checked against the registry's
own expected output before anything is written.

``bioimageio test rdf.yaml`` (bioimageio.core) is the consumer's check; the tests run it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bridge.torchscript import batch_sizes_agree, save_traced
from zoo import __version__
from zoo.errors import ExportError, OutputError, OutputExistsError
from zoo.registry import ModelEntry, Registry, sha256_file, verified_model_files

FORMAT_VERSION = "0.5.4"
RDF = "rdf.yaml"
MANIFEST = "zoo-export.json"
#: licences bioimage.io accepts that registry entries use (SPDX identifiers)
_SPDX = ("MIT", "Apache-2.0", "BSD-3-Clause", "BSD-2-Clause", "CC0-1.0", "CC-BY-4.0", "GPL-3.0-only")
#: most the export's expected output may differ from the registry's bundled expected output
MAX_ABS_DIFF = 1e-4


def _tensor_id(name: str) -> str:
    tid = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_")[:32]
    return tid if tid and tid[0].isalpha() else f"t_{tid}"[:32]


def _identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"c_{ident}"


def check_eligible(entry: ModelEntry) -> None:
    """Refuse what a single-input bioimage.io package cannot describe, with the reason.

    Raises:
        ExportError: not a single-input segmentation network, or a licence that is not an SPDX identifier.
    """
    if entry.kind != "segmentation" or entry.context_inputs:
        raise ExportError(
            f"{entry.id}: kind {entry.kind!r}: a bioimage.io export is for single-input segmentation models; "
            "export patch classifiers with `zoo export wsinfer`"
        )
    if entry.input.channel_order not in ("RGB", "BGR") or entry.input.channels != 3:
        raise ExportError(f"{entry.id}: {entry.input.channels} channels ({entry.input.channel_order}); RGB only")
    if entry.test is None:
        raise ExportError(f"{entry.id}: no bundled test; a bioimage.io package needs one: add test: to the entry")
    if not entry.cite:
        raise ExportError(f"{entry.id}: bioimage.io needs a citation with a DOI or URL: add cite: to the entry")
    _licence(entry)


def _licence(entry: ModelEntry) -> str:
    first = re.split(r"[\s;(]", entry.licence.strip(), maxsplit=1)[0]
    if first not in _SPDX:
        raise ExportError(
            f"{entry.id}: licence {entry.licence!r} does not start with an SPDX identifier ({', '.join(_SPDX)}); "
            "fix licence: in the registry"
        )
    return first


def _gain_offset(entry: ModelEntry) -> tuple[list[float], list[float]]:
    """``x = pixel * gain + offset`` per channel, the registry's ``(pixel * scale - mean) / std``."""
    spec = entry.input
    gain = [spec.scale / s for s in spec.std]
    offset = [-m / s for m, s in zip(spec.mean, spec.std, strict=True)]
    return gain, offset


def _raw_test_input(entry: ModelEntry, registry: Registry) -> np.ndarray:
    """Pixels of the first bundled test sample in the network's layout: uint8 where they are whole numbers,
    else float32 0-255."""
    assert entry.test is not None
    x = np.load(registry.resolve(entry.test.input), allow_pickle=False).astype(np.float32)[:1]
    spec = entry.input
    ch_axis = 1 if spec.layout == "NCHW" else 3
    shape = [1, 1, 1, 1]
    shape[ch_axis] = spec.channels
    mean, std = (np.asarray(v, np.float32).reshape(shape) for v in (spec.mean, spec.std))
    pixels = (x * std + mean) / spec.scale
    whole = np.rint(pixels)
    if np.abs(pixels - whole).max() < 1e-3 and whole.min() >= 0 and whole.max() <= 255:
        return whole.astype(np.uint8)
    return pixels.astype(np.float32)  # made from resampled pixels: kept as float 0-255 values


def _axes(entry: ModelEntry, channel_names: list[str], size_ref: str | None, hw: tuple[int, int]) -> list[Any]:
    mpp = entry.input.target_mpp
    space: list[dict[str, Any]] = []
    for axis_id, size in zip(("y", "x"), hw, strict=True):
        ax: dict[str, Any] = {"type": "space", "id": axis_id}
        ax["size"] = {"tensor_id": size_ref, "axis_id": axis_id} if size_ref else int(size)
        if mpp is not None:
            ax.update(unit="micrometer", scale=float(mpp))
        space.append(ax)
    channel = {"type": "channel", "channel_names": channel_names}
    layout = entry.input.layout if size_ref is None else entry.output.layout
    return [{"type": "batch"}, channel, *space] if layout == "NCHW" else [{"type": "batch"}, *space, channel]


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def rdf(
    entry: ModelEntry, files: dict[str, str], out_shape: tuple[int, ...], opset: int, in_dtype: str = "uint8"
) -> dict[str, Any]:
    """The ``rdf.yaml`` content; ``files`` maps role (onnx, torchscript, test_input, test_output) to file name."""
    spec, out = entry.input, entry.output
    w, h = spec.patch_size_px
    gain, offset = _gain_offset(entry)
    scale_kwargs: dict[str, Any]
    if len(set(gain)) == 1 and len(set(offset)) == 1:
        scale_kwargs = {"gain": gain[0], "offset": offset[0]}
    else:
        scale_kwargs = {"axis": "channel", "gain": gain, "offset": offset}
    in_id, out_id = _tensor_id(spec.input_name), _tensor_id(out.output_name)
    if out_id == in_id:
        out_id = f"{out_id}_out"[:32]
    out_hw = (out_shape[2], out_shape[3]) if out.layout == "NCHW" else (out_shape[1], out_shape[2])
    classes = sorted(entry.classes, key=lambda c: c.index)
    out_names = [c.name for c in (classes[1:] if out.channels == 1 else classes)]
    import torch  # the TorchScript's version is part of the package

    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": entry.name,
        "version": entry.version,
        "description": entry.summary,
        "authors": [{"name": "pathology-zoo"}],
        "cite": [{k: v for k, v in c.model_dump().items() if v} for c in entry.cite],
        "license": _licence(entry),
        "documentation": "README.md",
        "tags": ["pathology", "whole-slide-imaging", "h&e", entry.task, "onnx", "torchscript"],
        "inputs": [
            {
                "id": in_id,
                "description": f"{spec.channel_order} pixels of a {w}x{h} px patch"
                + (f" at {spec.target_mpp} um/px" if spec.target_mpp else " (the whole slide, resized)"),
                "axes": _axes(entry, ["R", "G", "B"] if spec.channel_order == "RGB" else ["B", "G", "R"], None, (h, w)),
                "test_tensor": {"source": files["test_input"], "sha256": files["test_input_sha256"]},
                "data": {"type": in_dtype},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {"id": "scale_linear", "kwargs": scale_kwargs},
                    # bioimage.io casts back to data.type unless the last step says otherwise
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                ],
            }
        ],
        "outputs": [
            {
                "id": out_id,
                "description": f"{out.activation} probability per class ({', '.join(out_names)})",
                "axes": _axes(entry, [_identifier(n) for n in out_names], in_id if out_hw == (h, w) else None, out_hw),
                "test_tensor": {"source": files["test_output"], "sha256": files["test_output_sha256"]},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }
        ],
        # what bioimage.io has no field for, so that `zoo register` of this package runs as the original does
        "config": {
            "pathology-zoo": {
                "model": entry.id,
                "classes": [c.model_dump(mode="json", exclude_none=True) for c in classes],
                "input": {"overlap": spec.overlap, "mode": spec.mode, "trained_mpp": list(spec.trained_mpp)},
                "output": {"threshold": out.threshold},
                "selection": entry.selection.model_dump(mode="json", exclude_none=True),
            }
        },
        "weights": {
            "onnx": {"source": files["onnx"], "sha256": files["onnx_sha256"], "opset_version": opset},
            "torchscript": {
                "source": files["torchscript"],
                "sha256": files["torchscript_sha256"],
                "pytorch_version": torch.__version__.split("+")[0],
                "parent": "onnx",
            },
        },
    }


def _graph_module(entry: ModelEntry, onnx_path: Path) -> Any:
    import torch

    from zoo.engines.torch_graph import load_graph

    graph = load_graph(str(onnx_path), entry.id)

    class First(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.graph(x)[0]

    return First().eval()


def export_bioimageio(entry: ModelEntry, registry: Registry, out: Path, force: bool = False) -> Path:
    """Write ``OUT/<name>-<version>/`` as a bioimage.io model package (see the module docstring).

    Built beside its destination and moved into place once checked; with ``force`` an earlier zoo export of
    that name is replaced, anything else never is.

    Raises:
        ExportError: the entry cannot be described, or the export disagrees with the registry's test.
        OutputExistsError: the folder exists (without ``force``), or it is not a zoo export.
    """
    import torch

    from zoo.engines.model import OnnxModel

    check_eligible(entry)
    onnx_path = verified_model_files(entry, registry)[0]
    if entry.weights.files:
        raise ExportError(f"{entry.id}: ONNX with external data files; bioimage.io takes one weights file")
    dest = out / f"{entry.name}-{entry.version}"
    replace = _replaceable(dest, force)
    pixels = _raw_test_input(entry, registry)
    gain, offset = (np.asarray(v, np.float32) for v in _gain_offset(entry))
    shape = [1, -1, 1, 1] if entry.input.layout == "NCHW" else [1, 1, 1, -1]
    x = pixels.astype(np.float32) * gain.reshape(shape) + offset.reshape(shape)  # as bioimage.io computes it
    model = OnnxModel(onnx_path, entry, providers=["CPUExecutionProvider"])
    y = np.asarray(model.raw(np.ascontiguousarray(x)), dtype=np.float32)
    assert entry.test is not None
    expected = np.load(registry.resolve(entry.test.expected), allow_pickle=False)[:1]
    diff = float(np.abs(y.astype(np.float64) - expected).max()) if expected.shape == y.shape else float("inf")
    if not diff <= max(MAX_ABS_DIFF, entry.test.atol):
        raise ExportError(
            f"{entry.id}: the test tensor rebuilt from uint8 pixels gives outputs {diff:.3g} from the registry's "
            "test; nothing was written: regenerate the bundled test"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=out))
    except OSError as err:
        raise OutputError(f"{out}: cannot write here ({err.strerror}); choose a writable --out folder") from err
    try:
        names = {
            "onnx": f"{entry.name}.onnx",
            "torchscript": f"{entry.name}.pt",
            "test_input": "test_input.npy",
            "test_output": "test_output.npy",
        }
        shutil.copyfile(onnx_path, work / names["onnx"])
        np.save(work / names["test_input"], pixels)
        np.save(work / names["test_output"], y)
        loaded = save_traced(_graph_module(entry, onnx_path), x, work / names["torchscript"])
        with torch.no_grad():
            y_ts = loaded(torch.from_numpy(x)).numpy()
        ts_diff = max(float(np.abs(y_ts - y).max()), _batches(entry, loaded, x))
        if not ts_diff <= MAX_ABS_DIFF:
            raise ExportError(
                f"{entry.id}: the TorchScript differs from ONNX Runtime by {ts_diff:.3g} on the test tensor; "
                "nothing was written: report this model's ONNX ops"
            )
        files: dict[str, str] = dict(names)
        files.update({f"{k}_sha256": sha256_file(work / v) for k, v in names.items()})
        description = rdf(entry, files, y.shape, _opset(onnx_path), str(pixels.dtype))
        (work / RDF).write_text(yaml.safe_dump(description, sort_keys=False, allow_unicode=True), encoding="utf-8")
        (work / "README.md").write_text(_readme(entry, registry, diff, ts_diff), encoding="utf-8")
        manifest = {
            "exported_by": f"pathology-zoo {__version__}: zoo export bioimageio {entry.id}",
            "model": entry.id,
            "onnx": {"uri": entry.weights.uri, "sha256": entry.weights.sha256},
            "files": {v: files[f"{k}_sha256"] for k, v in names.items()},
            "max_abs_diff_vs_registry_test": diff,
            "max_abs_diff_torchscript_vs_onnxruntime": ts_diff,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if replace:
            shutil.rmtree(dest)  # an earlier zoo export of this model (checked by _replaceable), --force given
        work.rename(dest)
    except OSError as err:
        raise OutputError(f"{dest}: cannot write the package ({err.strerror}); choose a writable --out") from err
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest


def _batches(entry: ModelEntry, loaded: Any, x: np.ndarray) -> float:
    try:
        return batch_sizes_agree(loaded, x)
    except RuntimeError as err:
        raise ExportError(
            f"{entry.id}: the traced TorchScript cannot run batches of 1-3 ({str(err).splitlines()[0]}); "
            "nothing was written: report this model's ONNX ops"
        ) from err


def _replaceable(dest: Path, force: bool) -> bool:
    if not dest.exists() and not dest.is_symlink():
        return False
    if not force:
        raise OutputExistsError(f"{dest}: exists already; choose another --out, or pass --force to replace it")
    if not (dest.is_dir() and (dest / MANIFEST).is_file() and (dest / RDF).is_file()):
        raise OutputExistsError(
            f"{dest}: exists and is not a zoo bioimage.io export; it is never replaced: choose another --out"
        )
    return True


def _readme(entry: ModelEntry, registry: Registry, diff: float, ts_diff: float) -> str:
    card = registry.resolve(entry.card) if entry.card else None
    body = card.read_text(encoding="utf-8") if card is not None and card.is_file() else entry.summary
    metrics = json.dumps(entry.metrics, indent=1, default=str)
    lines = [body.rstrip(), ""]
    if entry.warning:
        lines += [f"**Warning:** {entry.warning}", ""]
    lines += [
        "# Validation",
        "",
        f"Registry metrics of {entry.id} (pathology-zoo):",
        "",
        "```json",
        metrics,
        "```",
        "",
        f"This package's test tensor is the registry's bundled test patch as 0-255 pixels; its output differs from "
        f"the registry's expected output by at most {diff:.2g}, and the TorchScript weights from the ONNX weights "
        f"by at most {ts_diff:.2g}.",
        "",
    ]
    return "\n".join(lines)
