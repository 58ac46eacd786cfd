"""ONNX export shared by the model families: dynamic batch, probabilities out, checked against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def _fix_output_dims(path: Path, shape: tuple[int, ...], dynamic: set[int]) -> None:
    """Declare the output's fixed axes (every axis not in ``dynamic``) with their sizes from a traced run: the
    tracer leaves axes made by reshapes symbolic (a test-time-augmentation average, say), and the registry,
    WSInfer and bioimage.io read the class count from the graph."""
    import onnx

    model = onnx.load_model(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    changed = False
    for axis, d in enumerate(dims):
        if axis not in dynamic and not d.HasField("dim_value"):
            d.dim_value = int(shape[axis])
            changed = True
    if changed:
        onnx.save_model(model, str(path))


def export_onnx(
    model: nn.Module,
    chw: tuple[int, int, int] | list[tuple[int, int, int]],
    onnx_path: Path,
    input_name: str | list[str],
    output_name: str,
    tol: float = 1e-4,
    dynamic_hw: bool = False,
) -> float:
    """Export ``model`` (eval mode, outputs probabilities) with a dynamic batch axis; return max |torch - ORT|.

    Several inputs: ``chw`` and ``input_name`` are lists, one per input, in ``forward``'s order.

    Raises:
        ValueError: ONNX Runtime and torch disagree by more than ``tol`` (nothing is written).
    """
    import onnxruntime as ort

    model = model.eval()
    shapes = chw if isinstance(chw, list) else [chw]
    names = input_name if isinstance(input_name, list) else [input_name]
    gen = torch.Generator().manual_seed(0)
    xs = tuple(torch.rand(2, *s, generator=gen) for s in shapes)
    axes: dict[int, str] = {0: "batch"}
    if dynamic_hw:
        axes.update({2: "height", 3: "width"})
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        xs,
        str(tmp),
        input_names=names,
        output_names=[output_name],
        dynamic_axes={**{n: dict(axes) for n in names}, output_name: dict(axes)},
        opset_version=17,
        dynamo=False,
    )
    with torch.no_grad():
        ref = model(*xs).numpy()
    _fix_output_dims(tmp, ref.shape, set(axes))
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0]
    err = float(np.abs(ref - got).max())
    if err > tol:
        tmp.unlink()
        raise ValueError(f"{onnx_path}: ONNX Runtime output differs from torch by {err:.2e} > {tol:.0e}")
    tmp.replace(onnx_path)
    return err


def bundle_test(net: nn.Module, onnx_path: Path, arrays: dict[str, np.ndarray]) -> float:
    """Write ``arrays`` (input name -> float32 NCHW; ``image`` first) beside ``onnx_path`` as ``test_input.npy``
    (one input) or ``.npz`` (several), the torch network's output as ``test_expected.npy``; return the ONNX
    file's largest difference from that output."""
    import onnxruntime as ort

    out_dir = onnx_path.parent
    if len(arrays) > 1:
        np.savez_compressed(out_dir / "test_input.npz", **arrays)  # type: ignore[arg-type]
    else:
        np.save(out_dir / "test_input.npy", arrays["image"])
    with torch.no_grad():
        expected = net.eval()(*[torch.from_numpy(arrays[k]) for k in ("image", "context") if k in arrays]).numpy()
    np.save(out_dir / "test_expected.npy", expected)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return float(np.abs(sess.run(None, arrays)[0] - expected).max())
