"""Content-addressed artifact store through the API: streamed upload, Range download, limits."""

import hashlib
import os


def test_upload_is_content_addressed_and_downloads_support_range(server):
    data = os.urandom(3 * (1 << 20) + 123)  # several stream chunks
    sha = hashlib.sha256(data).hexdigest()
    r = server.post("/v1/artifacts", content=data, headers=server.as_("operator"))
    assert r.status_code == 201 and r.json() == {"sha256": sha, "size": len(data)}
    again = server.post("/v1/artifacts", content=data, headers=server.as_("operator"))
    assert again.json()["sha256"] == sha  # idempotent
    full = server.get(f"/v1/artifacts/{sha}", headers=server.as_("viewer"))
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    part = server.get(f"/v1/artifacts/{sha}", headers={**server.as_("viewer"), "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == data[1000:]
    assert part.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert not list((server.app.state.artifacts.root / "tmp").iterdir())  # no temp file left behind


def test_artifact_failures(server):
    assert server.post("/v1/artifacts", content=b"x", headers=server.as_("viewer")).status_code == 403
    assert server.post("/v1/artifacts", content=b"", headers=server.as_("operator")).status_code == 422
    assert server.get("/v1/artifacts/" + "0" * 64, headers=server.as_("viewer")).status_code == 404
    assert server.get("/v1/artifacts/not-a-hash", headers=server.as_("viewer")).status_code == 422
    assert server.get("/v1/artifacts/" + "0" * 64).status_code == 401
    server.app.state.settings.max_upload_bytes = 1000
    big = server.post("/v1/artifacts", content=b"y" * 5000, headers=server.as_("operator"))
    assert big.status_code == 413
