"""WSInfer model folders from registry entries: QuPath's WSInfer extension and the ``wsinfer`` CLI run them.

A folder is ``config.json`` (WSInfer's model-config spec 1.0: classes, patch size in px, spacing in
um/px, the Resize / ToTensor / Normalize transforms) and ``torchscript_model.pt``. QuPath's extension
(``qupath-extension-wsinfer``) loads it through Deep Java Library's PyTorch, TorchScript only, from the
``user`` or ``local`` folder inside its model directory; the subfolder's name is the name in its menu.
Both WSInfer and the extension **always apply a softmax** to what the network returns, so the network
here returns logits: ``log p`` of the registered model's probabilities, which a softmax turns back into
exactly ``p`` (a sigmoid model's ``p`` becomes the two logits ``log(1 - p), log p``).

The TorchScript is traced from the registry's pinned ONNX graph through the torch engine
(:mod:`zoo.engines.torch_graph`), so it is the same network `zoo run` verifies, and it is checked against ONNX
Runtime on the entry's bundled test before anything is written. ``zoo-export.json`` records both
files' sha256 and the measured difference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bridge.torchscript import batch_sizes_agree, save_traced
from zoo import __version__
from zoo.errors import ExportError, OutputError, OutputExistsError
from zoo.registry import ModelEntry, Registry, sha256_file, verified_model_files

SPEC_VERSION = "1.0"
CONFIG = "config.json"
TORCHSCRIPT = "torchscript_model.pt"
MANIFEST = "zoo-export.json"
#: most a softmax of the exported logits may differ from ONNX Runtime's probabilities on the bundled test
MAX_ABS_DIFF = 1e-4
#: smallest probability kept before the log (a probability of 0 would be -inf)
_TINY = 1e-12


def patch_network(entry: ModelEntry) -> ModelEntry:
    """The network WSInfer can run for ``entry``: a patch classifier itself, or a cascade's first stage.

    Raises:
        ExportError: ``entry`` classifies no patches (WSInfer runs patch classifiers only).
    """
    if entry.kind == "patch-classification" or (entry.kind == "cascade" and entry.output.layout == "NC"):
        if entry.context_inputs:
            raise ExportError(f"{entry.id}: WSInfer feeds one patch per network; this one takes context tiles")
        return entry.networks()[0][1]
    raise ExportError(
        f"{entry.id}: kind {entry.kind!r} with output {entry.output.layout}: WSInfer runs patch classifiers "
        "(one class vector per patch); export a segmentation model with `zoo export bioimageio` or `zoo export fast`"
    )


def wsinfer_transforms(net: ModelEntry) -> list[dict[str, Any]]:
    """Resize, ToTensor (pixels / 255) and Normalize giving exactly the registry's ``(pixel * scale - mean) / std``."""
    spec = net.input
    f = 255.0 * spec.scale  # ToTensor divides by 255; the network wants pixel * scale
    return [
        {"name": "Resize", "arguments": {"size": int(spec.patch_size_px[0])}},
        {"name": "ToTensor"},
        {
            "name": "Normalize",
            "arguments": {"mean": [m / f for m in spec.mean], "std": [s / f for s in spec.std]},
        },
    ]


def wsinfer_config(entry: ModelEntry) -> dict[str, Any]:
    """``config.json`` for ``entry`` (WSInfer model-config spec 1.0).

    Raises:
        ExportError: the entry cannot be expressed (not a patch classifier, non-square or non-RGB patches).
    """
    net = patch_network(entry)
    spec = net.input
    w, h = spec.patch_size_px
    if w != h:
        raise ExportError(f"{entry.id}: patch_size_px {spec.patch_size_px}: WSInfer takes square patches only")
    if spec.channels != 3:
        raise ExportError(f"{entry.id}: {spec.channels} input channels; WSInfer and QuPath feed RGB patches")
    if spec.target_mpp is None:
        raise ExportError(f"{entry.id}: no target_mpp; WSInfer needs the patch spacing in um/px")
    classes = sorted(entry.classes, key=lambda c: c.index)
    return {
        "spec_version": SPEC_VERSION,
        "architecture": f"{entry.name} {entry.version} (TorchScript from the pathology-zoo registry)",
        "num_classes": len(classes),
        "class_names": [c.qupath_name or c.name for c in classes],
        "patch_size_pixels": int(w),
        "spacing_um_px": float(spec.target_mpp),
        "transform": wsinfer_transforms(net),
    }


def _logits_module(net: ModelEntry, onnx_path: Path) -> Any:
    """A torch module: NCHW RGB input as WSInfer makes it, logits whose softmax is the entry's probabilities."""
    import torch

    from zoo.engines.torch_graph import load_graph

    graph = load_graph(str(onnx_path), net.id)
    spec, out = net.input, net.output

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if spec.channel_order == "BGR":
                x = x.flip(1)
            if spec.layout == "NHWC":
                x = x.permute(0, 2, 3, 1)
            y = self.graph(x)[0]
            if out.activation == "none" or (out.activation == "softmax" and not out.already_activated):
                return y
            if out.activation == "sigmoid" and not out.already_activated:
                y = torch.sigmoid(y)
            if out.activation == "sigmoid" and y.shape[1] == 1:
                y = torch.cat([1.0 - y, y], dim=1)
            return torch.log(y.clamp_min(_TINY))

    return Logits().eval()


def _bundled_input_nchw(net: ModelEntry, registry: Registry) -> np.ndarray:
    if net.test is None:
        raise ExportError(f"{net.id}: no bundled test; an export is only written once it is checked on one")
    x = np.load(registry.resolve(net.test.input), allow_pickle=False).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if net.input.layout == "NHWC" else x)


def _onnxruntime_probabilities(onnx_path: Path, net: ModelEntry, x_nchw: np.ndarray) -> np.ndarray:
    from zoo.engines.model import OnnxModel

    x = x_nchw.transpose(0, 2, 3, 1) if net.input.layout == "NHWC" else x_nchw
    model = OnnxModel(onnx_path, net, providers=["CPUExecutionProvider"])
    y = np.asarray(model.predict(np.ascontiguousarray(x)), dtype=np.float64).reshape(len(x), -1)
    if net.output.activation == "sigmoid" and y.shape[1] == 1:
        y = np.concatenate([1.0 - y, y], axis=1)
    return y


def _replaceable(dest: Path, force: bool) -> bool:
    """Whether ``dest`` may be replaced: it does not exist, or it is an earlier zoo WSInfer export and ``force``."""
    if not dest.exists() and not dest.is_symlink():
        return False
    if not force:
        raise OutputExistsError(f"{dest}: exists already; choose another --out, or pass --force to replace it")
    if not (dest.is_dir() and (dest / MANIFEST).is_file()):
        raise OutputExistsError(
            f"{dest}: exists and is not a zoo WSInfer export (no {MANIFEST}); it is never replaced: "
            "choose another --out"
        )
    return True


def export_wsinfer(entry: ModelEntry, registry: Registry, out: Path, force: bool = False) -> Path:
    """Write ``OUT/<name>-<version>/`` (config.json, torchscript_model.pt, zoo-export.json, README.md).

    The folder is built beside its destination and moved into place only once checked; with ``force`` an
    earlier zoo export of that name is replaced, anything else never is.

    Raises:
        ExportError: the entry cannot be exported, or the TorchScript disagrees with ONNX Runtime.
        OutputExistsError: the folder exists (without ``force``), or it is not a zoo export.
    """
    import torch

    config = wsinfer_config(entry)
    net = patch_network(entry)
    onnx_path = verified_model_files(net, registry)[0]
    dest = out / f"{entry.name}-{entry.version}"
    replace = _replaceable(dest, force)
    x = _bundled_input_nchw(net, registry)
    module = _logits_module(net, onnx_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=out))
    except OSError as err:
        raise OutputError(f"{out}: cannot write here ({err.strerror}); choose a writable --out folder") from err
    try:
        loaded = save_traced(module, x, work / TORCHSCRIPT)
        with torch.no_grad():
            p_ts = torch.softmax(loaded(torch.from_numpy(x)), dim=1).double().numpy()
        p_ort = _onnxruntime_probabilities(onnx_path, net, x)
        try:  # QuPath's last batch of an annotation is smaller: every batch size must run
            batches = batch_sizes_agree(loaded, x)
        except RuntimeError as err:
            raise ExportError(
                f"{entry.id}: the traced TorchScript cannot run batches of 1-3 ({str(err).splitlines()[0]}); "
                "nothing was written: report this model's ONNX ops"
            ) from err
        diff = max(float(np.abs(p_ts - p_ort).max()), batches)
        if not diff <= MAX_ABS_DIFF:
            raise ExportError(
                f"{entry.id}: the TorchScript's softmax differs from ONNX Runtime by {diff:.3g} (> {MAX_ABS_DIFF}) "
                "on the bundled test; nothing was written: report this model's ONNX ops"
            )
        (work / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        manifest = {
            "exported_by": f"pathology-zoo {__version__}: zoo export wsinfer {entry.id}",
            "model": entry.id,
            "stage": net.stage_name,
            "onnx": {"uri": net.weights.uri, "sha256": net.weights.sha256},
            "torchscript": {"file": TORCHSCRIPT, "sha256": sha256_file(work / TORCHSCRIPT)},
            "config": {"file": CONFIG, "sha256": sha256_file(work / CONFIG)},
            "checked_on": f"{net.test.input if net.test else ''} ({len(x)} patches)",
            "max_abs_diff_softmax_vs_onnxruntime": diff,
            "outputs": "logits = log(probability); WSInfer and QuPath apply the softmax that gives the probabilities",
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(_readme(entry, registry, config), encoding="utf-8")
        if replace:
            shutil.rmtree(dest)  # an earlier zoo export of this model (checked by _replaceable), --force given
        work.rename(dest)
    except OSError as err:
        raise OutputError(f"{dest}: cannot write the WSInfer folder ({err.strerror}); choose a writable --out") from err
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest


def _readme(entry: ModelEntry, registry: Registry, config: dict[str, Any]) -> str:
    card = registry.resolve(entry.card) if entry.card else None
    lines = [
        f"# {entry.name} {entry.version}",
        "",
        entry.summary,
        "",
        f"- classes: {', '.join(config['class_names'])}",
        f"- patch: {config['patch_size_pixels']} px at {config['spacing_um_px']} um/px",
        f"- licence: {entry.licence}",
    ]
    if entry.warning:
        lines += ["", f"**Warning:** {entry.warning}"]
    lines += ["", "Put this folder in QuPath's WSInfer model directory, inside `user/` (or `local/`)."]
    if card is not None and card.is_file():
        lines += ["", "---", "", card.read_text(encoding="utf-8")]
    return "\n".join(lines) + "\n"
