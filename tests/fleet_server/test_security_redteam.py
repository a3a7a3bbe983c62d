"""Red-team findings against the hardened server (one device's credentials, or a malicious upload that gets code to
run in the sandbox child). Each test fails on the code as reviewed; none is marked xfail.

- a device floods chunk requests for job ids that do not exist: every one costs a database read on the single
  downloads thread (no negative cache, no per-device request pacing before the read);
- a device stores unbounded telemetry: windows for the same second with fresh ``seq`` numbers are all stored, ~0.6 MB
  each, so one device fills the database's disk (an ingest outage for the whole fleet);
- code in the sandbox child outlives it: a grandchild that calls ``setsid()`` leaves the process group the parent
  kills, and keeps running after ``Sandbox.run`` returns, with no time limit;
- the sandbox child can send UDP datagrams (Landlock confines only TCP): an exfiltration channel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlmodel import Session, func, select

from fleet_protocol import messages
from fleet_server.db import make_engine
from fleet_server.ingest import Ingest
from fleet_server.migrate import upgrade
from fleet_server.models import Device, TelemetryWindow
from fleet_server.rollouts.downloads import Downloads
from fleet_server.sandbox import Sandbox, SandboxConfig

REPO = Path(__file__).resolve().parents[2]
BATCH_WAIT_S = 1.0  # the ingest commits every 0.1 s


@pytest.fixture
def sqlite_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        for d in ("good", "evil"):
            s.add(Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                         mqtt_password_hash="x"))
        s.commit()
    yield engine
    engine.dispose()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class _Delivery:
    chunk_size = 256 * 1024

    def chunks(self, *args, **kwargs) -> list[bytes]:
        return []


def test_security_redteam_unknown_job_chunk_requests_do_not_each_read_the_database(sqlite_engine):
    """~300 µs of the downloads thread per request on SQLite (measured: ~3,100/s): one device publishing tiny QoS 0
    requests faster than that fills the 100,000-entry queue, and every device's chunk requests are delayed or
    dropped (``chunk_dropped``)."""
    queries = [0]

    def count(*args, **kwargs) -> None:
        queries[0] += 1

    event.listen(sqlite_engine, "before_cursor_execute", count)
    downloads = Downloads(sqlite_engine, _Delivery(), lambda topic, payload: None).start()
    flood = 500
    try:
        for i in range(flood):
            request = messages.ChunkRequest(job=f"r1-{i:020x}", indices=(0,))
            downloads.submit("evil", request.to_bytes())
        _wait(lambda: downloads._queue.empty(), 30)
        time.sleep(0.3)  # the last request taken off the queue is answered
    finally:
        downloads.stop()
        event.remove(sqlite_engine, "before_cursor_execute", count)
    assert queries[0] <= flood // 10, f"{queries[0]} database reads for {flood} requests from one device"


def _max_window(seq: int) -> bytes:
    """A telemetry window at the schema's limits (64 inputs, 256-edge histograms): ~0.6 MB, all of it stored."""
    edges = [i * 1.0000001 for i in range(256)]
    histogram = {"edges": edges, "counts": [2**62 + i for i in range(255)]}
    inputs = [{"name": f"{k:03d}" + "x" * 125, "count": 2**62, "mean": 1.0, "std": 1.0, "min": 0.0, "max": 1.0,
               "histogram": histogram} for k in range(64)]
    return json.dumps({"v": 1, "type": "telemetry", "seq": seq, "window_start": 1000.0, "window_end": 1001.0,
                       "requests": 1, "inputs": inputs, "latency_ms": histogram}).encode()


def test_security_redteam_one_device_cannot_fill_the_database_with_telemetry(sqlite_engine, tmp_path):
    """40 windows that all claim the same second (measured: 100 of them stored in 2.7 s, +95 MB): at that pace one
    device fills a 64 GB disk in about half an hour, and a full disk stops ingest for every device."""
    files = lambda: sum(p.stat().st_size for p in tmp_path.glob("fleet.db*"))  # noqa: E731
    before = files()
    ingest = Ingest(sqlite_engine).start()
    try:
        for seq in range(40):
            ingest.submit("ef/v1/d/evil/tm", _max_window(seq))
        _wait(lambda: ingest.queue.empty(), 60)
        time.sleep(BATCH_WAIT_S)
    finally:
        ingest.stop()
    with Session(sqlite_engine) as s:
        rows = s.exec(select(func.count()).select_from(TelemetryWindow)
                      .where(TelemetryWindow.device_id == "evil")).one()
    grown = files() - before
    assert grown < 8 << 20, f"one device stored {rows} windows for one second: the database grew {grown >> 20} MiB"

PROBES = '''
import os
import socket
import time


def escape(args, progress):
    """A grandchild in a session of its own (not in the group the parent kills); its pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.closerange(3, 256)
        time.sleep(args["sleep"])
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    return int(os.read(r, 64))


def udp(args, progress):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"exfiltrated", ("127.0.0.1", args["port"]))
        return "sent"
    except OSError as e:
        return type(e).__name__
'''


@pytest.fixture(scope="module")
def probes():
    folder = Path(tempfile.mkdtemp(prefix="sandbox-redteam-"))
    folder.chmod(0o755)
    (folder / "redteam_probes.py").write_text(textwrap.dedent(PROBES))
    (folder / "redteam_probes.py").chmod(0o644)
    yield folder
    shutil.rmtree(folder)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_security_redteam_sandbox_code_cannot_outlive_the_sandbox(probes):
    with Sandbox(SandboxConfig(timeout_s=60, python_path=(str(probes), str(REPO))), "validation") as box:
        pid = box.run("redteam_probes:escape", {"sleep": 30})
    try:
        time.sleep(0.5)
        assert not _alive(pid), "a process started in the sandbox kept running after it (setsid left its group)"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_security_redteam_sandbox_child_cannot_send_udp(probes):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(1.0)
        with Sandbox(SandboxConfig(timeout_s=60, python_path=(str(probes), str(REPO))), "validation") as box:
            said = box.run("redteam_probes:udp", {"port": listener.getsockname()[1]})
        try:
            received = listener.recv(100)
        except TimeoutError:
            received = b""
    assert said != "sent" and received == b"", "the sandbox child sent a UDP datagram out"
