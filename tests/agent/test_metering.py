"""Metered links (issue 17, part 6), the agent's side in pieces: the integrator's condition (a file, a real command),
the daily budget over UTC days with an injected clock, the bandwidth cap's bucket, the chunk window holding its
requests, and the HTTP path paced against a real loopback server. End to end with a real server, broker and agent:
tests/fleet_server/test_metered_e2e.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from agent.download import ChunkWindow, WindowConfig, http_download
from agent.metering import LinkPolicy, Metering
from fleet_protocol.chunks import chunks, manifest_for
from fleet_protocol.messages import ChunkData
from fleet_protocol.vocabulary import Reason
from tests.fleet_driver import RangeFileServer

DAY = 86_400.0


class Clocks:
    """A wall clock and a monotonic clock the test moves."""

    def __init__(self, wall: float = 1_700_000_000.0):
        self.wall, self.mono = wall, 0.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def meter(tmp_path: Path, clocks: Clocks | None = None, **policy) -> Metering:
    c = clocks or Clocks()
    return Metering(LinkPolicy(**policy), tmp_path / "ledger.json", clock=lambda: c.wall, monotonic=lambda: c.mono)


def test_metered_file_holds_downloads_while_it_exists(tmp_path):
    flag = tmp_path / "on-cellular"
    m = meter(tmp_path, metered_file=flag)
    assert m.hold() is None
    flag.touch()
    held = m.hold()
    assert held.reason is Reason.METERED and str(flag) in held.why
    assert held.describe(1234567) == f"waiting: metered link ({flag} exists); 1,234,567 bytes outstanding"
    flag.unlink()
    assert m.hold() is None


def test_metered_command_exit_status_decides_and_a_hanging_command_counts_as_not_metered(tmp_path):
    c = Clocks()
    on = Metering(LinkPolicy(metered_command="true", check_every_s=10), tmp_path / "a.json",
                  clock=lambda: c.wall, monotonic=lambda: c.mono)
    assert on.hold().reason is Reason.METERED
    assert meter(tmp_path, metered_command="false").hold() is None
    assert meter(tmp_path, metered_command="/nonexistent/hook").hold() is None  # cannot start: logged, not metered
    t0 = time.monotonic()
    hung = Metering(LinkPolicy(metered_command="sleep 30", command_timeout_s=0.3), tmp_path / "b.json")
    assert hung.hold() is None and time.monotonic() - t0 < 5


def test_metered_command_runs_at_most_every_check_interval(tmp_path):
    c, calls = Clocks(), []

    def run(argv, timeout):
        calls.append(argv)
        return 0

    m = Metering(LinkPolicy(metered_command="nmcli-says-metered --quiet", check_every_s=10), tmp_path / "l.json",
                 clock=lambda: c.wall, monotonic=lambda: c.mono, run=run)
    for _ in range(5):
        assert m.hold() is not None
        c.advance(1)
    c.advance(10)
    m.hold()
    assert calls == [["nmcli-says-metered", "--quiet"]] * 2


def test_metered_daily_budget_counts_utc_days_and_survives_a_restart(tmp_path):
    c = Clocks(wall=1_700_006_400.0)  # 2023-11-15 00:00 UTC
    m = meter(tmp_path, c, daily_download_bytes=1000)
    assert m.grant([400, 400, 400]) == 2  # a third would pass the budget
    m.spend(800)
    assert m.budget_left() == 200 and m.grant([400]) == 1  # one request may pass it by less than its size
    m.spend(400)
    held = m.hold()
    assert held.reason is Reason.DATA_BUDGET and "00:00 UTC" in held.why and m.grant([400]) == 0
    m.save()
    again = meter(tmp_path, c, daily_download_bytes=1000)  # the agent restarted: today's spending is remembered
    assert again.budget_left() == 0 and again.hold() is not None
    c.advance(DAY)
    assert again.hold() is None and again.budget_left() == 1000  # a new UTC day
    (tmp_path / "ledger.json").write_text("{torn")
    assert meter(tmp_path, c, daily_download_bytes=1000).budget_left() == 1000  # unreadable: a fresh count


def test_metered_bucket_grants_at_the_cap_on_average(tmp_path):
    c = Clocks()
    m = meter(tmp_path, c, max_download_bps=100_000)
    granted = 0
    for _ in range(200):  # 20 s in 0.1 s steps, always asking for a window of 64 KiB chunks
        granted += 65536 * m.grant([65536] * 8)
        c.advance(0.1)
    assert 20 * 100_000 <= granted <= 21 * 100_000 + 65536 * 8  # the rate, plus the first second's bucket


def test_metered_chunk_window_holds_requests_and_resumes_where_it_stopped(tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB
    manifest = manifest_for(payload, chunk_size=128 * 1024)
    flag = tmp_path / "metered"
    flag.touch()
    c = Clocks()
    m = meter(tmp_path, c, metered_file=flag, daily_download_bytes=600 * 1024)
    asked: list[tuple[int, ...]] = []
    window = ChunkWindow(WindowConfig(window=4), request=lambda r: asked.append(r.indices), clock=lambda: c.mono,
                         meter=m)
    window.connected = True
    assert not window.begin("j1", "a.onnx", manifest, tmp_path / "payload")
    assert asked == [] and window.held.reason is Reason.METERED and window.outstanding_bytes() == len(payload)
    window.tick()
    assert asked == []  # still metered
    flag.unlink()
    window.tick()
    assert asked == [(0, 1, 2, 3)] and window.held is None
    data = dict(chunks(payload, manifest))
    for i in asked[-1]:
        window.accept(ChunkData(job="j1", index=i, data=data[i]))
    assert asked[-1] == (4,)  # the budget holds one more (it may pass by less than a chunk)
    window.accept(ChunkData(job="j1", index=4, data=data[4]))
    assert window.held.reason is Reason.DATA_BUDGET and window.outstanding_bytes() == 3 * 128 * 1024
    c.advance(DAY)
    window.tick()
    assert asked[-1] == (5, 6, 7)
    for i in asked[-1]:
        done = window.accept(ChunkData(job="j1", index=i, data=data[i]))
    assert done is not None and hashlib.sha256(done.read_bytes()).hexdigest() == manifest.sha256


@pytest.mark.slow
def test_metered_http_download_is_paced_to_the_cap_and_stops_at_the_budget(tmp_path):
    payload = bytes(range(256)) * 2048  # 512 KiB
    server = RangeFileServer({"a.onnx": payload})
    try:
        capped = Metering(LinkPolicy(max_download_bps=200_000), tmp_path / "l1.json")
        t0 = time.monotonic()
        assert http_download(server.url("a.onnx"), tmp_path / "p1", len(payload), meter=capped) is None
        took = time.monotonic() - t0
        assert (tmp_path / "p1").read_bytes() == payload
        assert took >= (len(payload) - 200_000) / 200_000 * 0.9, took  # the first second's bucket is free

        c = Clocks()
        budget = Metering(LinkPolicy(daily_download_bytes=300_000), tmp_path / "l2.json", clock=lambda: c.wall)
        held = http_download(server.url("a.onnx"), tmp_path / "p2", len(payload), meter=budget)
        assert held is not None and held.reason is Reason.DATA_BUDGET
        assert (tmp_path / "p2").stat().st_size == 300_000  # what arrived stays
        c.advance(DAY)
        assert http_download(server.url("a.onnx"), tmp_path / "p2", len(payload), meter=budget) is None
        assert (tmp_path / "p2").read_bytes() == payload and server.requests[-1] == "bytes=300000-"
    finally:
        server.close()
