"""A real S3 API server on a free loopback port: moto's standalone server (``moto_server``, from ``moto[server]``),
run as a subprocess; state lives in that process and goes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fleet_driver import free_port, wait_port

ACCESS_KEY, SECRET_KEY = "edgefleet-test", "edgefleet-test-secret"


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="ef-s3-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            raise RuntimeError("moto_server is not installed (make test installs the dev extra: moto[server])")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.unlink(missing_ok=True)

    def store_settings(self, bucket: str) -> dict:
        """ServerSettings fields for an artifact store on this server."""
        return {"artifact_store": "s3", "s3_bucket": bucket, "s3_endpoint_url": self.url,
                "s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY}
