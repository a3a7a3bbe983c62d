import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol import messages, topics
from fleet_protocol.errors import MalformedError, ProtocolError, SchemaVersionError, TopicError

EXAMPLES = [
    messages.UpdateOffer(job="j1", metadata=b"\x00signed\xff", roots=(b"r2", b"r3"), base_sha256="ab" * 32),
    messages.RollbackOrder(job="j1", reason="error rate 4x baseline"),
    messages.Ping(nonce="n1"),
    messages.ChunkData(job="j1", index=3, data=b"\x01\x02"),
    messages.ChunkRequest(job="j1", indices=(0, 5, 9)),
    messages.UpdateEvent(job="j1", state="staging", progress=0.4, result="failed",
                         reason=messages.Reason.BAD_SIGNATURE, detail="signed by an unlisted key",
                         timings_ms={"verify": 1.5}, ts=1.0),
    messages.TelemetryBatch(seq=7, window_start=0, window_end=60, model_version="2.0", slot="b", requests=120,
                            errors={"bad_input": 2}, latency_ms=messages.Histogram(edges=(0, 1, 5, 10),
                                                                                    counts=(50, 60, 10)),
                            p50_ms=0.9, p95_ms=4.1, p99_ms=8.0, cpu_percent=35, rss_mb=58.5, temperature_c=51,
                            inputs=(messages.InputStats(name="input", count=120, mean=0.1, std=1.0, min=-3, max=3,
                                                        histogram=messages.Histogram(edges=(-3, 0, 3),
                                                                                     counts=(60, 60))),),
                            dropped_batches=1),
    messages.DeviceState(active_version="2.0", active_sha256="cd" * 32, active_slot="a", root_version=1,
                         update_version=4, ts=2.0),
    messages.Online(online=False),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.type)
def test_every_message_round_trips_through_json(msg):
    assert messages.parse(msg.to_bytes()) == msg


def test_unknown_version_is_refused_loudly():
    raw = json.loads(EXAMPLES[1].to_bytes())
    raw["v"] = 2
    with pytest.raises(SchemaVersionError, match="version 2"):
        messages.parse(json.dumps(raw).encode())


@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b"\xff\xfe", b'{"v": 1}', b'{"v": 1, "type": "launch"}',
                                 b'{"v": 1, "type": "rollback", "job": "a/b", "reason": "x"}',
                                 b'{"v": 1, "type": "chunk", "job": "j", "index": -1, "data": ""}',
                                 b'{"v": 1, "type": "chunk", "job": "j", "index": 0, "data": "***"}',
                                 b'{"v": 1, "type": "chunk_request", "job": "j", "indices": []}',
                                 b'{"v": 1, "type": "ping", "nonce": "n", "extra": 1}', b"[" * 10000])
def test_invalid_messages_give_a_typed_error(raw):
    with pytest.raises(MalformedError):
        messages.parse(raw)


def test_histogram_counts_must_fit_its_bins():
    with pytest.raises(ValueError, match="counts for"):
        messages.Histogram(edges=(0, 1, 2), counts=(1,))


def test_oversized_message():
    with pytest.raises(MalformedError, match="limit"):
        messages.parse(b" " * (messages.MAX_MESSAGE_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([m.to_bytes() for m in EXAMPLES]), st.data())
def test_fuzzed_messages_never_crash(raw, data):
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):  # anything else escaping fails the test
        messages.parse(bytes(blob))


@pytest.mark.parametrize(("kind", "job", "text"), [
    ("cmd", None, "ef/v1/d/dev-1/cmd"), ("evt", None, "ef/v1/d/dev-1/evt"), ("tm", None, "ef/v1/d/dev-1/tm"),
    ("state", None, "ef/v1/d/dev-1/state"), ("online", None, "ef/v1/d/dev-1/online"),
    ("dl", "j7", "ef/v1/d/dev-1/dl/j7"), ("dl-req", "j7", "ef/v1/d/dev-1/dl/j7/req"),
])
def test_topics_build_and_parse(kind, job, text):
    assert topics.topic("dev-1", kind, job) == text
    assert topics.parse(text) == topics.Topic("dev-1", kind, job)


@pytest.mark.parametrize("text", ["ef/v1/d/dev-2/cmd", "ef/v1/d/+/cmd", "ef/v1/d/#", "ef/v2/d/dev-1/cmd",
                                  "ef/v1/d/dev-1/shell", "ef/v1/d/dev-1/dl", "ef/v1/d/dev-1/dl/j/req/x",
                                  "$SYS/broker/uptime", "", "ef/v1/d/dev-1/cmd/extra"])
def test_topics_outside_the_devices_namespace_are_refused(text):
    with pytest.raises(TopicError):
        topics.parse_own(text, "dev-1")


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "-lead"])
def test_device_ids_that_would_escape_the_namespace_are_refused(bad):
    with pytest.raises(TopicError):
        topics.topic(bad, "cmd")


def test_subscriptions_and_acl():
    assert topics.device_subscriptions("dev-1") == ["ef/v1/d/dev-1/cmd", "ef/v1/d/dev-1/cfg", "ef/v1/d/dev-1/dl/+"]
    assert all(s.startswith("$share/fleet/ef/v1/d/+/") for s in topics.server_subscriptions())
    assert topics.acl_pattern() == "pattern readwrite ef/v1/d/%u/#"


def test_prebuilt_chunk_bytes_match_the_model_and_refuse_bad_ids():
    import base64

    from fleet_protocol.messages import ChunkData, chunk_bytes

    data = bytes(range(256)) * 5
    assert chunk_bytes("r7-dev-a", 2, base64.b64encode(data).decode()) == \
        ChunkData(job="r7-dev-a", index=2, data=data).to_bytes()
    for job, index in (('x"y', 0), ("", 0), ("ok", -1)):
        with pytest.raises(ValueError):
            chunk_bytes(job, index, "")
