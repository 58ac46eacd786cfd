"""zoo.engines.openvino_rewrite: the exported GroupNorm pattern rewritten channels-last, same arithmetic (issue #15)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoo.engines.openvino_rewrite import group_norm_channels_last
from zoo.registry import load_registry, verified_weights


def _exported_group_norm(opset: int, channels: int = 8, groups: int = 2, scale: float = 1.0) -> onnx.ModelProto:
    """Conv -> GroupNorm as torch.onnx.export writes it (Reshape, InstanceNormalization, Shape, Reshape, Mul, Add)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) + 2.0, "b"),  # non-zero means
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "target"),
        numpy_helper.from_array(np.full(groups, scale, np.float32), "in_scale"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "in_bias"),
        numpy_helper.from_array(rng.standard_normal((channels, 1, 1)).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal((channels, 1, 1)).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "target"], ["r"]),
        helper.make_node("InstanceNormalization", ["r", "in_scale", "in_bias"], ["n"], epsilon=1e-5),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Reshape", ["n", "s"], ["back"]),
        helper.make_node("Mul", ["back", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize("opset", [17, 18], ids=["axes-attribute", "axes-input"])
def test_group_norm_is_rewritten_with_the_same_result(opset: int) -> None:
    model = _exported_group_norm(opset)
    rewritten, n = group_norm_channels_last(model)
    assert n == 1
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [node.op_type for node in rewritten.graph.node]
    assert "InstanceNormalization" not in ops and "Shape" not in ops  # the orphaned Shape is gone too
    assert {i.name for i in rewritten.graph.initializer}.isdisjoint({"target", "in_scale", "in_bias"})
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32) * 5
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=0, atol=2e-5)
    assert len(model.graph.node) == 7  # the original is left untouched


def test_a_pattern_with_an_instance_norm_scale_is_left_alone() -> None:
    model = _exported_group_norm(17, scale=2.0)
    rewritten, n = group_norm_channels_last(model)
    assert n == 0 and [a.op_type for a in rewritten.graph.node] == [a.op_type for a in model.graph.node]


def test_uneven_groups_are_left_alone() -> None:
    model = _exported_group_norm(17, channels=6, groups=4)
    assert group_norm_channels_last(model)[1] == 0


def test_tissue_multires_every_group_norm_rewritten_same_output() -> None:
    reg = load_registry()
    entry = reg.get("tissue-multires")
    model = onnx.load(verified_weights(entry, reg))
    rewritten, n = group_norm_channels_last(model)
    assert n == sum(node.op_type == "InstanceNormalization" for node in model.graph.node) == 24
    x = np.load(reg.resolve(entry.test.input))  # type: ignore[union-attr]
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=0, atol=1e-4)
