"""Migrations on both databases, and the fleet-server commands an operator runs first."""

import json
import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

import fleet_server.models  # noqa: F401 - the tables
from fleet_server.migrate import current_heads, upgrade


def test_migrations_reach_head_and_match_the_models(database_url):
    upgrade(database_url, "base")
    upgrade(database_url)  # from the first migration to head
    engine = create_engine(database_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() in current_heads()
        assert compare_metadata(ctx, SQLModel.metadata) == []  # no model change without a migration
        assert {"api_token", "audit_entry", "enrollment_token", "device"} <= set(inspect(conn).get_table_names())
    upgrade(database_url)  # idempotent
    engine.dispose()


def test_operator_commands(database_url, tmp_path):
    env = {**os.environ, "EF_SERVER_DATABASE_URL": database_url, "EF_SERVER_DATA_DIR": str(tmp_path / "data")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fleet_server.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path)

    assert run("migrate").returncode == 0
    init = run("keys", "init", "--root-key-out", str(tmp_path / "offline" / "root.pem"))
    assert init.returncode == 0, init.stderr
    assert oct((tmp_path / "offline" / "root.pem").stat().st_mode & 0o777) == "0o600"
    assert run("keys", "init", "--root-key-out", str(tmp_path / "root2.pem")).returncode == 2  # never twice
    shown = json.loads(run("keys", "show").stdout.splitlines()[0])
    assert shown["version"] == 1 and shown["roles"]["root"] != shown["roles"]["targets"]
    rotated = run("keys", "rotate-root", "--old-root-key", str(tmp_path / "offline" / "root.pem"),
                  "--new-root-key-out", str(tmp_path / "offline" / "root-2.pem"))
    assert rotated.returncode == 0, rotated.stderr
    from fleet_protocol.metadata import UpdateVerifier
    from fleet_server.keys import root_versions

    v1, v2 = root_versions(tmp_path / "data")
    verifier = UpdateVerifier(v1, device_id="d1", profile="rpi5")
    assert verifier.update_root(v2) == 2  # an agent pinned to version 1 follows the rotation
    token = run("tokens", "create", "ops", "--role", "operator").stdout.strip()
    assert token.startswith("eft_")
    assert run("tokens", "create", "x", "--role", "god").returncode == 2
    assert run("enroll-token", "create", "--max-uses", "5", "--profile", "rpi5").stdout.startswith("efe_")
    assert run("tokens", "revoke", "1").returncode == 0
