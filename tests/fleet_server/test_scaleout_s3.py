"""Artifacts on S3-compatible object storage, against a real S3 API server (moto's) on loopback: streamed multipart
uploads through a hash, ranged reads, presigned downloads that agents resume, and the server using it end to end."""

import asyncio
import hashlib
import itertools
import os
import time
import tracemalloc

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from agent.download import http_download
from fleet_protocol import messages
from fleet_server.app import create_app
from fleet_server.artifacts import ArtifactError, S3ArtifactStore, StoreConfig, open_store
from fleet_server.auth import issue_token
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import Role, RolloutDevice
from fleet_server.rollouts.delivery import Delivery
from fleet_server.settings import ServerSettings
from tests import zoo
from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import LiveFleet
from tests.fleet_server.test_models_and_jobs import registered  # noqa: F401 - the fixture, on this server
from tests.s3server import S3Server

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def store(s3) -> S3ArtifactStore:
    settings = ServerSettings(**s3.store_settings(f"edgefleet-{next(_buckets)}"))
    store = open_store(StoreConfig.from_settings(settings))
    store.ensure_bucket()
    return store


def chunks(data: bytes, size: int = 1 << 20):
    async def gen():
        for i in range(0, len(data), size):
            yield data[i:i + size]
    return gen()


def leftovers(store: S3ArtifactStore) -> tuple[list, list]:
    """Temporary objects and unfinished multipart uploads: an upload must leave neither."""
    objects = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}tmp/").get("Contents", [])
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return objects, uploads


def test_scaleout_s3_uploads_stream_through_a_hash_in_parts_and_reads_are_ranged(store):
    data = os.urandom(5 * store.PART + 12345)  # six parts
    tracemalloc.start()
    sha, size = asyncio.run(store.put_stream(chunks(data), max_bytes=1 << 30))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    # One part buffered, its copy on the way out and the client's own: about 3 parts (a loaded host measured 3.02),
    # bounded by 4, well below the 5.0-part file a buffering upload would hold.
    assert peak < 4 * store.PART < len(data)
    assert store.exists(sha) and store.size(sha) == len(data) and store.read_bytes(sha) == data
    assert store.read_range(sha, store.PART - 10, 20) == data[store.PART - 10:store.PART + 10]
    assert store.read_range(sha, len(data) - 5, 100) == data[-5:]  # a range past the end is cut, as on disk
    with store.open(sha) as body:
        assert body.read(1000) == data[:1000]
    assert store.key(sha) == f"artifacts/{sha[:2]}/{sha}" and store.local_path(sha) is None
    assert asyncio.run(store.put_stream(chunks(data), max_bytes=1 << 30)) == (sha, size)  # idempotent
    small = store.put_bytes(b"a delta")
    assert store.read_bytes(small) == b"a delta" and store.put_bytes(b"a delta") == small
    assert leftovers(store) == ([], [])


def test_scaleout_s3_refused_or_broken_uploads_leave_nothing_behind(store):
    with pytest.raises(ArtifactError, match="exceeds the limit"):
        asyncio.run(store.put_stream(chunks(os.urandom(3 << 20)), max_bytes=2 << 20))

    async def broken():
        yield b"x" * (1 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(store.put_stream(broken(), max_bytes=1 << 30))
    assert leftovers(store) == ([], [])
    assert not store.exists(hashlib.sha256(b"x" * (1 << 20)).hexdigest())
    with pytest.raises(ArtifactError, match="no artifact"):
        store.read_bytes("0" * 64)
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.exists("../../etc/passwd")


def test_scaleout_s3_presigned_downloads_resume_with_range(store, tmp_path):
    data = os.urandom(3 << 20)
    sha = store.put_bytes(data)
    url = store.download_url(sha)
    assert "X-Amz-Signature" in url and "/artifacts/" in url
    partial = tmp_path / "payload"
    partial.write_bytes(data[:1_000_000])  # an interrupted earlier attempt
    http_download(url, partial, len(data), attempts=2)  # the agent's own downloader: asks for the rest only
    assert partial.read_bytes() == data


def test_scaleout_s3_chunks_for_devices_are_ranged_reads(store, tmp_path):
    data = os.urandom(300_000)
    sha = store.put_bytes(data)
    delivery = Delivery(tmp_path, store)
    frames = delivery.chunks("j1", {"model.onnx": sha},
                             messages.ChunkRequest(job="j1", path="model.onnx", indices=(0, 1, 99)), binary=True)
    size = delivery.chunk_size
    assert len(frames) == 2 and frames[0].endswith(data[:size]) and frames[1].endswith(data[size:2 * size])


@pytest.fixture
def server(s3, tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    settings = ServerSettings(database_url=url, data_dir=tmp_path / "data", broker_url="mqtt://127.0.0.1:1",
                              **s3.store_settings(f"edgefleet-{next(_buckets)}"))
    init_keys(settings.data_dir, tmp_path / "root.pem")
    app = create_app(settings)
    tokens = {}
    with Session(app.state.engine) as s:
        for role in Role:
            _, tokens[role.value] = issue_token(s, name=f"{role.value}-bot", role=role, created_by="test")
    client = TestClient(app)
    client.as_ = lambda role: {"Authorization": f"Bearer {tokens[role]}"}
    yield client
    client.close()
    app.state.engine.dispose()


def test_scaleout_s3_the_server_stores_in_the_bucket_and_redirects_downloads(server, tmp_path):
    data = os.urandom(9 << 20)
    sha = hashlib.sha256(data).hexdigest()
    r = server.post("/v1/artifacts", content=data, headers=server.as_("operator"))
    assert r.status_code == 201 and r.json() == {"sha256": sha, "size": len(data)}
    store = server.app.state.artifacts
    assert isinstance(store, S3ArtifactStore) and store.size(sha) == len(data)
    assert not (tmp_path / "data" / "artifacts").exists() or not any((tmp_path / "data" / "artifacts").rglob(sha))
    moved = server.get(f"/v1/artifacts/{sha}", headers=server.as_("viewer"), follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"].startswith(store.client.meta.endpoint_url)
    part = httpx.get(moved.headers["location"], headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert server.get("/v1/artifacts/" + "0" * 64, headers=server.as_("viewer")).status_code == 404
    assert server.get(f"/v1/artifacts/{sha}").status_code == 401  # the redirect is for authenticated callers only


@pytest.mark.slow
@pytest.mark.usefixtures("registered")
def test_scaleout_s3_a_conversion_job_reads_its_inputs_from_the_bucket_and_stores_its_outputs_there(server, tmp_path):
    job = server.post("/v1/models/classifier/1.0.0/conversions", json={"profiles": ["rpi5"]},
                      headers=server.as_("operator"))
    assert job.status_code == 202
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = server.get(f"/v1/jobs/{job.json()['id']}", headers=server.as_("viewer")).json()
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    store = server.app.state.artifacts
    for art in state["artifacts"]:
        assert store.exists(art["report_sha256"])
        if art["status"] == "shippable":
            assert store.size(art["artifact_sha256"]) == art["size"]
            moved = server.get(f"/v1/artifacts/{art['artifact_sha256']}", headers=server.as_("viewer"),
                               follow_redirects=False)
            assert moved.status_code == 307 and len(httpx.get(moved.headers["location"]).content) == art["size"]
    assert any(a["status"] == "shippable" for a in state["artifacts"])
    assert not (tmp_path / "data" / "artifacts").exists() or not any(
        p.is_file() for p in (tmp_path / "data" / "artifacts").rglob("*") if p.parent.name != "tmp")


@pytest.mark.slow
def test_scaleout_s3_devices_download_their_update_over_http_through_presigned_urls(s3, tmp_path):
    """A real agent and server: with artifacts in object storage the offer names the API's delivery folder, the API
    redirects to a presigned URL, and the agent's resumable HTTP download fetches the bytes from the storage."""
    bucket = f"edgefleet-{next(_buckets)}"
    env = {f"EF_SERVER_{k.upper()}": str(v) for k, v in s3.store_settings(bucket).items()}
    broker = Broker(tmp_path / "broker").start()
    fleet = LiveFleet(tmp_path, broker.url, env=env)
    try:
        model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0)
        fleet.register("classifier", "1.0.0", model)
        sha = hashlib.sha256(model.read_bytes()).hexdigest()
        [agent] = fleet.enroll(1)
        agent.start()
        fleet.wait_online([agent])
        rollout = fleet.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100,
                                                                               "waves_percent": []})
        done = fleet.wait_state(rollout["id"], {"completed", "paused", "aborted"})
        assert done["state"] == "completed", done
        assert agent.model()["version"] == "1.0.0"
        fetched = [line for line in s3.log.read_text(errors="replace").splitlines()
                   if f"GET /{bucket}/" in line and sha in line and "X-Amz-Signature" in line]
        assert fetched and all('" 200 ' in line or '" 206 ' in line for line in fetched)  # presigned, from moto
        with Session(fleet.db) as s:
            job = s.exec(select(RolloutDevice.job).where(RolloutDevice.rollout_id == rollout["id"])).one()
        # the delivery folder serves only the job's own files, and only while its rollout runs
        plain = httpx.Client(base_url=f"http://127.0.0.1:{fleet.port}", timeout=10)
        assert plain.get(f"/v1/deliveries/{job}/blobs/{'0' * 64}").status_code == 404
        assert plain.get(f"/v1/deliveries/r1-{'0' * 20}/blobs/{sha}").status_code == 404
        assert plain.get(f"/v1/deliveries/{job}/blobs/{sha}").status_code == 404  # completed: no longer served
        plain.close()
    finally:
        fleet.close()
        broker.stop()
