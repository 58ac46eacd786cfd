"""Run a pinned ONNX graph with torch operators: the runner's ``torch`` engine (CUDA GPUs, or the CPU).

Imported by :mod:`zoo.engines.torch_engine` only, when ``--engine torch`` is asked for.
The weights are the ONNX file's own initializers, so the torch engine runs exactly the file the registry
pins by sha256, and ``zoo verify`` checks it against ONNX Runtime on the model's bundled test like every
other engine.

Why not onnx2torch: it imports torchvision at import time, and the only torchvision builds on PyPI for
Linux are CUDA builds that fail to load beside the CPU torch this project installs. The ops below are the
ones the registered models use (Conv, ConvTranspose, norms, pooling, Resize, Gemm and the shape arithmetic
torch.onnx.export writes); any other op is refused when the graph is loaded, naming the op.

Shape arithmetic (Shape, Gather, Cast, ... on int64) stays on the CPU so a GPU never has to synchronise for it;
fp16/bf16 run under :func:`torch.autocast`, which keeps normalisation and softmax in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from zoo.errors import ModelInputError

_Op = Callable[[list[Any], dict[str, Any]], list[Any]]
_OPS: dict[str, _Op] = {}

#: ONNX TensorProto element types to torch dtypes (those a model's shape arithmetic or weights use).
_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def _op(*names: str) -> Callable[[_Op], _Op]:
    def register(fn: _Op) -> _Op:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def supported_ops() -> set[str]:
    """The ONNX op types this engine runs."""
    return set(_OPS)


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _sym_pads(pads: list[int], what: str) -> list[int]:
    """ONNX pads (begin..., end...) to torch's symmetric padding, refusing asymmetric ones."""
    n = len(pads) // 2
    if pads[:n] != pads[n:]:
        raise ModelInputError(f"{what} with asymmetric pads {pads} is not supported by the torch engine")
    return pads[:n]


@_op("Conv")
def _conv(x: list[Any], a: dict[str, Any]) -> list[Any]:
    w = x[1]
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise ModelInputError(f"Conv auto_pad={a['auto_pad']!r} is not supported by the torch engine")
    dims = w.dim() - 2
    pads = _sym_pads(a.get("pads", [0] * 2 * dims), "Conv")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    bias = x[2] if len(x) > 2 else None
    return [conv(x[0], w, bias, a.get("strides", 1), pads, a.get("dilations", 1), a.get("group", 1))]


@_op("ConvTranspose")
def _conv_t(x: list[Any], a: dict[str, Any]) -> list[Any]:
    if "output_shape" in a or a.get("auto_pad", "NOTSET") != "NOTSET":
        raise ModelInputError("ConvTranspose with output_shape/auto_pad is not supported by the torch engine")
    w = x[1]
    dims = w.dim() - 2
    pads = _sym_pads(a.get("pads", [0] * 2 * dims), "ConvTranspose")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    bias = x[2] if len(x) > 2 else None
    out_pad = a.get("output_padding", [0] * dims)
    return [conv(x[0], w, bias, a.get("strides", 1), pads, out_pad, a.get("group", 1), a.get("dilations", 1))]


@_op("MaxPool")
def _maxpool(x: list[Any], a: dict[str, Any]) -> list[Any]:
    k = a["kernel_shape"]
    pads = _sym_pads(a.get("pads", [0] * 2 * len(k)), "MaxPool")
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(k)]
    return [pool(x[0], k, a.get("strides", k), pads, a.get("dilations", 1), bool(a.get("ceil_mode", 0)))]


@_op("AveragePool")
def _avgpool(x: list[Any], a: dict[str, Any]) -> list[Any]:
    k = a["kernel_shape"]
    pads = _sym_pads(a.get("pads", [0] * 2 * len(k)), "AveragePool")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(k)]
    include = bool(a.get("count_include_pad", 0))
    return [pool(x[0], k, a.get("strides", k), pads, bool(a.get("ceil_mode", 0)), include)]


@_op("Relu")
def _relu(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.relu(x[0])]


@_op("LeakyRelu")
def _leaky(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.leaky_relu(x[0], a.get("alpha", 0.01))]


@_op("Sigmoid")
def _sigmoid(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.sigmoid(x[0])]


@_op("Log")
def _log(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.log(x[0])]


@_op("Softmax")
def _softmax(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.softmax(x[0].float(), a.get("axis", -1))]


@_op("Clip")
def _clip(x: list[Any], a: dict[str, Any]) -> list[Any]:
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return [torch.clamp(x[0], lo, hi)]


def _aligned(a: Any, b: Any) -> tuple[Any, Any]:
    """Move a small CPU constant to the other operand's device (CPU scalars need no move)."""
    if a.device != b.device:
        if a.device.type == "cpu" and a.dim():
            a = a.to(b.device)
        elif b.device.type == "cpu" and b.dim():
            b = b.to(a.device)
    return a, b


def _binary(fn: Callable[[Any, Any], Any]) -> _Op:
    def run(x: list[Any], a: dict[str, Any]) -> list[Any]:
        return [fn(*_aligned(x[0], x[1]))]

    return run


_op("Add")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))


@_op("Div")
def _div(x: list[Any], a: dict[str, Any]) -> list[Any]:
    num, den = _aligned(x[0], x[1])
    if not num.is_floating_point():  # ONNX integer division truncates
        return [torch.div(num, den, rounding_mode="trunc")]
    return [torch.div(num, den)]


@_op("Concat")
def _concat(x: list[Any], a: dict[str, Any]) -> list[Any]:
    parts = [t for t in x if t is not None and t.numel() > 0] or [x[0]]
    if parts[0].is_floating_point():
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))  # any number of inputs
        parts = [p.to(dtype) for p in parts]
    return [torch.cat(parts, a["axis"])]


@_op("Shape")
def _shape(x: list[Any], a: dict[str, Any]) -> list[Any]:
    if torch.jit.is_tracing():  # a traced shape (TorchScript exports): the batch size stays free
        return [torch._shape_as_tensor(x[0])[a.get("start", 0) : a.get("end", None)]]
    shape = list(x[0].shape)[a.get("start", 0) : a.get("end", None)]
    return [torch.tensor(shape, dtype=torch.int64)]


@_op("Gather")
def _gather(x: list[Any], a: dict[str, Any]) -> list[Any]:
    data, idx = x
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).to(torch.int64)
    out = data.index_select(axis, idx.reshape(-1).to(data.device))
    return [out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]


@_op("Cast")
def _cast(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0].to(_DTYPES[a["to"]])]


@_op("Unsqueeze")
def _unsqueeze(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axes = _ints(x[1]) if len(x) > 1 else a["axes"]
    out = x[0]
    rank = out.dim() + len(axes)
    for ax in sorted(v % rank for v in axes):
        out = out.unsqueeze(ax)
    return [out]


@_op("Reshape")
def _reshape(x: list[Any], a: dict[str, Any]) -> list[Any]:
    if torch.jit.is_tracing() and isinstance(x[1], torch.Tensor):
        return [_traced_reshape(x[0], x[1], bool(a.get("allowzero", 0)))]
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _traced_reshape(data: Any, shape: Any, allowzero: bool) -> Any:
    """Reshape with the target kept as a traced tensor (0 copies that input dim), so that shapes computed
    from the input (``Shape`` -> ``Reshape``, as in exported GroupNorms) follow the batch size."""
    shape = shape.to(torch.int64).cpu()
    if not allowzero:
        src = torch._shape_as_tensor(data)
        n = int(shape.numel())
        src = torch.cat([src, torch.ones(max(0, n - len(src)), dtype=torch.int64)])[:n]
        shape = torch.where(shape == 0, src, shape)
    return data.reshape(list(shape.unbind(0)))


@_op("Flatten")
def _flatten(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axis = a.get("axis", 1) % max(x[0].dim(), 1)
    return [x[0].reshape(math.prod(x[0].shape[:axis]), -1)]


@_op("Transpose")
def _transpose(x: list[Any], a: dict[str, Any]) -> list[Any]:
    perm = a.get("perm", list(range(x[0].dim()))[::-1])
    return [x[0].permute(*perm)]


@_op("Slice")
def _slice(x: list[Any], a: dict[str, Any]) -> list[Any]:
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    backwards: list[tuple[int, int, int, int]] = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ModelInputError("Slice with step 0 is not valid ONNX; re-export the model")
        n = data.shape[ax]
        if st < 0:  # ONNX clamps starts to [0, n-1] and ends to [-1, n-1] when stepping backwards (flips)
            s0 = min(max(s + n if s < 0 else s, 0), n - 1)
            e0 = min(max(e + n if e < 0 else e, -1), n - 1)
            backwards.append((ax % data.dim(), s0, e0, st))
            continue
        index[ax % data.dim()] = slice(max(s, -n), min(e, n), st)  # ONNX clamps starts and ends
    out = data[tuple(index)]
    for ax, s0, e0, st in backwards:  # flip, then step forwards: traces and re-exports as ONNX's own Slice
        n = out.shape[ax]
        back: list[slice] = [slice(None)] * out.dim()
        back[ax] = slice(n - 1 - s0, n - 1 - e0, -st)
        out = out.flip(ax)[tuple(back)]
    return [out]


@_op("Pad")
def _pad(x: list[Any], a: dict[str, Any]) -> list[Any]:
    pads = _ints(x[1]) if len(x) > 1 else a["pads"]
    value = float(x[2]) if len(x) > 2 and x[2] is not None and x[2].numel() else float(a.get("value", 0.0))
    mode = a.get("mode", "constant")
    n = len(pads) // 2
    torch_pads: list[int] = []
    for ax in reversed(range(n)):  # torch pads the last axis first
        torch_pads += [pads[ax], pads[ax + n]]
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:
        torch_pads = torch_pads[:-2]
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    return [F.pad(x[0], torch_pads, tmode, value if tmode == "constant" else None)]


@_op("Resize")
def _resize(x: list[Any], a: dict[str, Any]) -> list[Any]:
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    data = x[0]
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if sizes is not None:
        size = _ints(sizes)[2:]
    else:
        scales = [float(s) for s in x[2].tolist()][2:]
        size = [math.floor(n * s) for n, s in zip(data.shape[2:], scales)]
    if mode == "linear" and data.dim() == 4 and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return [F.interpolate(data, size=size, mode="bilinear", align_corners=ctm == "align_corners")]
    if mode == "nearest" and ctm == "asymmetric" and a.get("nearest_mode", "floor") == "floor":
        return [F.interpolate(data, size=size, mode="nearest")]
    raise ModelInputError(
        f"Resize mode={mode} coordinate_transformation_mode={ctm} is not supported by the torch engine"
    )


@_op("InstanceNormalization")
def _instance_norm(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.instance_norm(x[0].float(), weight=x[1].float(), bias=x[2].float(), eps=a.get("epsilon", 1e-5))]


@_op("BatchNormalization")
def _batch_norm(x: list[Any], a: dict[str, Any]) -> list[Any]:
    data, scale, bias, mean, var = x[:5]
    return [F.batch_norm(data, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))]


@_op("Gemm")
def _gemm(x: list[Any], a: dict[str, Any]) -> list[Any]:
    m, w = x[0], x[1]
    if a.get("transA", 0):
        m = m.t()
    if a.get("transB", 0):
        w = w.t()
    out = a.get("alpha", 1.0) * (m @ w)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return [out]


@_op("ReduceMean")
def _reduce_mean(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("axes")
    dims = axes if axes else list(range(x[0].dim()))
    return [x[0].mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))]


@_op("Identity")
def _identity(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0]]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes: tensors as torch tensors, strings decoded."""
    out: dict[str, Any] = {}
    for att in node.attribute:
        value = onnx.helper.get_attribute_value(att)
        if isinstance(value, onnx.TensorProto):
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        elif isinstance(value, bytes):
            value = value.decode()
        out[att.name] = value
    return out


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True))


#: Constants up to this many elements (scalars, shape arithmetic) stay on the CPU.
_CPU_CONSTANT_MAX = 16


class OnnxGraph(torch.nn.Module):
    """An ONNX graph as a torch module: ``forward(*inputs)`` in the graph's input order, returns its outputs.

    Float initializers and constants are buffers (they follow ``.to(device)``); integer and tiny ones
    (shapes, axes, scalars) stay on the CPU.
    """

    def __init__(self, model: onnx.ModelProto, where: str) -> None:
        super().__init__()
        missing = sorted({n.op_type for n in model.graph.node} - set(_OPS) - {"Constant"})
        if missing:
            raise ModelInputError(
                f"{where}: the torch engine does not run ONNX ops {', '.join(missing)}; "
                "use --engine onnxruntime or openvino for this model"
            )
        self.where = where
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self._slots: dict[str, str] = {}  # ONNX value name -> buffer name
        self._cpu: dict[str, torch.Tensor] = {}
        for t in model.graph.initializer:
            self._keep(t.name, numpy_helper.to_array(t))
        self._nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for node in model.graph.node:
            if node.op_type == "Constant":
                value = _attributes(node)
                tensor = value.get("value")
                if tensor is None:
                    scalar = value.get("value_float", value.get("value_int"))
                    tensor = torch.tensor(scalar)
                self._keep(node.output[0], tensor.numpy())
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), _attributes(node)))

    def _keep(self, name: str, arr: np.ndarray) -> None:
        t = _tensor(arr)
        if t.is_floating_point() and t.numel() > _CPU_CONSTANT_MAX:
            slot = f"c{len(self._slots)}"
            self.register_buffer(slot, t, persistent=False)
            self._slots[name] = slot
        else:
            self._cpu[name] = t

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, Any] = dict(self._cpu)
        env.update({name: getattr(self, slot) for name, slot in self._slots.items()})
        env.update(zip(self.input_names, inputs))
        env[""] = None
        for op, ins, outs, atts in self._nodes:
            try:
                results = _OPS[op]([env[n] for n in ins], atts)
            except ModelInputError:
                raise
            except (RuntimeError, KeyError, IndexError, ValueError) as err:
                raise ModelInputError(f"{self.where}: the torch engine failed at ONNX op {op} ({err})") from err
            env.update(zip(outs, results))
        return [env[n] for n in self.output_names]


def load_graph(path: str, where: str) -> OnnxGraph:
    """Load an ONNX file (external data included) as an :class:`OnnxGraph`; ``where`` names it in errors."""
    try:
        model = onnx.load(path)
    except Exception as err:  # onnx raises DecodeError and friends
        raise ModelInputError(f"{path}: not a readable ONNX file ({err}); re-export the model") from err
    return OnnxGraph(model, where).eval()
