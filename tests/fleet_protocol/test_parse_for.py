"""``parse_for(kind, raw)``: one table of what each topic kind carries, used by both sides; binary chunk frames."""

import json

import pytest

from fleet_protocol import messages
from fleet_protocol.errors import MalformedError, SchemaVersionError

TELEMETRY = messages.TelemetryBatch(seq=3, window_start=1.0, window_end=2.0, requests=4)


@pytest.mark.parametrize(("kind", "message"), [
    ("tm", TELEMETRY),
    ("evt", messages.UpdateEvent(job="r1-ab", state="committed", result="ok", ts=5.0)),
    ("state", messages.DeviceState(root_version=1, update_version=0, ts=1.0)),
    ("online", messages.Online(online=False)),
    ("dl-req", messages.ChunkRequest(job="r1-ab", indices=(0, 2))),
    ("cmd", messages.Ping(nonce="n1")),
    ("dl", messages.ChunkData(job="r1-ab", index=2, data=b"\x00\x01")),
])
def test_each_kind_parses_what_it_carries(kind, message):
    assert messages.parse_for(kind, message.to_bytes()) == message


@pytest.mark.parametrize(("kind", "raw", "error"), [
    ("tm", messages.Online(online=True).to_bytes(), MalformedError),  # the wrong type for the topic
    ("evt", TELEMETRY.to_bytes(), MalformedError),
    ("tm", json.dumps({"v": 2, "type": "telemetry"}).encode(), SchemaVersionError),
    ("tm", b'{"v":1,"type":"telemetry","seq":1,"window_start":1,"window_end":NaN,"requests":1}', MalformedError),
    ("tm", json.dumps({"v": 1, "type": "telemetry", "seq": 1, "window_start": 1, "window_end": 2, "requests": 1,
                       "model_version": "a\x00"}).encode(), MalformedError),
    ("tm", b"x" * (messages.MAX_MESSAGE_BYTES + 1), MalformedError),
    ("nope", TELEMETRY.to_bytes(), MalformedError),
    ("dl", messages.CHUNK_FRAME_MAGIC + b"\x05ab", MalformedError),  # truncated frame
    ("dl", messages.CHUNK_FRAME_MAGIC + b"\x02a/\x00\x00\x00\x01data", MalformedError),  # not a job id
])
def test_what_a_kind_does_not_carry_is_refused(kind, raw, error):
    with pytest.raises(error):
        messages.parse_for(kind, raw)


def test_the_fast_path_accepts_exactly_what_parse_accepts():
    for raw in (TELEMETRY.to_bytes(), json.dumps({**TELEMETRY.model_dump(), "extra": 1}).encode(),
                json.dumps({**TELEMETRY.model_dump(), "seq": 2**63}).encode()):
        try:
            expected = messages.parse(raw)
        except MalformedError:
            with pytest.raises(MalformedError):
                messages.parse_for("tm", raw)
        else:
            assert messages.parse_for("tm", raw) == expected


def test_a_binary_chunk_frame_round_trips_with_9_bytes_and_the_job_id_of_overhead():
    data = bytes(range(256)) * 1024
    frame = messages.chunk_frame("r12-0123456789abcdef0123", 41, data)
    assert len(frame) == len(data) + 9 + len("r12-0123456789abcdef0123")
    chunk = messages.parse_for("dl", frame)
    assert (chunk.job, chunk.index, chunk.data) == ("r12-0123456789abcdef0123", 41, data)
    with pytest.raises(ValueError):
        messages.chunk_frame("bad/job", 0, b"")
