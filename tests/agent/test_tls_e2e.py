"""The agent's link over TLS to a real Mosquitto: it verifies the broker against the configured CA."""

import time

import pytest

from tests.fleet_driver import AgentProcess, Broker, FleetDriver, agent_config, free_port
from tests.tls import issue_server_cert, make_ca

from .test_updates_e2e import install

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca(d)
    key, cert = issue_server_cert(d, ca_key, ca_cert)
    tls_port = free_port()
    broker = Broker(d / "broker", extra=f"listener {tls_port} 127.0.0.1\ncafile {d / 'ca.crt'}\ncertfile {cert}\n"
                                        f"keyfile {key}\n").start()
    broker.tls_port, broker.ca = tls_port, d / "ca.crt"
    (d / "other").mkdir()
    make_ca(d / "other", "someone else's CA")
    yield broker, d
    broker.stop()


def test_agent_connects_over_tls_and_updates(tls_broker, releases, tmp_path):
    broker, d = tls_broker
    driver = FleetDriver(broker.url, "tls-dev")  # the server side on the plaintext listener
    port = free_port()
    cfg = agent_config(tmp_path / "a.toml", device_id="tls-dev", broker_url=f"mqtts://127.0.0.1:{broker.tls_port}",
                       root=driver.root, state_dir=tmp_path / "s", port=port, tls_ca=str(broker.ca))
    agent = AgentProcess(cfg, port, driver=driver).start()
    try:
        install(driver, agent, "tls1", releases["1.0.0"])
        assert agent.model()["connected"] is True
    finally:
        agent.stop()
        driver.close()


def test_agent_refuses_a_broker_its_ca_did_not_sign(tls_broker, tmp_path):
    broker, d = tls_broker
    driver = FleetDriver(broker.url, "tls-bad")
    port = free_port()
    cfg = agent_config(tmp_path / "b.toml", device_id="tls-bad", broker_url=f"mqtts://127.0.0.1:{broker.tls_port}",
                       root=driver.root, state_dir=tmp_path / "s", port=port,
                       tls_ca=str(d / "other" / "ca.crt"))
    agent = AgentProcess(cfg, port).start()
    try:
        time.sleep(3)
        assert agent.model()["connected"] is False and not driver.online
        assert "CERTIFICATE_VERIFY_FAILED" in agent.output() or "certificate verify failed" in agent.output()
        assert agent.model()["update"]["state"] == "idle"  # the device keeps working offline
    finally:
        agent.stop()
        driver.close()
