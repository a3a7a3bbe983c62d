import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleet_protocol.chunks import ChunkAssembler, ChunkManifest, chunks, manifest_for
from fleet_protocol.errors import ChunkError

PAYLOAD = random.Random(0).randbytes(10_000)
M = manifest_for(PAYLOAD, chunk_size=1024)


def test_chunks_in_any_order_with_duplicates_assemble_exactly(tmp_path):
    parts = list(chunks(PAYLOAD, M))
    random.Random(1).shuffle(parts)
    a = ChunkAssembler(M, tmp_path / "p.bin")
    assert a.missing() == list(range(10))
    for i, data in parts + parts[:3]:
        a.accept(i, data)
    assert a.complete and a.finish().read_bytes() == PAYLOAD
    assert a.accept(*parts[0]) is False  # a duplicate changes nothing


def test_bad_chunks_are_refused_and_store_nothing(tmp_path):
    a = ChunkAssembler(M, tmp_path / "p.bin")
    data = PAYLOAD[:1024]
    with pytest.raises(ChunkError, match="sha256"):
        a.accept(0, b"x" + data[1:])
    with pytest.raises(ChunkError, match="bytes"):
        a.accept(0, data[:-1])
    with pytest.raises(ChunkError, match="outside"):
        a.accept(10, data)
    with pytest.raises(ChunkError, match="outside"):
        a.accept(-1, data)
    assert a.missing() == list(range(10))
    with pytest.raises(ChunkError, match="missing"):
        a.finish()


def test_resume_after_restart_asks_only_for_missing_chunks(tmp_path):
    a = ChunkAssembler(M, tmp_path / "p.bin")
    for i, data in chunks(PAYLOAD, M):
        if i % 3 == 0:
            a.accept(i, data)
    again = ChunkAssembler(M, tmp_path / "p.bin")  # a new process: state comes from the bytes on disk
    assert again.missing() == [1, 2, 4, 5, 7, 8]
    for i in again.missing():
        again.accept(i, PAYLOAD[i * 1024 : (i + 1) * 1024])
    assert again.finish().read_bytes() == PAYLOAD


def test_a_corrupted_chunk_on_disk_is_fetched_again(tmp_path):
    a = ChunkAssembler(M, tmp_path / "p.bin")
    for i, data in chunks(PAYLOAD, M):
        a.accept(i, data)
    raw = bytearray((tmp_path / "p.bin").read_bytes())
    raw[5000] ^= 1
    (tmp_path / "p.bin").write_bytes(bytes(raw))
    assert ChunkAssembler(M, tmp_path / "p.bin").missing() == [4]


def test_manifest_validates_its_chunk_count():
    with pytest.raises(ValidationError, match="chunk hashes"):
        ChunkManifest(length=5000, chunk_size=1024, sha256=M.sha256, chunk_sha256=M.chunk_sha256[:2])
    assert manifest_for(b"", 1024).count == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 12), st.binary(max_size=1100)), max_size=30))
def test_random_chunks_end_in_chunk_error_or_are_stored_correctly(tmp_path_factory, attempts):
    a = ChunkAssembler(M, tmp_path_factory.mktemp("fuzz") / "p.bin")
    for i, data in attempts:
        try:
            a.accept(i, data)
        except ChunkError:
            continue
    for i in range(M.count):
        if i not in a.missing():
            s, e = M.span(i)
            assert (a.path.read_bytes()[s:e]) == PAYLOAD[s:e]
