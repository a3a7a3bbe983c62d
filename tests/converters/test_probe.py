"""The golden probe is made inside converters/, with the device's own runtime wrapper, in the shared file format."""

import ast
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from converters.probe import golden_probe
from fleet_protocol.probe import read_golden

ROOT = Path(__file__).resolve().parents[2]


def affine_model(path: Path) -> Path:
    """y = 2x + 1 over a [1, 4] float input."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])], "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_probe_holds_the_sample_and_what_the_artifact_answers(tmp_path):
    x = np.array([[0.0, 1.0, -2.0, 3.5]], np.float32)
    golden = read_golden(golden_probe(affine_model(tmp_path / "affine.onnx"), {"x": x}))
    assert set(golden.inputs) == {"x"} and np.array_equal(golden.inputs["x"], x)
    assert set(golden.expected) == {"y"} and np.allclose(golden.expected["y"], 2 * x + 1)


def test_the_server_imports_no_agent_code():
    """The conversion child gets its probes from converters.probe; the server itself never imports the agent."""
    for module in sorted((ROOT / "fleet_server").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "agent" or n.startswith("agent.") for n in names), module.name
