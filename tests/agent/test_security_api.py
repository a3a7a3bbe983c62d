"""Hostile requests against the local inference API, served by a real LocalApi in its own process on a real ONNX
Runtime model: tiny bodies that expand into huge allocations, lying or missing lengths, and slow clients.

Memory is the serving process's peak RSS (``VmHWM`` in ``/proc/PID/status``), reset before each attack by writing
``5`` to ``/proc/PID/clear_refs``: a peak catches an allocation that was freed before the answer came back, and
measuring another process keeps the test's own allocations out of the figure.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api import Loaded, LocalApi, Serving
from agent.slots import SlotInfo
from agent.telemetry import Telemetry
from fleet_runtime import runtimes
from tests import zoo

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 32 * 1024 * 1024  # the agent's default max_request_bytes
READ_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 32
GROWTH_MB = 40  # an answered request costs a few MB; every attack below cost hundreds before the fix

SERVER = """
import sys
from pathlib import Path
from fleet_runtime import runtimes
from agent.api import Loaded, LocalApi, Serving
from agent.slots import SlotInfo
from agent.telemetry import Telemetry

serving = Serving()
serving.swap(Loaded(runtimes.load(Path(sys.argv[1]), threads=1),
                    SlotInfo("a", "model.onnx", "0" * 64, 1, "onnx", "m", "1.0.0", "j")))
api = LocalApi(serving, Telemetry(), max_request_bytes=int(sys.argv[2]), status=lambda: {},
               read_timeout_s=float(sys.argv[3]), max_connections=int(sys.argv[4]))
print(api.start(port=0), flush=True)
sys.stdin.read()  # until the test closes our stdin
api.stop(drain_s=1.0)
"""


class ApiProcess:
    def __init__(self, model: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model), str(LIMIT), str(READ_TIMEOUT_S),
                                      str(MAX_CONNECTIONS)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("http://127.0.0.1:"), f"the API did not start: {line!r}"
        self.port = int(line.rsplit(":", 1)[1])

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def reset_peak(self) -> float:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.peak_mb()

    def stop(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ApiProcess]:
    model = zoo.mlp_opset(tmp_path_factory.mktemp("security") / "m.onnx", opset=13)
    proc = ApiProcess(model)
    yield proc
    proc.stop()


X = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)


def post(port: int, body: bytes, ctype: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def assert_still_serves(server: ApiProcess) -> None:
    status, body = post(server.port, npy(X), "application/x-npy")
    assert status == 200, body
    assert np.load(io.BytesIO(body)).shape == (1, 10)


def attack(server: ApiProcess, body: bytes, ctype: str, status: int, words: str, secret: bytes) -> float:
    """Send one hostile request; check the answer (status, a clear message that does not echo ``secret``) and
    return how much the serving process's peak RSS grew, in MB."""
    assert_still_serves(server)  # warm: the first request allocates the runtime's buffers
    before = server.reset_peak()
    got, raw = post(server.port, body, ctype)
    grown = server.peak_mb() - before
    assert got == status, raw[:300]
    assert words in json.loads(raw)["error"]
    assert secret not in raw
    assert_still_serves(server)
    return grown


# ------------------------------------------------------------------ bodies that expand


@pytest.mark.parametrize("dtype", ["S200000000", "U50000000", "V200000000", "O", "complex64", "<f4,<f4"])
def test_security_json_dtype_outside_the_numeric_allow_list_is_refused_before_allocating(server, dtype):
    body = json.dumps({"inputs": {"x": {"data": [1, 2, 3, 4], "shape": [4], "dtype": dtype}}}).encode()
    grown = attack(server, body, "application/json", 422, "dtype", dtype.encode())
    assert grown < GROWTH_MB, f"{len(body)}-byte body with dtype {dtype}: peak RSS +{grown:.0f} MB"


def test_security_json_allowed_dtypes_still_work(server):
    for dtype in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                  "bool"):
        body = json.dumps({"inputs": {"x": {"data": [1] * X.size, "shape": list(X.shape), "dtype": dtype}}})
        status, raw = post(server.port, body.encode(), "application/json")
        assert status == 200, (dtype, raw[:300])


def test_security_json_numbers_are_bounded_before_parsing(server):
    """json.loads spends ~32 bytes of Python objects on each number: 4M of them (a 15 MB body) cost 183 MB."""
    body = ('{"inputs": {"x": {"data": [' + ",".join(["1.5"] * (2 << 20)) + "]}}}").encode()
    grown = attack(server, body, "application/json", 413, "at most", b"1.5,1.5")
    assert grown < len(body) / 2**20 + GROWTH_MB / 2, f"{len(body)}-byte JSON: peak RSS +{grown:.0f} MB"


def test_security_error_answers_do_not_quote_the_request(server):
    mark = "<script>zz-mark</script>"
    cases = [
        (f"/v2/{mark}", b"{}", "application/json", 404),
        ("/v1/predict", b"{}", f"text/{mark}", 415),
        ("/v1/predict", json.dumps({"inputs": {mark: [1.0]}}).encode(), "application/json", 422),
        ("/v1/predict", json.dumps({"inputs": {"x": {"data": [mark]}}}).encode(), "application/json", 400),
        ("/v1/predict", json.dumps({"inputs": {"x": {"data": [1], "dtype": mark}}}).encode(), "application/json",
         400),
        ("/v1/predict", b'{"inputs": ' + mark.encode(), "application/json", 400),
        ("/v1/predict", b"\x93NUMPY\x01\x00\x40\x00{'descr': '" + mark.encode() + b"', 'shape': ()}" + b" " * 20,
         "application/x-npy", 400),
    ]
    for path, body, ctype, status in cases:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        assert r.status == status, (path, ctype, raw[:200])
        assert b"zz-mark" not in raw, raw[:200]
    assert_still_serves(server)


def zip_bomb(members: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    """An .npz whose members are zero-filled arrays of the given dtype and shape, deflated in 1 MiB pieces (never
    materialised here): 512 MiB of zeros deflate to about 0.5 MB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (dtype, shape) in members.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                          "shape": shape})
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            info = zipfile.ZipInfo(f"{name}.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                f.write(header.getvalue())
                piece = bytes(1 << 20)
                for _ in range(size >> 20):
                    f.write(piece)
                f.write(bytes(size & ((1 << 20) - 1)))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zip_bomb({"x": ("<f4", (128 << 20,))})  # 512 MiB


def test_security_npz_that_decompresses_past_the_limit_is_refused_before_decompressing(server, bomb):
    assert len(bomb) < 1 << 20
    grown = attack(server, bomb, "application/x-npz", 413, "limit", b"x.npy")
    assert grown < GROWTH_MB, f"{len(bomb)}-byte npz: peak RSS +{grown:.0f} MB"


def test_security_npz_members_are_checked_together_and_each_header_against_its_data(server):
    # two members each under the limit, together over it
    two = zip_bomb({"x": ("<f4", (5 << 20,)), "y": ("<f4", (5 << 20,))})
    grown = attack(server, two, "application/x-npz", 413, "limit", b"y.npy")
    assert grown < GROWTH_MB
    # a member whose npy header promises more data than the limit, or than the member carries
    for shape, status, words in (((1 << 28,), 413, "limit"), ((1000,), 400, "not valid")):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": shape})
            z.writestr("x.npy", head.getvalue() + bytes(64))
        attack(server, buf.getvalue(), "application/x-npz", status, words, b"x.npy")
    # a flexible dtype inside a member
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(4, "S8"))
    attack(server, buf.getvalue(), "application/x-npz", 400, "dtype", b"S8")


def test_security_npy_header_promising_a_huge_array_is_refused(server):
    head = io.BytesIO()  # a header the fast path does not take (spaces), so numpy's reader would see it
    np.lib.format.write_array_header_2_0(head, {"descr": "|S200000000", "fortran_order": False, "shape": (4,)})
    grown = attack(server, head.getvalue() + bytes(64), "application/x-npy", 400, "dtype", b"S200000000")
    assert grown < GROWTH_MB


# ------------------------------------------------------------------ lengths


def raw_request(port: int, head: bytes, *, wait_s: float = 3.0) -> tuple[int, bytes]:
    """Send ``head`` as is; the status and body of the answer (which must come within ``wait_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head)
        got = b""
        deadline = time.monotonic() + wait_s
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
        head_part, _, rest = got.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_part.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length and time.monotonic() < deadline:
            piece = s.recv(65536)
            if not piece:
                break
            rest += piece
        return int(head_part.split()[1]), rest


def post_head(*headers: str) -> bytes:
    return ("POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy\r\n"
            + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


@pytest.mark.parametrize("headers,status,words", [
    (["Content-Length: -1"], 400, "Content-Length"),
    (["Content-Length: +100"], 400, "Content-Length"),
    (["Content-Length: 1e3"], 400, "Content-Length"),
    (["Content-Length: 0x10"], 400, "Content-Length"),
    (["Content-Length: 99999999999999999999999999"], 413, "limit"),
    (["Content-Length: 100", "Content-Length: 100"], 400, "Content-Length"),
    (["Content-Length: 100", "Content-Length: 200"], 400, "Content-Length"),
    ([], 411, "Content-Length"),
    (["Transfer-Encoding: chunked"], 411, "Content-Length"),
    (["Transfer-Encoding: chunked", "Content-Length: 100"], 400, "Transfer-Encoding"),
    (["Content-Length: 10", " 20"], 400, "header"),  # a folded line
])
def test_security_bad_content_length_is_refused_without_reading_the_body(server, headers, status, words):
    """The answer comes from the headers alone: no body is sent, and the server must not wait for one."""
    got, raw = raw_request(server.port, post_head(*headers))
    assert got == status, raw[:300]
    assert words in json.loads(raw)["error"]
    assert b"0x10" not in raw and b"1e3" not in raw
    assert_still_serves(server)


def test_security_negative_content_length_does_not_read_a_large_body(server):
    before = server.reset_peak()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(post_head("Content-Length: -1"))
        s.settimeout(3)
        answer = s.recv(65536)  # answered from the headers: the 64 MB below would otherwise be read to EOF
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        piece = bytes(1 << 20)
        with contextlib.suppress(OSError):  # the server closes the connection: nothing more is read
            for _ in range(64):
                s.sendall(piece)
    grown = server.peak_mb() - before
    assert grown < GROWTH_MB, f"Content-Length -1 and 64 MB: peak RSS +{grown:.0f} MB"
    assert_still_serves(server)


def test_security_chunked_body_is_not_read_past_the_limit(server):
    before = server.reset_peak()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(post_head("Transfer-Encoding: chunked"))
        s.settimeout(3)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
        chunk = b"100000\r\n" + bytes(1 << 20) + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(48):
                s.sendall(chunk)
    assert server.peak_mb() - before < GROWTH_MB
    assert_still_serves(server)


# ------------------------------------------------------------------ slow clients


def closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the server answered or closed the connection within ``seconds``."""
    s.settimeout(seconds)
    try:
        s.recv(65536)
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("sent", [
    b"",  # connected, nothing sent
    b"POST /v1/predict HTTP/1.1\r\n",  # the request line, then nothing
    b"POST /v1/predict HTTP/1.1\r\nContent-Length: 3080\r\n",  # headers not finished
    b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 3080\r\n\r\n\x93NUMPY",
])
def test_security_silent_client_is_dropped_after_the_read_timeout(server, sent):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(sent)
        t0 = time.monotonic()
        assert closed_within(s, READ_TIMEOUT_S + 3), "the server still holds a silent connection"
        assert time.monotonic() - t0 >= READ_TIMEOUT_S * 0.5
    assert_still_serves(server)


def test_security_trickling_client_is_dropped_at_the_request_deadline(server):
    """One header byte every 0.2 s never trips a per-read timeout; the request as a whole must still end."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nX-Slow: ")
        t0 = time.monotonic()
        dropped = False
        for _ in range(40):  # 8 s at most
            try:
                s.sendall(b"a")
            except OSError:
                dropped = True
                break
            if closed_within(s, 0.2):
                dropped = True
                break
        assert dropped, "a trickling client held the connection for 8 s"
        assert time.monotonic() - t0 < READ_TIMEOUT_S + 3
    assert_still_serves(server)


def test_security_many_silent_clients_are_all_released(server):
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONNECTIONS // 2)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\n")
        assert_still_serves(server)  # they do not block a real request
        deadline = time.monotonic() + READ_TIMEOUT_S + 5
        for s in socks:
            assert closed_within(s, max(0.1, deadline - time.monotonic()))
    finally:
        for s in socks:
            s.close()


def test_security_connections_past_the_cap_get_503_at_once_and_slots_come_back(server):
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONNECTIONS + 8)]
    try:
        waiting, busy = list(socks), 0
        deadline = time.monotonic() + 5
        while busy < 8 and waiting and time.monotonic() < deadline:  # the server accepts them one by one
            for s in list(waiting):
                s.settimeout(0.02)
                with contextlib.suppress(TimeoutError, ConnectionResetError):
                    busy += s.recv(65536).startswith(b"HTTP/1.1 503")
                    waiting.remove(s)
        assert busy >= 8
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + READ_TIMEOUT_S + 5
    while time.monotonic() < deadline:  # the closed ones give their slots back
        if post(server.port, npy(X), "application/x-npy")[0] == 200:
            break
        time.sleep(0.1)
    assert_still_serves(server)


def test_security_npz_member_count_is_bounded(server):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(5000):
            z.writestr(f"m{i}.npy", b"")
    attack(server, buf.getvalue(), "application/x-npz", 400, "not valid", b"m4999")


def test_security_unix_socket_listener_has_the_same_bounds(tmp_path):
    serving = Serving()
    serving.swap(Loaded(runtimes.load(zoo.mlp_opset(tmp_path / "m.onnx", opset=13), threads=1),
                        SlotInfo("a", "model.onnx", "0" * 64, 1, "onnx", "m", "1.0.0", "j")))
    api = LocalApi(serving, Telemetry(), max_request_bytes=1 << 20, status=dict, read_timeout_s=READ_TIMEOUT_S)
    path = tmp_path / "api.sock"
    api.start(unix_socket=path)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        return s

    try:
        with connect() as s:
            s.sendall(post_head("Content-Length: -1"))
            assert s.recv(65536).startswith(b"HTTP/1.1 400")
        with connect() as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\n")
            assert closed_within(s, READ_TIMEOUT_S + 3)
        with connect() as s:
            body = npy(X)
            s.sendall(post_head(f"Content-Length: {len(body)}") + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        api.stop(drain_s=1.0)
