"""Rewrites of a pinned ONNX graph that keep its arithmetic but suit an engine better (engines layer).

Used by :mod:`zoo.engines.openvino_engine` on the in-memory copy of a model it hands to OpenVINO; the file
on disk, pinned by sha256, is never changed, and ``zoo verify`` checks the rewritten network against the bundled fp32
output like any other engine and precision.

:func:`group_norm_channels_last`: ``torch.onnx.export`` writes ``GroupNorm(G, C)`` as::

    Reshape(x, [0, G, -1]) -> InstanceNormalization(scale 1, bias 0) -> Reshape(., Shape(x))

(the affine follows as Mul, Add). OpenVINO runs convolutions channels-last, but that Reshape needs the
plain (N, C, H, W) layout, so it reorders the activation twice around every GroupNorm: a quarter of
``tissue-multires``' bf16 inference time on a 2-core AVX512_BF16 CPU (OpenVINO 2026.4 profile). The
rewrite computes the same statistics per channel over (H, W), averages them within each group on the
tiny (N, C, 1, 1) tensor and normalises elementwise, so nothing needs the plain layout. The variance is
two-pass (the mean first, then the mean of squared deviations), as InstanceNormalization computes it,
never E[x²] - E[x]².
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def group_norm_channels_last(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each exported GroupNorm (see the module docstring) in layout-free form.

    Returns the copy and the number of GroupNorms rewritten. A pattern whose channel count is unknown,
    whose InstanceNormalization has a scale other than 1 or a bias other than 0, or whose intermediate
    values are used elsewhere is left as it is.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    shapes = _channel_counts(out)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for name in n.input:
            users[name].append(n)

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for norm in g.node:
        if norm.op_type != "InstanceNormalization":
            continue
        before, after = producer.get(norm.input[0]), users[norm.output[0]]
        if before is None or before.op_type != "Reshape" or len(users[before.output[0]]) != 1:
            continue
        if len(after) != 1 or after[0].op_type != "Reshape":
            continue
        src = before.input[0]
        target = consts.get(before.input[1])
        restore = producer.get(after[0].input[1])
        scale, bias = consts.get(norm.input[1]), consts.get(norm.input[2])
        channels = shapes.get(src)
        if (
            target is None
            or target.shape != (3,)
            or int(target[0]) != 0
            or int(target[2]) != -1
            or restore is None
            or restore.op_type != "Shape"
            or restore.input[0] != src
            or scale is None
            or bias is None
            or not np.all(scale == 1)
            or not np.all(bias == 0)
            or not channels
        ):
            continue
        groups = int(target[1])
        if groups <= 0 or channels % groups:
            continue
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        replaced[id(after[0])] = _layout_free_group_norm(
            g, src, after[0].output[0], channels, groups, eps, opset, prefix=f"{norm.name or norm.output[0]}/cl"
        )
        dropped |= {id(before), id(norm)}
    if not replaced:
        return out, 0
    nodes = [m for n in g.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return out, len(replaced)


def _layout_free_group_norm(
    g: onnx.GraphProto, src: str, dst: str, channels: int, groups: int, eps: float, opset: int, prefix: str
) -> list[onnx.NodeProto]:
    """Nodes computing GroupNorm(groups) of ``src`` (N, C, H, W) into ``dst`` from per-channel statistics."""
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(value, f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    def node(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        name = out or f"{prefix}/{op}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [name], name=f"{prefix}/{op}_{len(nodes)}", **attrs))
        return name

    def mean(x: str, axes: list[int]) -> str:  # ReduceMean took axes as an attribute before opset 18
        if opset >= 18:
            return node("ReduceMean", [x, const(f"axes{len(nodes)}", np.array(axes, np.int64))], keepdims=1)
        return node("ReduceMean", [x], axes=axes, keepdims=1)

    per_group = const("per_group", np.array([0, groups, channels // groups], np.int64))
    spread = const("spread", np.array([1, groups, channels // groups], np.int64))
    per_channel = const("per_channel", np.array([0, channels, 1, 1], np.int64))

    def group_mean(stat: str) -> str:  # (N, C, 1, 1) per channel -> its group's mean, again (N, C, 1, 1)
        grouped = mean(node("Reshape", [stat, per_group]), [2])
        return node("Reshape", [node("Expand", [grouped, spread]), per_channel])

    centred = node("Sub", [src, group_mean(mean(src, [2, 3]))])
    var = group_mean(mean(node("Mul", [centred, centred]), [2, 3]))
    inv_std = node("Reciprocal", [node("Sqrt", [node("Add", [var, const("eps", np.array(eps, np.float32))])])])
    node("Mul", [centred, inv_std], out=dst)
    return nodes


def _channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Dimension 1 (channels) of every 4-D value whose shape ONNX shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an unknowable shape only means the pattern is left as it is
        return {}
    out = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            out[v.name] = int(dims[1].dim_value)
    return out


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose results nothing uses (the Shape and Constant nodes a rewrite orphans)."""
    keep = list(nodes)
    while True:
        used = outputs | {i for n in keep for i in n.input}
        alive = [n for n in keep if any(o in used for o in n.output)]
        if len(alive) == len(keep):
            return alive
        keep = alive
