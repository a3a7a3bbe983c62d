"""The server on real databases: SQLite (file, WAL) and a throwaway PostgreSQL cluster, each test on a fresh one."""

import itertools

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from fleet_server.app import create_app
from fleet_server.auth import issue_token
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import Role
from fleet_server.settings import ServerSettings
from tests.postgres import Postgres

_n = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("postgres").create_database(f"t{next(_n)}")


@pytest.fixture
def server(database_url, tmp_path):
    """A migrated database, fleet keys, the app, and one token per role."""
    upgrade(database_url)
    settings = ServerSettings(database_url=database_url, data_dir=tmp_path / "data", broker_url="mqtt://127.0.0.1:1")
    init_keys(settings.data_dir, tmp_path / "root.pem")
    app = create_app(settings)
    tokens = {}
    with Session(app.state.engine) as s:
        for role in Role:
            _, tokens[role.value] = issue_token(s, name=f"{role.value}-bot", role=role, created_by="test")
    client = TestClient(app)
    client.tokens = tokens
    client.as_ = lambda role: {"Authorization": f"Bearer {tokens[role]}"}
    yield client
    client.close()
    app.state.engine.dispose()


@pytest.fixture
def live(tmp_path):
    """A `fleet-server serve` process on SQLite with a real Mosquitto; agents are enrolled by the test."""
    from tests.fleet_driver import Broker
    from tests.fleet_server.live_fleet import LiveFleet

    broker = Broker(tmp_path / "broker").start()
    fleet = LiveFleet(tmp_path, broker.url)
    yield fleet
    fleet.close()
    broker.stop()
