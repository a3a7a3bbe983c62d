"""The local inference API in-process over real HTTP, on a real ONNX Runtime model: formats and bad inputs."""

import http.client
import io
import json

import numpy as np
import pytest

from agent.api import Loaded, LocalApi, Serving
from agent.slots import SlotInfo
from agent.telemetry import Telemetry
from fleet_runtime import runtimes
from tests import zoo


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    two = runtimes.load(zoo.two_in_two_out(d / "two.onnx"))
    one = runtimes.load(zoo.mlp_opset(d / "one.onnx", opset=13))
    serving = Serving()
    info = SlotInfo("a", "model.onnx", "0" * 64, 1, "onnx-int8", "m", "1.0.0", "j")
    serving.swap(Loaded(one, info))
    local = LocalApi(serving, Telemetry(), max_request_bytes=1 << 20, status=lambda: {"update": {"state": "idle"}})
    where = local.start(port=0)
    port = int(where.rsplit(":", 1)[1])
    yield {"port": port, "serving": serving, "one": Loaded(one, info), "two": Loaded(two, info), "api": local}
    local.stop()


def call(port, method, path, body=b"", ctype="application/json", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": ctype, **(headers or {})})
    r = conn.getresponse()
    out = (r.status, r.getheader("Content-Type"), r.read())
    conn.close()
    return out


def npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_json_npy_and_npz_requests(api):
    api["serving"].swap(api["one"])
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = api["one"].model.run({"x": x})["y"]
    status, ctype, body = call(api["port"], "POST", "/v1/predict", json.dumps(
        {"inputs": {"x": {"data": x.ravel().tolist(), "shape": [1, 3, 16, 16], "dtype": "float32"}}}).encode())
    assert status == 200 and ctype == "application/json"
    doc = json.loads(body)
    np.testing.assert_allclose(np.array(doc["outputs"]["y"]["data"]).reshape(1, 10), want, rtol=1e-6)
    status, ctype, body = call(api["port"], "POST", "/v1/predict", npy(x), "application/x-npy")
    assert status == 200 and ctype == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), want)
    api["serving"].swap(api["two"])
    buf = io.BytesIO()
    np.savez(buf, image=np.zeros((1, 3, 32, 32), np.float32), meta=np.ones((1, 8), np.float32))
    status, ctype, body = call(api["port"], "POST", "/v1/predict", buf.getvalue(), "application/x-npz")
    assert status == 200 and ctype == "application/x-npz"
    with np.load(io.BytesIO(body)) as z:
        assert set(z.files) == {"class_logits", "regression"}
    api["serving"].swap(api["one"])


@pytest.mark.parametrize("body,ctype,status,words", [
    (b"{not json", "application/json", 400, "bad JSON"),
    (b'{"inputs": {}}', "application/json", 400, "bad JSON"),
    (json.dumps({"inputs": {"x": {"data": [1.0, 2.0], "shape": [1, 2]}}}).encode(), "application/json", 422,
     "shape"),
    (json.dumps({"inputs": {"wrong": {"data": [1.0], "shape": [1]}}}).encode(), "application/json", 422, "inputs"),
    (json.dumps({"inputs": {"x": {"data": [1] * 768, "shape": [1, 3, 16, 16], "dtype": "complex64"}}}).encode(),
     "application/json", 422, "dtype"),
    (json.dumps({"inputs": {"x": {"data": [1] * 768, "shape": [1, 3, 16, 16], "dtype": "nonsense"}}}).encode(),
     "application/json", 400, "bad JSON"),
    (npy(np.full((1, 3, 16, 16), np.nan, np.float32)), "application/x-npy", 422, "NaN"),
    (b"\x93NUMPY garbage", "application/x-npy", 400, "not valid"),
    (npy(np.zeros((2, 2), object)), "application/x-npy", 400, "not valid"),  # pickled objects refused
    (b"x=1", "text/plain", 415, "content type"),
])
def test_bad_inputs_get_a_clear_4xx(api, body, ctype, status, words):
    api["serving"].swap(api["one"])
    got, rtype, raw = call(api["port"], "POST", "/v1/predict", body, ctype)
    assert got == status and rtype == "application/json", raw
    assert words in json.loads(raw)["error"]


def test_oversized_bodies_unknown_paths_and_no_model(api):
    conn = http.client.HTTPConnection("127.0.0.1", api["port"], timeout=10)
    conn.putrequest("POST", "/v1/predict")  # the server answers from the headers, without reading the body
    conn.putheader("Content-Type", "application/x-npy")
    conn.putheader("Content-Length", str((1 << 20) + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]
    conn.close()
    assert call(api["port"], "GET", "/v2/nothing")[0] == 404
    assert call(api["port"], "DELETE", "/v1/predict")[0] == 405
    assert call(api["port"], "GET", "/health")[0] == 200
    old = api["serving"].swap(None)
    try:
        assert call(api["port"], "GET", "/ready")[0] == 503
        x = np.zeros((1, 3, 16, 16), np.float32)
        assert call(api["port"], "POST", "/v1/predict", npy(x), "application/x-npy")[0] == 503
    finally:
        api["serving"].swap(old)
    assert call(api["port"], "GET", "/ready")[0] == 200


def test_model_info_and_metrics(api):
    api["serving"].swap(api["one"])
    info = json.loads(call(api["port"], "GET", "/v1/model")[2])
    assert info["loaded"] and info["runtime"] == "onnxruntime" and info["inputs"][0] == {
        "name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}
    status, ctype, text = call(api["port"], "GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert b'edgefleet_agent_requests_total{model="m",outcome="ok"}' in text


def test_micro_batching_groups_concurrent_requests_and_returns_each_its_rows(tmp_path):
    import threading

    from agent.batching import MicroBatcher, batchable

    model = runtimes.load(zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True, size=32))
    assert batchable(model)
    batcher = MicroBatcher(max_batch=8, max_wait_s=0.05)
    serving = Serving()
    serving.swap(Loaded(model, SlotInfo("a", "model.onnx", "0" * 64, 1, "onnx-int8", "m", "1", "j")))
    local = LocalApi(serving, Telemetry(), max_request_bytes=1 << 20, status=lambda: {}, batcher=batcher)
    port = int(local.start(port=0).rsplit(":", 1)[1])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(16)]
    got = [None] * len(xs)

    def one(i):
        got[i] = np.load(io.BytesIO(call(port, "POST", "/v1/predict", npy(xs[i]), "application/x-npy")[2]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    local.stop()
    for x, g in zip(xs, got, strict=True):
        np.testing.assert_allclose(g, model.run({"input": x})["logits"], rtol=1e-4, atol=1e-5)
    assert batcher.requests == 16 and batcher.batches < 16  # some requests shared a run
