"""Runtime backends on real models: ONNX Runtime (absent providers are not an error), LiteRT, and the
tflite-runtime fallback in its own numpy<2 environment (created by `make test`)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.tflite_int8 import LiteRTModel
from fleet_runtime import runtimes
from tests import zoo

ROOT = Path(__file__).resolve().parents[2]
TFLITE_VENV = ROOT / ".venv-tflite" / "bin" / "python"


def test_onnx_backend_skips_absent_providers_and_describes_io(tmp_path):
    m = runtimes.load(zoo.mlp_opset(tmp_path / "m.onnx", opset=13),
                      providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert m.backend == "onnxruntime" and m.providers == ["CPUExecutionProvider"]
    assert m.inputs[0].describe() == {"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}
    out = m.run({"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert out["y"].shape == (1, 10)
    dyn = runtimes.load(zoo.mobilenet_like(tmp_path / "d.onnx", dynamic_batch=True, size=32))
    assert dyn.inputs[0].shape[0] is None  # a dynamic dimension is None
    with pytest.raises(runtimes.RuntimeLoadError):
        runtimes.load(tmp_path / "m.pt")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(runtimes.RuntimeLoadError, match="cannot load"):
        runtimes.load(tmp_path / "broken.onnx")


@pytest.mark.slow
def test_litert_backend_quantizes_float_io_itself(tflite_model):
    m = runtimes.load(tflite_model)
    assert m.backend == "ai_edge_litert"
    assert m.inputs[0].dtype == "float32" and m.inputs[0].shape == (1, 16, 16, 3)  # NHWC, as converted
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    feed = {m.inputs[0].name: x}
    got = m.run(feed)
    ref = LiteRTModel(tflite_model, {m.inputs[0].name: None}).run(feed)
    assert set(got) == set(ref)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k])


@pytest.mark.slow
def test_a_converted_tflite_model_keeps_the_onnx_interface(tflite_model, tmp_path):
    """One application, devices of several profiles: the TFLite artifact answers with the ONNX output names and
    takes the ONNX source's NCHW input (the converter made it NHWC), exactly like the ONNX artifact."""
    import onnxruntime as ort

    m = runtimes.load(tflite_model)
    assert [o.name for o in m.outputs] == ["y"]  # onnx2tf's "output_0", renamed by the converter
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = m.run(runtimes.check_feeds(m, {"x": x}))
    nhwc = m.run(runtimes.check_feeds(m, {"x": x.transpose(0, 2, 3, 1)}))
    np.testing.assert_array_equal(got["y"], nhwc["y"])  # both layouts, the same answer
    ref = ort.InferenceSession(str(zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0))).run(None, {"x": x})[0]
    cos = float((got["y"].ravel() @ ref.ravel()) / np.linalg.norm(got["y"]) / np.linalg.norm(ref))
    assert cos > 0.95  # the same model (INT8 on synthetic calibration), not a transposed one
    with pytest.raises(runtimes.InputError, match="does not fit"):
        runtimes.check_feeds(m, {"x": np.zeros((1, 16, 3, 16), np.float32)})
    onnx = runtimes.load(tmp_path / "m.onnx")
    with pytest.raises(runtimes.InputError):  # ONNX models take only their own layout
        runtimes.check_feeds(onnx, {"x": x.transpose(0, 2, 3, 1)})


@pytest.mark.slow
def test_tflite_runtime_fallback_in_its_numpy1_environment(tflite_model, tmp_path):
    if not TFLITE_VENV.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-tflite is missing: `make test` creates it")
        pytest.skip("run `make test` to create .venv-tflite (tflite-runtime needs numpy < 2)")
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from fleet_runtime.runtimes import load\n"
        f"m = load({str(tflite_model)!r}, tflite='tflite_runtime')\n"
        "assert m.backend == 'tflite_runtime', m.backend\n"
        f"out = m.run({{m.inputs[0].name: np.load({str(tmp_path / 'x.npy')!r})}})\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n"
        "print(np.__version__)\n")
    proc = subprocess.run([str(TFLITE_VENV), "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("1.")  # really numpy 1 over there
    m = runtimes.load(tflite_model)
    ref = m.run({m.inputs[0].name: x})
    with np.load(tmp_path / "out.npz") as z:
        for k in ref:  # same INT8 model, two runtimes: equal within one quantization step
            scale = np.abs(ref[k]).max() / 127
            np.testing.assert_allclose(z[k], ref[k], atol=2 * scale)
    assert sys.version_info[:2] == (3, 11)
